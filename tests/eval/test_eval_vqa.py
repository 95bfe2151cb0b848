"""`eval --task vqa` on tiny vision-language models: the prompt is the generation prompt, the
scores are the generated answers', the adapter column differs from the base by the adapter."""

import json

import pytest
import torch
from tiny import randomize_lora
from vision_models import tiny_idefics3, tiny_qwen2_5_vl

from loratune.cli import main
from loratune.config.commands import EvalCommandConfig
from loratune.config.methods import LoraConfig
from loratune.eval.run import run_eval
from loratune.eval.tasks import TaskError, task_record
from loratune.eval.tasks import vqa
from loratune.models import load_model
from loratune.recipes.vision import setup_adapter, train_vision

COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255)}


def colour_file(folder, layout="parts", colours=COLOURS):
    """One plain-colour image per colour, asked "Colour?": image content parts, or
    LLaMA-Factory's `<image>` marker and `images` column."""
    from PIL import Image

    rows = []
    for name, rgb in colours.items():
        Image.new("RGB", (56, 56), rgb).save(folder / f"{name}.png")
        if layout == "parts":
            user = [{"type": "image", "image": f"{name}.png"}, {"type": "text", "text": "Colour?"}]
            rows.append({"messages": [{"role": "user", "content": user},
                                      {"role": "assistant", "content": name}]})
        else:
            rows.append({"messages": [{"role": "user", "content": "<image>Colour?"},
                                      {"role": "assistant", "content": name}],
                         "images": [f"{name}.png"]})
    path = folder / "colours.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


def cfg_for(folder, data, **extra):
    return EvalCommandConfig(task="vqa", model={"name": str(folder)}, data=str(data), **extra)


@pytest.mark.parametrize("build", [tiny_qwen2_5_vl, tiny_idefics3])
def test_prompt_is_the_chat_templates_generation_prompt(build, tmp_path):
    """The encoded conversation cut where the answer's labels start ends with the template's
    generation prompt (add_generation_prompt), answer left out; for Qwen2.5-VL, whose images
    are one repeated token, it is that prompt token for token with each image's run widened."""
    model, tok = load_model(str(build(tmp_path / "model")))
    data = vqa.read(cfg_for(tmp_path / "model", colour_file(tmp_path, "markers")))
    where, messages, images = data.items[0]
    ids, image_inputs = vqa.prompt_example(tok, where, messages, images)
    image_token = tok.image_encoder.family.image_token
    text = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    after_image = text.rsplit(image_token, 1)[1]
    assert after_image.endswith(("Assistant:", "assistant\n"))
    assert tok.decode(ids).endswith(after_image)
    assert "pixel_values" in image_inputs
    if build is tiny_qwen2_5_vl:
        want = tok(text, add_special_tokens=False)["input_ids"]
        image_id = tok.convert_tokens_to_ids(image_token)
        assert [t for t in ids if t != image_id] == [t for t in want if t != image_id]
        assert ids.count(image_id) > want.count(image_id) == 1  # widened to the image's tokens


def test_scores_are_the_greedy_answers(qwen, tmp_path):
    """Exact match and token F1 computed from the greedy generate() of each prompt."""
    model, tok = load_model(str(qwen))
    cfg = cfg_for(qwen, colour_file(tmp_path), max_new_tokens=4)
    data = vqa.read(cfg)
    result = vqa.score(model, tok, data, cfg)
    assert result.n == 2 and [r["reference"] for r in result.rows] == ["red", "blue"]
    for row, (where, messages, images) in zip(result.rows, data.items):
        ids, extra = vqa.prompt_example(tok, where, messages, images)
        out = model.generate(input_ids=torch.tensor([ids]), **extra, max_new_tokens=4,
                             do_sample=False)
        assert row["prediction"] == tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    # a scripted answer: the metrics are the rows' means
    rows = [{"exact_match": True, "token_f1": 1.0}, {"exact_match": False, "token_f1": 0.5}]
    assert vqa.token_f1("the red one", "red") == pytest.approx(2 / 3)
    assert sum(r["token_f1"] for r in rows) / 2 == 0.75


