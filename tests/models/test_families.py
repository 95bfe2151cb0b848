"""The family matrix: every family of tests/families.py through load, train, merge, QLoRA,
planner, masking and stopping."""

import json
import math

import pytest
import torch

from families import (FAMILIES, FAMILY_SPECS, build_family, family_conversation,
                      labels_over_spans, taught)
from loratune.adapters import AdapterError, add_adapter, load_adapter, save_adapter
from loratune.config import (DataConfig, IA3Config, LoraConfig, ModelConfig, QuantConfig,
                             build_config)
from loratune.data import DataError, build_examples, encode_conversation
from loratune.data.conversation import FOLDED_NOTE, fit_conversation
from loratune.eval.generate import TemplateNote, generate_chat, prompt_ids
from loratune.export.merge import merge_folder, read_adapters
from loratune.models import load_model
from loratune.plan.shapes import resolve_shape
from loratune.train import train


@pytest.mark.parametrize("name", FAMILIES)
def test_fixture_is_the_family(name):
    """The tiny model has the family's quirks and the tokenizer its special tokens."""
    model, tok = build_family(name)
    fam = FAMILY_SPECS[name]
    assert model.config.model_type == fam.model_type
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert ("qkv_proj" in names and "gate_up_proj" in names) == fam.fused
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) \
        == fam.tie
    for t in fam.specials + fam.generation_eos + (fam.end_of_turn,):
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids(t)
                                                    for t in fam.generation_eos]
    text = "Hello world, apple 123! é"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert torch.isfinite(model(tok(text, return_tensors="pt").input_ids).logits).all()


# -- chat templates and answer masking ------------------------------------------------------------
def expected_labels(tok, fam, text: str, ids: list[int]) -> list[int]:
    """Labels derived from the rendered text alone: each token overlapping [end of an assistant
    header, end of the next end-of-turn token] is labelled, and the final eos; nothing else."""
    spans, at = [], 0
    while (h := text.find(fam.assistant_header, at)) >= 0:
        start = h + len(fam.assistant_header)
        end = text.index(fam.end_of_turn, start) + len(fam.end_of_turn)
        spans.append((start, end))
        at = end
    return labels_over_spans(tok, text, ids, spans)


def fit_and_encode(name, messages, think="keep"):
    _, tok = build_family(name)
    cfg = DataConfig(think=think)
    fitted, notes = fit_conversation(messages, tok, tok.chat_template, cfg.think)
    ex, _ = encode_conversation(fitted, tok, tok.chat_template, "answers", 512)
    return tok, fitted, notes, ex


@pytest.mark.parametrize("system", [True, False], ids=["system", "no_system"])
@pytest.mark.parametrize("name", FAMILIES)
def test_multi_turn_masking_token_by_token(name, system):
    """Two turns, with and without a system message, on the family's published template: only
    the answers and the end-of-turn token after each are labelled (and the final eos)."""
    fam = FAMILY_SPECS[name]
    conv = family_conversation(system=system)
    tok, fitted, notes, ex = fit_and_encode(name, conv)
    text = tok.apply_chat_template(fitted, tokenize=False)
    rendered = tok(text, add_special_tokens=False).input_ids
    assert ex.input_ids[:len(rendered)] == rendered and len(ex.input_ids) - len(rendered) <= 1
    assert ex.labels == expected_labels(tok, fam, text, ex.input_ids)
    runs = taught(tok, ex)
    for answer in ("Paris is the capital of France.", "apple apple apple"):
        assert sum(answer + fam.end_of_turn in run for run in runs) == 1, runs
    assert not any("France?" in run or "Repeat" in run for run in runs)
    if system:
        assert text.count("You are a helpful assistant. Be brief.") == 1
        # folded (with a note) exactly where the template cannot render a system message
        assert bool(notes) == (not fam.system_role)


