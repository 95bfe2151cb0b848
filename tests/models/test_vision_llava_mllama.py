"""LLaVA-1.5, LLaVA-NeXT and Llama 3.2 Vision (mllama) built from their config classes: encoded
as their transformers processors do (token for token, the same image tensors), image tokens
never labelled, then train, save, reload, merge and QLoRA (language model in 4 bits)."""

import json
import shutil

import pytest
import torch
import yaml
from PIL import Image
from vision_models import tiny_llava, tiny_llava_next, tiny_mllama

from loratune.adapters import load_adapter, merge_and_unload, save_adapter
from loratune.cli import main
from loratune.config import QuantConfig
from loratune.config.methods import LoraConfig
from loratune.data.encode import IGNORE
from loratune.data.errors import DataError
from loratune.models.vision import encode_vision, load_vision_model, vision_family, vision_logits
from loratune.models.vlm_quant import dequantize_linears, quantize_language_model
from loratune.quant.linear4bit import Linear4bit
from loratune.recipes.vision import setup_adapter, train_vision

BUILDERS = {"llava": tiny_llava, "llava_next": tiny_llava_next, "mllama": tiny_mllama}
ARCHITECTURES = {"llava": "LlavaForConditionalGeneration",
                 "llava_next": "LlavaNextForConditionalGeneration",
                 "mllama": "MllamaForConditionalGeneration"}
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0)}
WIDE, TALL = Image.new("RGB", (60, 24), (255, 0, 0)), Image.new("RGB", (20, 50), (0, 0, 255))


