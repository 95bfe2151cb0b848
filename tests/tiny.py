"""Tiny random models for fast tests (real transformers architectures, a few thousand params)."""

import contextlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab: int = 128, tie: bool = False, bias: bool = False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias,
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    return model


def randomize_lora(model, seed: int = 1, scale: float = 0.2):
    """Give every LoRA B a nonzero value, so adapters change the output."""
    from loratune.adapters import AdaptedLinear

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, AdaptedLinear):
                for ad in mod.adapters.values():
                    ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * scale)
    return model


def unigram_llama(logits: dict[int, float], vocab: int, seed: int = 0):
    """A tiny Llama whose next-token logits are the same at every position: `logits` for the
    ids given, 0 for the rest (the output layer's weight is zero and its bias holds them). Its
    log-likelihoods and greedy answers can be worked out by hand."""
    model = tiny_llama(seed=seed, vocab=vocab)
    head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for token, value in logits.items():
            head.bias[token] = value
    model.lm_head = head
    return model


def write_pairs(path, words, rejected: str):
    """A preference file: "Repeat the word W" -> chosen "W W W", rejected `rejected` with
    {w} filled in."""
    import json

    rows = [{"prompt": f"Repeat the word {w}", "chosen": f"{w} {w} {w}",
             "rejected": rejected.format(w=w)} for w in words]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@contextlib.contextmanager
def chat_template(tokenizer, template: str | None):
    """`tokenizer` with another chat template for the block (a shared fixture is restored)."""
    old = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template = old


def loss_grads(model, named: dict, ids) -> dict:
    """Gradients of the LM loss on `ids`, by file key (`named`: file key -> parameter); the
    PEFT-oracle tests compare these between our adapter and PEFT's."""
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {k: p.grad.clone() for k, p in named.items() if p.requires_grad}


def train_tiny(tmp_path, data_file, tokenizer, adapter: dict):
    """A 12-step run of `adapter` (the config's adapter section) on a tiny Llama over
    conftest's `data_file`, checked to learn (the last two losses' mean below the first two's
    by 0.1) and to save an adapter that, loaded on a fresh base, gives the trained model's
    logits. Returns (the trained model, train()'s result)."""
    from loratune.adapters import load_adapter
    from loratune.config import build_config
    from loratune.train import train

    cfg = build_config({
        "output_dir": str(tmp_path / "run"), "adapter": adapter,
        "data": {"train": str(data_file), "max_length": 64},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 2e-2, "warmup_ratio": 0.0},
    })
    model = tiny_llama(vocab=len(tokenizer))
    result = train(cfg, model=model, tokenizer=tokenizer, quiet=True)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    ids = torch.tensor([[5, 900, 17, 4000, 31]])
    fresh = tiny_llama(vocab=len(tokenizer))  # the unchanged base
    load_adapter(fresh, result.adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)
    return model, result
