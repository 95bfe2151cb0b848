"""Prompt/prefix tuning: PEFT parity both ways, the loss path, training, disable, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import StaticCache

from loratune.adapters import AdapterError, add_adapter, delete_adapter, load_adapter, save_adapter
from loratune.adapters.prefix import attach_prefix, peft_config as prefix_json
from loratune.adapters.prompt import attach_prompt, peft_config as prompt_json
from loratune.config import PrefixConfig, PromptConfig
from loratune.train.loss import causal_lm_loss
from tiny import tiny_llama

peft = pytest.importorskip("peft")

# right-padded (training) and left-padded (generation) batches; the second row has 3 tokens
IDS = torch.tensor([[5, 9, 17, 40, 31, 8], [7, 3, 22, 0, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
LEFT_IDS, LEFT_MASK = torch.tensor([[5, 9, 17, 40, 31, 8], [0, 0, 0, 7, 3, 22]]), MASK.flip(1)
# case: attach, peft_config, our config, host attribute, PEFT's config
CASES = {
    "prompt": (attach_prompt, prompt_json, PromptConfig(num_virtual_tokens=4), "prompt_encoder",
               lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prefix": (attach_prefix, prefix_json, PrefixConfig(num_virtual_tokens=3), "prefix_encoder",
               lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prefix_mlp": (attach_prefix, prefix_json, PrefixConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24), "prefix_encoder",
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                        prefix_projection=True)),
}
PEFT_SKIP = {"prompt": 4, "prefix": 0, "prefix_mlp": 0}  # PEFT's logits include virtual positions


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def ours(case, seed=1):
    """tiny_llama (GQA: 4 heads, 2 kv heads) with a randomized adapter; returns (model, host)."""
    attach, _, cfg, attr, _ = CASES[case]
    model = tiny_llama()
    attach(model, cfg, "default")
    randomize(getattr(model, attr), seed)
    return model, getattr(model, attr)


def real_logits(model, skip=0):
    """Logits of the real tokens of the right-padded batch, [n_real, vocab]."""
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits[:, skip:][MASK.bool()]


def greedy(model, ids=LEFT_IDS, mask=LEFT_MASK):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


def greedy_no_cache(model, ids, steps=8):
    """Greedy decoding of one unpadded row by a full forward per step: no KV cache involved."""
    scores = []
    with torch.no_grad():
        for _ in range(steps):
            scores.append(model(input_ids=ids).logits[:, -1])
            ids = torch.cat([ids, scores[-1].argmax(-1, keepdim=True)], 1)
    return ids[:, -steps:], torch.stack(scores, 1)


@pytest.mark.parametrize("case", CASES)
def test_ours_loads_in_peft_same_logits_and_generate(tmp_path, case):
    model, host = ours(case)
    _, to_json, cfg, attr, _ = CASES[case]
    # what io.py saves: saved_tensors if the host has it (prefix: the MLP's output)
    tensors = getattr(host, "saved_tensors", host.file_tensors)("default", attr)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(to_json(model, cfg)))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    mine = real_logits(model)  # the adapter does something:
    assert mine.shape == (9, 128) and (mine - real_logits(tiny_llama())).abs().max() > 0.05
    assert (mine - real_logits(theirs, PEFT_SKIP[case])).abs().max() < 1e-5
    tokens, scores = greedy(model)
    # PEFT's full forward is the oracle for our cached decoding. Not PEFT's generate(): under
    # transformers 5.24 (cache argument renamed) PEFT 0.21's cached prompt-learning decoding
    # departs from its own full forward after the first token.
    peft_tokens, peft_scores = greedy_no_cache(theirs, LEFT_IDS[:1])
    assert tokens.shape == (2, 8) and torch.equal(tokens[:1], peft_tokens)
    assert (scores[0] - peft_scores[0]).abs().max() < 1e-5  # the unpadded row, every step
    # Left padding changes nothing: the padded row equals that row generated alone.
    alone_tokens, alone_scores = greedy(model, LEFT_IDS[1:, 3:], LEFT_MASK[1:, 3:])
    assert torch.equal(tokens[1:], alone_tokens)
    assert (scores[1] - alone_scores[0]).abs().max() < 1e-5
    # The load target holds the same prefixes; once taken (MLP bypassed) logits are unchanged.
    assert torch.equal(host.file_tensors("default", attr)["prompt_embeddings"],
                       tensors["prompt_embeddings"])
    assert (real_logits(model) - mine).abs().max() < 1e-6


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_loads_in_ours_and_configs_agree(tmp_path, case):
    _, to_json, cfg, attr, peft_cfg = CASES[case]
    pm = peft.get_peft_model(tiny_llama(), peft_cfg())
    randomize(pm.prompt_encoder, 4)
    expected = real_logits(pm, PEFT_SKIP[case])
    pm.save_pretrained(tmp_path / "peft")
    file = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    model, host = ours(case, seed=9)
    targets = host.file_tensors("default", attr)
    assert {k: v.shape for k, v in file.items()} == {k: v.shape for k, v in targets.items()}
    with torch.no_grad():
        for key, tensor in file.items():
            targets[key].copy_(tensor)
    assert (real_logits(model) - expected).abs().max() < 1e-5
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    mine = to_json(model, cfg)
    for key in ("peft_type task_type num_virtual_tokens token_dim num_layers prefix_projection "
                "num_transformer_submodules num_attention_heads prompt_tuning_init").split():
        assert mine.get(key) == written.get(key), key


def test_saving_through_io_and_delete(tmp_path):
    """io.py's add/save/load path: PEFT reads our folder, we read it back, delete unhooks."""
    for case in ("prompt", "prefix_mlp"):
        add_adapter(model := tiny_llama(), CASES[case][2], "tuned")
        randomize(getattr(model, CASES[case][3]), 2)
        mine = real_logits(model)
        save_adapter(model, tmp_path / case, "tuned")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / case)
        assert (mine - real_logits(theirs, PEFT_SKIP[case])).abs().max() < 1e-5
        load_adapter(fresh := tiny_llama(), tmp_path / case)
        assert (real_logits(fresh) - mine).abs().max() < 1e-5
        delete_adapter(fresh, "default")
        assert not hasattr(fresh, CASES[case][3])
        assert torch.equal(real_logits(fresh), real_logits(tiny_llama()))


