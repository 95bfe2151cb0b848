"""train.offload_activations with gradient checkpointing: the checkpointed layers' inputs go to
host memory, weights never do, and loss and adapter gradients equal the plain path (fp32)."""

import pytest
import torch

from loratune.adapters import add_adapter
from loratune.adapters.fused_lora import set_fused_lora
from loratune.config import LoraConfig
from loratune.train.loop import set_checkpointing
from loratune.train.offload import HostOffload
from tiny import randomize_lora, tiny_llama


def _loss_and_grads(checkpointing: bool, offload: bool, fused: bool = False):
    model = tiny_llama()
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1), "default")
    randomize_lora(model)
    set_fused_lora(model, fused)
    set_checkpointing(model, checkpointing)
    model.train()
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(3))
    # min_bytes=0: on this tiny model every saved activation counts; pinning needs CUDA.
    hooks = HostOffload(model, min_bytes=0) if offload else None
    torch.manual_seed(9)
    with hooks or torch.enable_grad():
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, hooks


@pytest.mark.parametrize("fused", [False, True])
def test_checkpointing_with_host_offload_equals_the_plain_path(fused):
    loss_ref, grads_ref, _ = _loss_and_grads(False, False)
    loss, grads, hooks = _loss_and_grads(True, True, fused)
    assert loss == pytest.approx(loss_ref, abs=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) == 28
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], atol=1e-6, rtol=1e-5, msg=k)
    # Both decoder layers' inputs [3, 10, 32] were kept as host copies for the recomputation.
    assert hooks.copied.count((3, 10, 32)) >= 2, hooks.copied


def test_weights_and_their_views_are_not_copied():
    _, _, hooks = _loss_and_grads(False, True)
    # Frozen weights saved for input gradients (transposed views among them) stay put;
    # save_on_cpu would copy each to the host on every step. Activations have a batch (3),
    # sequence (10) or token (30) dimension; no weight of this model has one.
    assert len(hooks.copied) > 20
    acts = [s for s in hooks.copied if s]  # and a 0-dim loss scalar
    assert len(acts) == len(hooks.copied) - 1 and all({3, 10, 30} & set(s) for s in acts), acts
    everything = HostOffload(None, min_bytes=0)  # no model given: nothing is known a weight
    with everything:
        tiny_llama()(torch.randint(0, 128, (3, 10))).logits.sum()
    assert not all({3, 10, 30} & set(s) for s in everything.copied if s)


def test_small_tensors_stay_on_the_device():
    lin = torch.nn.Linear(8, 8)
    hooks, every = HostOffload(lin), HostOffload(lin, min_bytes=0)
    with hooks:
        small = lin(torch.randn(4, 8, requires_grad=True)).pow(2).sum()
    with every:
        lin(torch.randn(4, 8, requires_grad=True)).pow(2).sum()
    assert hooks.copied == [] and every.copied == [(4, 8), (4, 8)]
    small.backward()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host copies need CUDA; "
                    "no GPU here")
def test_cuda_offload_keeps_pinned_host_copies_and_equal_gradients():
    from loratune.train.offload import activation_offload

    model = tiny_llama().cuda()
    add_adapter(model, LoraConfig(r=4), "default")
    randomize_lora(model)
    set_checkpointing(model, True)
    model.train()
    ids = torch.randint(0, 128, (3, 10), device="cuda")
    grads = []
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        ctx = activation_offload(on, torch.device("cuda"), model)
        if on:
            assert isinstance(ctx, HostOffload) and ctx.pin_memory
            ctx.min_bytes = 0
        with ctx:
            loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert ctx.copied.count((3, 10, 32)) >= 2
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5, msg=k)