def test_gemma2_system_message_is_a_data_error_unfolded_and_folded_with_a_note(tmp_path):
    """Gemma 2's template raises on a system role: encode says so as a DataError; the data
    pipeline folds it into the first user turn and counts the note."""
    _, tok = build_family("gemma2")
    with pytest.raises(DataError, match="the chat template refused the conversation: "
                                        "System role not supported"):
        encode_conversation(family_conversation(True), tok, tok.chat_template, "answers", 512)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": family_conversation(True)}) + "\n")
    examples, stats = build_examples(path, tok, DataConfig())
    assert stats.notes == {FOLDED_NOTE: 1} and "note: 1 records: system message folded" in \
        stats.noted()
    text = tok.decode(examples[0].input_ids)
    assert "<start_of_turn>user\nYou are a helpful assistant. Be brief.\n\nWhat is the capital" \
        in text


def test_mistral_system_message_is_folded_into_the_first_user_turn():
    tok, fitted, notes, ex = fit_and_encode("mistral_v0_3", family_conversation(True))
    text = tok.decode(ex.input_ids)
    assert text.startswith("<s>[INST] You are a helpful assistant. Be brief.\n\nWhat is the "
                           "capital of France?[/INST] Paris is the capital of France.</s>")
    assert notes == [FOLDED_NOTE]


THINKING = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "<think>\nFrance: Paris.\n</think>\n\nParis."},
    {"role": "user", "content": "Repeat the word apple."},
    {"role": "assistant", "content": "<think>\nThree times.\n</think>\n\napple apple apple"},
]


def test_qwen3_think_blocks_kept_or_stripped_by_option():
    tok, _, _, kept = fit_and_encode("qwen3", THINKING, think="keep")
    # kept: the last answer's reasoning is trained on; Qwen3's template itself drops the
    # reasoning of past answers from the history
    assert taught(tok, kept) == [
        "Paris.<|im_end|>", "<think>\nThree times.\n</think>\n\napple apple apple<|im_end|>"]
    tok, _, _, stripped = fit_and_encode("qwen3", THINKING, think="strip")
    assert taught(tok, stripped) == ["Paris.<|im_end|>",
                                     "<think>\n\n</think>\n\napple apple apple<|im_end|>"]
    assert "Three times" not in tok.decode(stripped.input_ids)
    with pytest.raises(ValueError, match="think"):
        DataConfig(think="drop")


def test_phi3_trailing_eos_is_labelled_and_each_turn_ends_at_end():
    tok, _, _, ex = fit_and_encode("phi3", family_conversation(True))
    text = tok.apply_chat_template(family_conversation(True), tokenize=False)
    assert text.endswith("apple apple apple<|end|>\n<|endoftext|>")
    assert ex.input_ids == tok(text, add_special_tokens=False).input_ids  # nothing appended
    assert taught(tok, ex) == ["Paris is the capital of France.<|end|>",
                               "apple apple apple<|end|>", "<|endoftext|>"]


@pytest.mark.parametrize("name", ["gemma2", "mistral_v0_3"])
def test_inference_prompt_folds_the_system_message_with_a_warning(name):
    _, tok = build_family(name)
    conv = family_conversation(True)[:4]  # system, user, answer, user
    with pytest.warns(TemplateNote, match="system message folded"):
        ids = prompt_ids(tok, conv)
    assert "You are a helpful assistant. Be brief.\n\nWhat is the capital" in tok.decode(ids)


# -- stopping -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_generation_stops_at_every_eos_of_the_generation_config(name):
    """Each id of the family's generation-config eos list ends a reply at once; an id not in
    the list (and not the tokenizer's eos) does not."""
    model, tok = build_family(name)
    calls = []
    forced = {}

    def force(module, args, out):
        calls.append(1)
        out = out.clone()
        out[..., forced["id"]] = 1e4
        return out

    model.get_output_embeddings().register_forward_hook(force)
    conv = [{"role": "user", "content": "Name a colour."}]
    listed = model.generation_config.eos_token_id
    assert len(listed) == len(FAMILY_SPECS[name].generation_eos)
    for eid in listed:
        forced["id"], calls[:] = eid, []
        generate_chat(model, tok, [conv], max_new_tokens=4)
        assert len(calls) == 1, (name, tok.convert_ids_to_tokens(eid))
    model.generation_config.eos_token_id = [e for e in listed if e == tok.eos_token_id]
    for eid in (e for e in listed if e != tok.eos_token_id):
        forced["id"], calls[:] = eid, []
        generate_chat(model, tok, [conv], max_new_tokens=4)
        assert len(calls) == 4