def test_adapter_column_answers_what_it_was_trained_on(qwen, tmp_path):
    """A LoRA trained on a red image's answer gives it; the base column (adapter disabled on
    the same model) does not; the CLI writes eval-vqa.json with both columns."""
    from loratune.adapters import save_adapter
    from loratune.recipes.vision import encode_records
    from loratune.models.vision import load_vision_model, vision_family

    data = colour_file(tmp_path, colours={"red": COLOURS["red"]})
    model, tok, images = load_vision_model(qwen)
    setup_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=["language", "projector"]))
    records = [(n + 1, json.loads(line)) for n, line in enumerate(data.read_text().splitlines())]
    examples = encode_records(records, data, tok, images, vision_family(model.config))
    losses = train_vision(model, examples, steps=30, lr=3e-2)
    assert losses[-1] < losses[0] / 4, losses[-5:]
    save_adapter(model, tmp_path / "adapter")

    out = tmp_path / "report"
    main(["eval", "--task", "vqa", "--model", str(qwen), "--data", str(data), "--adapter",
          str(tmp_path / "adapter"), "--out", str(out), "--max-new-tokens", "4"])
    report = json.loads((out / "eval-vqa.json").read_text())
    columns = {c["label"]: c["metrics"] for c in report["variants"]}
    assert columns["adapter"] == {"exact_match": 1.0, "token_f1": 1.0}
    assert columns["base"]["exact_match"] == 0.0
    assert "vqa" in (out / "eval-vqa.md").read_text()


def test_text_model_and_answerless_data_refused(tmp_path):
    text_tokenizer = object()  # no image_encoder: models/load.py sets one for VLMs only
    with pytest.raises(TaskError, match="needs a vision-language model"):
        vqa.prompt_example(text_tokenizer, "f.jsonl:1", [], [])
    assert task_record("vqa").headline == "exact_match"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises((TaskError, ValueError), match="empty.jsonl"):
        vqa.read(cfg_for(tmp_path, empty))


def test_the_prompt_ends_where_the_last_answer_starts():
    """One labelled run per answer (an opening assistant turn is not one); a run after the last
    answer (an eos appended after Gemma's `<end_of_turn>\n`) is not where it starts."""
    from loratune.models.vision import last_answer_start

    X = -100
    u, a = {"role": "user"}, {"role": "assistant"}
    assert last_answer_start([u, a, u, a], [X, X, 5, 6, X, X, 7, 8, 9, X]) == 6
    assert last_answer_start([u, a], [X, 1, 2]) == 1
    assert last_answer_start([u, a], [X, X, 5, 6, X, 1]) == 2        # Gemma: answer, "\n", eos
    assert last_answer_start([a, u, a], [X, X, 5, 6, X]) == 2         # the opening turn: context
    assert last_answer_start([u, a], [X, X]) is None


def test_run_eval_base_and_adapter_columns_share_the_data(qwen, tmp_path):
    """run_eval's columns: the base with the adapter disabled gives the same rows as a model
    that never had one."""
    data = colour_file(tmp_path)
    cfg = cfg_for(qwen, data, max_new_tokens=3)
    model, tok = load_model(str(qwen))
    plain = vqa.score(model, tok, vqa.read(cfg), cfg)
    setup_adapter(model, LoraConfig(r=4))
    randomize_lora(model, scale=1.0)
    adapted = vqa.score(model, tok, vqa.read(cfg), cfg)
    run = run_eval(cfg, model=model, tokenizer=tok)
    assert [v.label for v in run.variants] == ["base"]
    assert [r["prediction"] for r in run.variants[0].result.rows] == \
        [r["prediction"] for r in plain.rows]
    assert [r["prediction"] for r in adapted.rows] != [r["prediction"] for r in plain.rows]