def _ask(image_parts: int, question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * image_parts
             + [{"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]


ONE = _ask(1, "Colour?", "red")
TWO = _ask(2, "Compare", "red, blue") + [
    {"role": "user", "content": "Which is first?"}, {"role": "assistant", "content": "red"}]
CASES = [(ONE, [WIDE], ["red"]), (TWO, [WIDE, TALL], ["red, blue", "red"])]


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request, tmp_path_factory):
    """(name, folder) of one tiny model."""
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, folder


@pytest.fixture(scope="module")
def loaded(family):
    model, tokenizer, images = load_vision_model(family[1])
    return model, tokenizer, images, vision_family(model.config)


def _encode(loaded, messages, images):
    _, tokenizer, processor, fam = loaded
    return encode_vision(messages, images, tokenizer, processor, fam)


def _parts(messages):
    return [dict(m, content=[{"type": "text", "text": m["content"]}]
                 if isinstance(m["content"], str) else m["content"]) for m in messages]


def _processor(name, tokenizer, image_processor):
    """The family's transformers processor with its published settings (processor_config.json
    of llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf)."""
    from transformers import LlavaNextProcessor, LlavaProcessor, MllamaProcessor

    if name == "mllama":
        return MllamaProcessor(image_processor, tokenizer)
    cls = LlavaProcessor if name == "llava" else LlavaNextProcessor
    return cls(image_processor, tokenizer, patch_size=14, vision_feature_select_strategy="default",
               num_additional_image_tokens=1)


@pytest.mark.parametrize("case", [0, 1])
def test_encoding_equals_the_family_processor(family, loaded, case):
    name = family[0]
    _, tokenizer, image_processor, _ = loaded
    messages, images, _ = CASES[case]
    shown = _parts(messages)
    if name == "llava":  # LLaVA's training format: </s> ends each earlier answer (encode_llava)
        shown = [dict(m, content=[{"type": "text", "text": m["content"][0]["text"] +
                                   tokenizer.eos_token}])
                 if m["role"] == "assistant" and i < len(shown) - 1 else m
                 for i, m in enumerate(shown)]
    text = tokenizer.apply_chat_template(shown, tokenize=False)
    # mllama's template writes <|begin_of_text|> itself; the LLaVA templates leave <s> to the
    # tokenizer, as the llava-hf model cards call their processors.
    extra = {"add_special_tokens": False} if name == "mllama" else {}
    want = _processor(name, tokenizer, image_processor)(
        text=text, images=[images] if name == "mllama" else images, return_tensors="pt", **extra)
    got = _encode(loaded, messages, images)
    ids = want["input_ids"][0].tolist()
    if not text.rstrip().endswith(tokenizer.eos_token):  # llava-1.5 ends answers with a space
        ids.append(tokenizer.eos_token_id)  # the encoder's labelled eos: the model learns to stop
    assert got.input_ids == ids
    assert set(got.image_inputs) == set(want) - {"input_ids", "attention_mask"}
    for key, tensor in got.image_inputs.items():
        if key == "cross_attention_mask":  # one row longer where the eos was appended
            tensor = tensor[:, :want[key].shape[1]]
        torch.testing.assert_close(tensor, want[key], rtol=0, atol=0, check_dtype=False)


def test_llava_next_image_tokens_follow_the_image_size(tmp_path):
    model, tokenizer, images = load_vision_model(tiny_llava_next(tmp_path / "next"))
    loaded = model, tokenizer, images, vision_family(model.config)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    counts = [_encode(loaded, ONE, [image]).input_ids.count(image_id)
              for image in (WIDE, TALL, Image.new("RGB", (28, 28)))]
    assert len(set(counts)) == 3 and min(counts) > loaded[3].image_seq_len, counts


def test_llava_next_with_full_feature_selection_is_refused_by_name():
    from transformers import LlavaNextConfig

    with pytest.raises(ValueError, match="vision_feature_select_strategy is 'full'.*'default'"):
        vision_family(LlavaNextConfig(vision_feature_select_strategy="full"))


@pytest.mark.parametrize("case", [0, 1])
def test_only_the_answers_are_labelled(loaded, case):
    model, tokenizer, _, fam = loaded
    messages, images, answers = CASES[case]
    ex = _encode(loaded, messages, images)
    image_id = tokenizer.convert_tokens_to_ids(fam.image_token)
    assert ex.input_ids.count(image_id) >= len(images)
    taught = {t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE}
    assert image_id not in taught
    runs, run = [], []
    for tok, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            run.append(tok)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    decoded = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in runs]
    # llava-1.5's template ends an answer with a space, not an end-of-turn token: its last
    # answer is followed by the encoder's eos (labelled), the space between them is not.
    assert [d for d in decoded if d] == answers
    ends = {tokenizer.eos_token_id, model.config.get_text_config().eos_token_id}
    last = max(i for i, label in enumerate(ex.labels) if label != IGNORE)
    assert ex.input_ids[last] in ends  # the model learns to stop


def test_too_many_images_for_the_placeholders_is_refused(loaded):
    with pytest.raises(DataError, match=r"wrote 1 .* for 2 image\(s\)"):
        _encode(loaded, ONE, [WIDE, TALL])


def _colours(loaded):
    """Two plain-colour images, "Colour?" -> the name: a task each step fits further."""
    return [_encode(loaded, _ask(1, "Colour?", name), [Image.new("RGB", (28, 28), rgb)])
            for name, rgb in list(COLOURS.items())[:2]]


def _reloaded_equal(folder, adapter, examples, want, prepare=None):
    fresh, _, _ = load_vision_model(folder)
    if prepare is not None:
        prepare(fresh)
    load_adapter(fresh, adapter)
    with torch.no_grad():
        for ex, logits in zip(examples, want):
            torch.testing.assert_close(vision_logits(fresh, ex), logits, rtol=0, atol=1e-5)
    return fresh


def test_train_save_reload_merge(family, loaded, tmp_path):
    name, folder = family
    examples = _colours(loaded)
    model, _, _ = load_vision_model(folder)
    fam = vision_family(model.config)
    targets = setup_adapter(model, LoraConfig(target_modules=fam.language_targets(), r=8,
                                              lora_alpha=16))
    assert targets and all(t.startswith(fam.language + ".") for t in targets)
    losses = train_vision(model, examples, steps=8, lr=2e-2, batch=2)
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        trained = [vision_logits(model, ex) for ex in examples]
    save_adapter(model, tmp_path / "adapter")
    fresh = _reloaded_equal(folder, tmp_path / "adapter", examples, trained)
    with torch.no_grad():
        merged = merge_and_unload(fresh)
        for ex, want in zip(examples, trained):
            torch.testing.assert_close(vision_logits(merged, ex), want, rtol=1e-4, atol=1e-4)
    # The merged model saves as a folder transformers loads as the same architecture, and
    # `loratune merge` writes one from the checkpoint's own tensor names.
    merged.save_pretrained(tmp_path / "merged")
    for side in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(folder / side, tmp_path / "merged" / side)
    _merged_equal(tmp_path / "merged", name, examples, trained)
    _merged_equal(_cli_merge(folder, tmp_path), name, examples, trained)


def _cli_merge(folder, tmp_path, *flags):
    out = tmp_path / "cli-merged"
    assert main(["merge", "--model", str(folder), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(out), *flags]) == 0
    return out


def _merged_equal(out, name, examples, trained):
    again, _, _ = load_vision_model(out)
    assert type(again).__name__ == ARCHITECTURES[name]
    with torch.no_grad():
        for ex, want in zip(examples, trained):
            torch.testing.assert_close(vision_logits(again, ex), want, rtol=1e-4, atol=1e-4)


def test_qlora_language_model_in_4_bits_vision_in_compute_dtype(family, loaded, tmp_path):
    folder = family[1]
    examples = _colours(loaded)
    cfg = QuantConfig(compute_dtype="float32")
    model, _, _ = load_vision_model(folder)
    fam = vision_family(model.config)
    language = sorted(n for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.startswith(fam.language + "."))
    quantized = quantize_language_model(model, cfg)
    assert sorted(quantized) == language
    assert {n for n, m in model.named_modules() if isinstance(m, Linear4bit)} == set(language)
    vision = [m for n, m in model.named_modules()
              if n.startswith(fam.vision + ".") and isinstance(m, torch.nn.Linear)]
    assert vision and all(m.weight.dtype == torch.float32 for m in vision)
    setup_adapter(model, LoraConfig(target_modules="language", r=8, lora_alpha=16))
    losses = train_vision(model, examples, steps=8, lr=2e-2, batch=2)
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        trained = [vision_logits(model, ex) for ex in examples]
    save_adapter(model, tmp_path / "adapter")
    fresh = _reloaded_equal(folder, tmp_path / "adapter", examples, trained,
                            prepare=lambda m: quantize_language_model(m, cfg))
    with torch.no_grad():
        merged = merge_and_unload(dequantize_linears(fresh))
        assert not any(isinstance(m, Linear4bit) for m in merged.modules())
        for ex, want in zip(examples, trained):
            torch.testing.assert_close(vision_logits(merged, ex), want, rtol=1e-4, atol=1e-4)
    _merged_equal(_cli_merge(folder, tmp_path, "--qlora", "nf4"), family[0], examples, trained)


def test_cli_trains_and_refuses_packing(family, tmp_path, capsys):
    """`loratune train` on image data (one image a row, rows padded together), packing refused
    by name: an image's tokens cannot be split across rows or joined with another's."""
    name, folder = family
    rows = []
    for colour, rgb in COLOURS.items():
        Image.new("RGB", (40, 28), rgb).save(tmp_path / f"{colour}.png")
        rows.append({"messages": [{"role": "user", "content": "<image>Colour?" + " Say." * len(rows)},
                                  {"role": "assistant", "content": colour}],
                     "images": [f"{colour}.png"]})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name": str(folder)},
        "adapter": {"r": 4, "lora_alpha": 8, "target_modules": "language"},
        "data": {"train": str(tmp_path / "d.jsonl")},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 2e-2, "warmup_ratio": 0.0}}))
    assert main(["train", str(config), "data.packing=true"]) == 2
    assert "data.packing: true with a vision-language model" in capsys.readouterr().err
    assert main(["train", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["packing"] is False and summary["steps"] == 2


def test_a_padded_batch_gives_each_row_its_own_logits(loaded):
    """Rows with 2 images and with 1 (of other sizes: LLaVA-NeXT's tile counts differ) padded
    into one batch: each row's logits are the ones it has alone."""
    from loratune.data.packing import collate_images

    model, tokenizer, _, _ = loaded
    two, one = _encode(loaded, *CASES[1][:2]), _encode(loaded, ONE, [TALL])
    batch = collate_images([[two], [one]], tokenizer.pad_token_id or tokenizer.eos_token_id)
    assert batch["attention_mask"].sum(1).tolist() == [len(two), len(one)]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        together = model(**inputs).logits
        for row, ex in enumerate([two, one]):
            alone = vision_logits(model, ex)[0]
            torch.testing.assert_close(together[row, :len(ex)], alone, rtol=1e-4, atol=1e-4)