# -- loading, training, save / reload / merge -----------------------------------------------------
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": family_conversation(system=True)}) + "\n"
                            for _ in range(4)))
    return path


def train_family(folder, tmp_path, method: str, quant: bool = False):
    options = {"ia3": {}, "lora": {"r": 4}, "dora": {"r": 4}}[method]
    model = {"name": str(folder)}
    if quant:
        model["quantization"] = {"type": "nf4"}
    cfg = build_config({
        "output_dir": str(tmp_path / f"run-{method}"), "model": model,
        "adapter": {"method": method, **options},
        "data": {"train": str(chat_file(tmp_path)), "max_length": 256},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 0.3 if method == "ia3" else 5e-2,
                  "warmup_ratio": 0.0}})
    return train(cfg, quiet=True)


IDS = torch.tensor([[3, 40, 200, 17, 301, 99, 5]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("name", FAMILIES)
def test_train_save_reload_merge(name, method, family_folder, tmp_path):
    """From the family's HF folder: two steps of training on a 2-turn chat with a system
    message, the adapter reloads into a fresh base with equal logits, and the merged folder
    gives them too (transformers loading it)."""
    from transformers import AutoModelForCausalLM

    folder = family_folder(name)
    result = train_family(folder, tmp_path, method)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    base, _ = load_model(str(folder))
    before = logits(base)
    load_adapter(base, result.adapter_dir)
    adapted = logits(base)
    assert (adapted - before).abs().max() > 1e-4  # training moved the model
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    leaves = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    if method == "ia3":  # every default target adapted: Phi-3's k/v rows of qkv_proj too
        expected = ({"qkv_proj"} if "qkv_proj" in leaves else {"k_proj", "v_proj"}) | {"down_proj"}
        assert set(saved["target_modules"]) == expected
    merged = merge_folder(folder, read_adapters([result.adapter_dir], None), tmp_path / "merged")
    assert merged.merged_modules > 0
    again = AutoModelForCausalLM.from_pretrained(merged.out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(again), adapted, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_qlora_loads_every_family_and_trains(name, family_folder, tmp_path):
    """The 4-bit loader builds every family (Gemma's scaled embeddings, rotary tables from
    its own config) with the logits of the full model whose linear weights took the NF4
    round trip; LoRA trains on it."""
    from loratune.quant.nf4 import dequantize_4bit, quantize_4bit

    folder = family_folder(name)
    q, _ = load_model(ModelConfig(name=str(folder), quantization=QuantConfig(type="nf4")))
    full, _ = load_model(str(folder))
    skip = full.get_output_embeddings()
    with torch.no_grad():
        for mod in full.modules():
            if isinstance(mod, torch.nn.Linear) and mod is not skip:
                mod.weight.copy_(dequantize_4bit(quantize_4bit(mod.weight, 64, "nf4", True)))
    torch.testing.assert_close(logits(q), logits(full), atol=1e-4, rtol=0)
    result = train_family(folder, tmp_path, "lora", quant=True)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", FAMILIES)
def test_planner_counts_equal_the_real_model(name, family_folder):
    """Real head_dim (Qwen3, Gemma), q/k/v biases (Qwen2), extra norms (Gemma 2/3, q/k norms),
    tied or untied heads, GQA, fused layers (Phi-3): parameters and LoRA parameters exact."""
    shape = resolve_shape(str(family_folder(name)))
    model, _ = build_family(name)
    assert shape.params == sum(p.numel() for p in model.parameters())
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    assert shape.lora_params(4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- fused layers (Phi-3) -------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in FAMILIES if FAMILY_SPECS[n].fused])
def test_ia3_scales_exactly_the_k_and_v_rows_of_qkv_proj(name, tmp_path):
    """IA³'s default k_proj/v_proj targets are the k and v rows of Phi-3's qkv_proj: q rows
    keep scale 1 (no gradient, also under weight decay), the file loads in PEFT."""
    model, tok = build_family(name)
    add_adapter(model, IA3Config())
    attn = model.model.layers[0].self_attn.qkv_proj
    ad = attn.adapters["default"]
    q_rows = model.config.num_attention_heads * model.model.layers[0].self_attn.head_dim
    assert not ad.kept[:q_rows].any() and ad.kept[q_rows:].all()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert ad.ia3_l.grad[:q_rows].abs().max() == 0 and ad.ia3_l.grad[q_rows:].abs().max() > 0
    with torch.no_grad():  # weight decay's kind of change: reaches the q rows too
        for n, p in model.named_parameters():
            if n.endswith("ia3_l"):
                p.mul_(0.5)
    ours = logits(model)
    save_adapter(model, tmp_path / "ia3")
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(build_family(name)[0], tmp_path / "ia3")
    torch.testing.assert_close(logits(theirs), ours, atol=1e-5, rtol=0)
    fresh, _ = build_family(name)
    with torch.no_grad():  # the same model by hand: k and v rows halved, q rows as they were
        for layer in fresh.model.layers:
            layer.self_attn.qkv_proj.weight[q_rows:] *= 0.5
            layer.mlp.down_proj.weight.mul_(0.5)
    torch.testing.assert_close(logits(fresh), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_rank_methods_refuse_parts_of_a_fused_layer(method):
    model, _ = build_family("phi3")
    cfg = LoraConfig(
        method=method, r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])
    with pytest.raises(AdapterError, match=r"names gate_proj, k_proj, q_proj, up_proj, v_proj, "
                       r"which Phi3ForCausalLM fuses into one weight \(gate_up_proj = \[gate_proj"
                       r" \| up_proj\]; qkv_proj = \[q_proj \| k_proj \| v_proj\]\); " + method
                       + r" cannot adapt some rows.*Target gate_up_proj, qkv_proj"):
        add_adapter(model, cfg)
    assert not any(p.requires_grad for p in model.parameters())
    add_adapter(model, cfg.model_copy(update={"target_modules": ["qkv_proj", "o_proj"]}), "ok")


# -- from a GGUF file -----------------------------------------------------------------------------
# Every family's GGUF loads with the folder's logits (tests/export/test_gguf_families.py); train
# from one per kind of setting models/gguf_config.py puts back.
GGUF_READABLE = ["qwen2_5", "mistral_v0_3", "phi3", "llama3_1", "qwen3", "gemma2", "phi4_mini"]


@pytest.mark.parametrize("name", GGUF_READABLE)
def test_train_from_a_family_gguf(name, family_folder, tmp_path):
    """`model.name: file.gguf` loads the family with the folder's logits and trains on it."""
    pytest.importorskip("gguf")
    from loratune.export.gguf_file import write_gguf

    folder = family_folder(name)
    path = write_gguf(folder, tmp_path / f"{name}.gguf", "f32")
    from_gguf, tok = load_model(str(path))
    from_folder, _ = load_model(str(folder))
    torch.testing.assert_close(logits(from_gguf), logits(from_folder), atol=1e-4, rtol=0)
    assert tok.chat_template and tok.eos_token == FAMILY_SPECS[name].eos
    result = train_family(path, tmp_path, "lora")
    assert all(math.isfinite(h["loss"]) for h in result.history)
    load_adapter(from_gguf, result.adapter_dir)
    assert (logits(from_gguf) - logits(from_folder)).abs().max() > 1e-4


def test_a_regex_naming_parts_of_a_fused_layer_is_not_dropped():
    """A regex target is read against the unfused names too: '.*(q_proj|o_proj)' on Phi-3 is
    refused for LoRA (it would otherwise adapt o_proj alone) and selects q rows for IA³."""
    model, _ = build_family("phi3")
    with pytest.raises(AdapterError, match=r"names q_proj, which Phi3ForCausalLM fuses"):
        add_adapter(model, LoraConfig(r=4, target_modules=r".*\.(q_proj|o_proj)"))
    targets = add_adapter(model, IA3Config(target_modules=r".*\.(v_proj|down_proj)"))
    assert sorted(t.rsplit(".", 1)[-1] for t in targets) == ["down_proj", "down_proj",
                                                             "qkv_proj", "qkv_proj"]
    kept = model.model.layers[0].self_attn.qkv_proj.adapters["default"].kept.view(-1)
    assert kept.sum() == model.config.num_key_value_heads * 8 and kept[-1] and not kept[0]