@pytest.mark.parametrize("case", ["prompt", "prefix"])
def test_disabled_or_inactive_is_the_base_model(case):
    (model, host), base = ours(case), tiny_llama()
    host.active = {}
    assert torch.equal(real_logits(model), real_logits(base))
    host.active, host.disabled = {"default": 1.0}, True
    assert torch.equal(real_logits(model), real_logits(base))
    assert torch.equal(greedy(model)[1], greedy(base)[1])  # every step's scores


@pytest.mark.parametrize("case", CASES)
def test_training_moves_only_the_adapter_and_lowers_the_loss(case):
    model, host = ours(case)
    decoder_out = model.get_decoder()(input_ids=IDS, attention_mask=MASK, use_cache=False)
    assert decoder_out.last_hidden_state.shape == (2, 6, 32)  # virtual positions stripped
    with torch.no_grad():  # a random base's logits are near-uniform; give the adapter room
        model.lm_head.weight.mul_(30)
    model.requires_grad_(False)
    host.adapters["default"].requires_grad_(True)
    batch = {"input_ids": IDS, "attention_mask": MASK, "labels": IDS.masked_fill(MASK == 0, -100)}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.2)
    losses = []
    for _ in range(15):
        total, n = causal_lm_loss(model, batch)
        opt.zero_grad()
        (total / n).backward()
        opt.step()
        losses.append((total / n).item())
    assert n == 7 and losses[-1] < losses[0] - 1.0, losses
    for name, p in model.named_parameters():  # gradients reach the adapter, nothing else
        trained = ".adapters.default." in name
        assert (p.grad is not None and p.grad.abs().sum() > 0) if trained else p.grad is None


def test_text_init_equals_peft(smol_tokenizer):
    text, vocab = "Classify the sentiment", len(smol_tokenizer)  # 4 tokens, repeated then cut
    model = tiny_llama(vocab=vocab)
    attach_prompt(model, PromptConfig(num_virtual_tokens=10, prompt_tuning_init="text",
                                      prompt_tuning_init_text=text), "default", smol_tokenizer)
    pm = peft.get_peft_model(tiny_llama(vocab=vocab), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=10, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=smol_tokenizer.name_or_path))
    mine = model.prompt_encoder.adapters["default"].embedding.weight
    ids = smol_tokenizer(text)["input_ids"]
    assert torch.equal(mine, model.get_input_embeddings().weight[(ids * 3)[:10]])
    assert torch.equal(mine, pm.prompt_encoder["default"].embedding.weight)


def test_bad_input_is_refused():
    text_cfg = PromptConfig(prompt_tuning_init="text", prompt_tuning_init_text="hello")
    model = tiny_llama()
    with pytest.raises(AdapterError, match="prompt_tuning_init: text needs the tokenizer"):
        attach_prompt(model, text_cfg, "default")
    assert not hasattr(model, "prompt_encoder")  # nothing half-made
    with pytest.raises(AdapterError, match="needs a transformers decoder-only model"):
        attach_prefix(torch.nn.Sequential(torch.nn.Linear(4, 4)), PrefixConfig(), "default")
    model, host = ours("prefix")
    cache = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(AdapterError, match="supports transformers' DynamicCache.*StaticCache"):
        model(input_ids=IDS, attention_mask=MASK, past_key_values=cache)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(AdapterError, match="prefix tuning cannot train with gradient checkpoint"):
        model.train()(input_ids=IDS, attention_mask=MASK)
    model.gradient_checkpointing_disable()
    attach_prefix(model.eval(), PrefixConfig(num_virtual_tokens=2), "other")
    host.active = {"default": 1.0, "other": 1.0}
    with pytest.raises(AdapterError, match=r"prefix adapters \['default', 'other'\] are active"):
        real_logits(model)
    host.active = {"other": 0.5}
    with pytest.raises(AdapterError, match="weight 0.5; virtual tokens cannot be weighted"):
        real_logits(model)
    with pytest.raises(AdapterError, match="already holds an adapter named 'other'"):
        attach_prefix(model, PrefixConfig(), "other")
