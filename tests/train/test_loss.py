import torch

from loratune.train.loss import causal_lm_loss
from tiny import tiny_llama


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, 20:] = -100
    return {"input_ids": ids, "labels": labels}


def test_matches_transformers_loss_and_grads():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(True)
    batch = _batch()
    ref = model(**batch).loss
    ref.backward()
    ref_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    for chunk in (1024, 5):  # single block, and chunks recomputed in backward
        total, n = causal_lm_loss(model, batch, chunk=chunk)
        assert n == int((batch["labels"][:, 1:] != -100).sum())
        torch.testing.assert_close(total / n, ref, atol=1e-5, rtol=1e-5)
        (total / n).backward()
        torch.testing.assert_close(model.lm_head.weight.grad, ref_grad, atol=1e-5, rtol=1e-4)
        model.zero_grad()


def test_packed_loss_equals_separate_losses():
    from loratune.data import Example, collate

    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    exs = [Example(list(range(3, 12)), [-100] * 4 + list(range(7, 12))),
           Example(list(range(50, 56)), [-100] * 2 + list(range(52, 56)))]
    packed_sum, packed_n = causal_lm_loss(model, collate([exs], 0, packed=True))
    total, count = 0.0, 0
    for ex in exs:
        s, n = causal_lm_loss(model, collate([[ex]], 0, packed=False))
        total, count = total + s, count + n
    assert packed_n == count
    torch.testing.assert_close(packed_sum, total, atol=1e-5, rtol=1e-5)
