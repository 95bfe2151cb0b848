"""The aggregation rules on hand-made LoRA states: which reproduce the mean of the products."""

import pytest
import torch

from loratune.federated.aggregate import (A_SUFFIX, B_SUFFIX, ClientUpdate, aggregate,
                                          mean_deltas, exchanged_keys)

P = "base_model.model.layers.0.q_proj."
OUT, IN = 12, 10


def lora_update(seed: int, rank: int, weight: float, a: torch.Tensor | None = None,
                scale: float = 2.0) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    a = a if a is not None else torch.randn(rank, IN, generator=g)
    b = torch.randn(OUT, rank, generator=g)
    return ClientUpdate({P + A_SUFFIX: a, P + B_SUFFIX: b}, weight, {P: scale})


def product(state: dict, scale: float = 2.0) -> torch.Tensor:
    return scale * state[P + B_SUFFIX] @ state[P + A_SUFFIX]


def test_ffa_reproduces_mean_delta_and_fedavg_does_not():
    shared_a = torch.randn(4, IN, generator=torch.Generator().manual_seed(9))
    updates = [lora_update(i, 4, w, shared_a) for i, w in enumerate([1.0, 3.0, 6.0])]
    want = sum(u.weight * product(u.state) for u in updates) / 10.0  # by hand, not the helper
    torch.testing.assert_close(mean_deltas(updates)[P], want, atol=1e-5, rtol=0)
    glob = {P + A_SUFFIX: shared_a, P + B_SUFFIX: torch.zeros(OUT, 4)}
    torch.testing.assert_close(product(aggregate("ffa", updates, glob)), want, atol=1e-5, rtol=0)
    # FedAvg of independently trained A and B: mean(B)·mean(A) is far from mean(B·A).
    free = [lora_update(i, 4, w) for i, w in enumerate([1.0, 3.0, 6.0])]
    err = (product(aggregate("fedavg", free, glob)) - mean_deltas(free)[P]).norm()
    assert err > 0.3 * mean_deltas(free)[P].norm()


def test_svd_is_exact_at_full_rank_and_best_within_truncation():
    updates = [lora_update(1, 2, 1.0), lora_update(2, 4, 2.0)]  # heterogeneous client ranks
    want = mean_deltas(updates)[P]
    glob = {P + A_SUFFIX: torch.zeros(6, IN), P + B_SUFFIX: torch.zeros(OUT, 6)}
    exact = aggregate("svd", updates, glob, rank=6, scales={P: 0.5})
    assert exact[P + A_SUFFIX].shape == (6, IN)
    torch.testing.assert_close(product(exact, 0.5), want, atol=1e-5, rtol=0)
    cut = aggregate("svd", updates, glob, rank=3, scales={P: 0.5})
    tail = torch.linalg.svdvals(want)[3:]
    err = (product(cut, 0.5) - want).norm()
    assert err == pytest.approx(float(tail.norm()), rel=1e-4)  # Eckart–Young: nothing better


def test_fedavg_weights_by_examples_and_fedsa_keeps_b_home():
    u1 = ClientUpdate({"x": torch.tensor([0.0]), P + B_SUFFIX: torch.ones(1)}, 1.0)
    u2 = ClientUpdate({"x": torch.tensor([4.0]), P + B_SUFFIX: torch.zeros(1)}, 3.0)
    assert float(aggregate("fedavg", [u1, u2], {})["x"]) == pytest.approx(3.0)
    assert exchanged_keys("fedsa", ["x", P + A_SUFFIX, P + B_SUFFIX]) == ["x", P + A_SUFFIX]
    assert exchanged_keys("ffa", ["x", P + A_SUFFIX, P + B_SUFFIX]) == ["x", P + B_SUFFIX]
    only_a = [ClientUpdate({"x": u.state["x"]}, u.weight) for u in (u1, u2)]
    glob = {"x": torch.zeros(1), P + B_SUFFIX: torch.full((1,), 7.0)}
    out = aggregate("fedsa", only_a, glob)
    assert float(out["x"]) == pytest.approx(3.0) and float(out[P + B_SUFFIX]) == 7.0


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="federated.aggregation: 'median'"):
        aggregate("median", [lora_update(0, 2, 1.0)], {})
