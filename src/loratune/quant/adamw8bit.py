"""AdamW with 8-bit moments: blockwise dynamic-map codes, updated in fp32 a chunk at a time.

Each moment of a large parameter is stored as one uint8 code per value plus one fp32 absmax
per block of 256 (bitsandbytes' blockwise layout; the first moment with the signed dynamic
map, the second, non-negative, with the unsigned one): ~2 bytes of state per parameter
instead of 8. Small tensors (biases, norms, < `min_8bit_size` values) keep fp32 moments, where
quantization would save nothing and cost accuracy.

`state_device="cpu"` keeps the states in host memory (pinned with CUDA) and moves each one to
the parameter's device only for its update: the "paged"/offloaded option for GPU runs.
"""

from __future__ import annotations

import math

import torch

from loratune.quant.nf4 import dequantize_blockwise_8bit, quantize_blockwise_8bit

CHUNK = 2**20  # values updated per fp32 pass: bounds the temporaries of a large tensor


class AdamW8bit(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, blocksize: int = 256,
                 min_8bit_size: int = 4096, state_device: str | None = None):
        if blocksize & (blocksize - 1) or not 64 <= blocksize <= 4096:
            raise ValueError(f"blocksize {blocksize}: expected a power of two from 64 to 4096")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.blocksize, self.min_8bit_size = blocksize, min_8bit_size
        self.state_device = None if state_device is None else torch.device(state_device)

    def _home(self, t: torch.Tensor) -> torch.Tensor:
        if self.state_device is None or t.device == self.state_device:
            return t
        t = t.to(self.state_device)
        return t.pin_memory() if torch.cuda.is_available() else t

    def _init_state(self, p: torch.Tensor) -> dict:
        n = p.numel()
        if n < self.min_8bit_size:
            return {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                    "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
        blocks = math.ceil(n / self.blocksize)
        zeros = dict(dtype=torch.uint8, device=p.device)
        # code 127 of the signed map and code 0 of the unsigned one are exactly 0.0
        return {"step": torch.zeros(()),
                "exp_avg_code": torch.full((n,), 127, **zeros),
                "exp_avg_absmax": torch.zeros(blocks, device=p.device),
                "exp_avg_sq_code": torch.zeros(n, **zeros),
                "exp_avg_sq_absmax": torch.zeros(blocks, device=p.device)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype and leaves the rest: put every
        # tensor back as saved (uint8 codes, fp32 scales) and where the states live.
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, saved in state_dict["state"].items():
            state = self.state[params[int(idx)]]
            for key, value in saved.items():
                if torch.is_tensor(value):
                    state[key] = self._home(value.to(params[int(idx)].device).clone())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update({k: self._home(v) for k, v in self._init_state(p).items()})
                state["step"] = state["step"] + 1  # not in place: state dicts share it
                if "exp_avg" in state:
                    self._update_fp32(p, state, group)
                else:
                    self._update_8bit(p, state, group)
        return loss

    def _update_fp32(self, p: torch.Tensor, state: dict, group: dict) -> None:
        dev = p.device
        m, v = state["exp_avg"].to(dev), state["exp_avg_sq"].to(dev)
        _adamw(p.view(-1), p.grad.reshape(-1).float(), m.view(-1), v.view(-1),
               int(state["step"]), group)
        if m is not state["exp_avg"]:
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)

    def _update_8bit(self, p: torch.Tensor, state: dict, group: dict) -> None:
        dev, bs = p.device, self.blocksize
        flat, grad = p.view(-1), p.grad.reshape(-1)
        step = int(state["step"])
        names = ("exp_avg_code", "exp_avg_absmax", "exp_avg_sq_code", "exp_avg_sq_absmax")
        codes_m, max_m, codes_v, max_v = (state[k].to(dev) for k in names)
        for start in range(0, flat.numel(), CHUNK):  # CHUNK is a multiple of the block size
            stop = min(start + CHUNK, flat.numel())
            b0, b1 = start // bs, -(-stop // bs)
            m = dequantize_blockwise_8bit(codes_m[start:stop], max_m[b0:b1], bs, signed=True)
            v = dequantize_blockwise_8bit(codes_v[start:stop], max_v[b0:b1], bs, signed=False)
            _adamw(flat[start:stop], grad[start:stop].float(), m, v, step, group)
            codes_m[start:stop], max_m[b0:b1] = quantize_blockwise_8bit(m, bs, signed=True)
            codes_v[start:stop], max_v[b0:b1] = quantize_blockwise_8bit(v, bs, signed=False)
        for k, t in zip(names, (codes_m, max_m, codes_v, max_v)):
            if t is not state[k]:
                state[k].copy_(t)


def _adamw(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
           group: dict) -> None:
    """One decoupled-weight-decay Adam update in fp32, in place on p, m and v."""
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
    update = (m / denom).mul_(lr / bias1)
    if wd:
        p.mul_(1 - lr * wd)
    p.sub_(update.to(p.dtype))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by all state tensors of an optimizer (for memory reports)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if isinstance(t, torch.Tensor))
