"""Estimate the memory of one training step: weights, adapter, optimizer, activations.

The activation model counts what a Llama decoder layer saves for backward, per token, in the
activation dtype (measured with saved-tensor hooks on a real transformers layer, SDPA
attention, which keeps no seq x seq matrix):
    2h   the two RMSNorm inputs (residual stream)
    2h   the two normed outputs, shared by q/k/v and by gate/up
    h+2kv  q, k, v after RoPE, kept by attention
    h    attention output, the input of o_proj
    4i   gate, SiLU(gate), up and their product (the input of down_proj)
    7r   each LoRA's x @ A^T
With gradient checkpointing each layer keeps only its input (h per token), and one layer's
activations exist at a time while it is recomputed. Backward adds a working set of about
(2h + 3i) per token for the gradients flowing through the layer being differentiated.

On several GPUs (`gpus`, `parallel`) the figures are per GPU. DDP replicates everything and adds
a bucket copy of the trainable gradients. FSDP (loratune's wrapping: one unit per decoder layer,
the rest in the root unit) shards parameters, gradients and optimizer states over the GPUs, but
holds the root (embeddings, head, norms) gathered through forward and backward, and up to two
gathered layers (the one running and the one prefetched). 4-bit codes and scales are sharded
too (Linear4bit.shardable).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, fields

from loratune.plan.shapes import ModelShape

BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
METHODS = ("full", "lora", "qlora")
PARALLEL = ("ddp", "fsdp")
# Process RSS of python + torch + transformers + a tokenizer (measured here), or the CUDA context
OVERHEAD = {"cpu": 0.40 * 2**30, "cuda": 0.60 * 2**30}
# torch's compiler stack loads Triton's native library when Triton is installed (every CUDA
# setup, and CPU ones with loratune[test]): ~80 MiB more resident on CPU, measured.
TRITON_RESIDENT = 80 * 2**20


def _runtime_overhead(device: str) -> int:
    kind = device.split(":")[0]
    extra = TRITON_RESIDENT if kind == "cpu" and importlib.util.find_spec("triton") else 0
    return int(OVERHEAD.get(kind, OVERHEAD["cuda"]) + extra)


@dataclass(frozen=True)
class Setup:
    method: str = "qlora"
    batch: int = 1
    seq: int = 512
    rank: int = 16
    dtype: str = "bf16"            # base weights (full/lora) or compute dtype (qlora)
    optimizer: str = "adamw"       # adamw | adamw8bit
    checkpointing: bool = True
    labelled_fraction: float = 1.0
    loss_chunk: int = 1024         # 0: full logits as transformers computes them
    blocksize: int = 64
    double_quant: bool = True
    device: str = "cuda"
    gpus: int = 1                  # data-parallel processes; figures stay per GPU
    parallel: str = "ddp"          # ddp (replicate the base) | fsdp (shard it)
    experts: bool = False          # LoRA on the routed experts too ('experts' in target_modules)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}': expected one of {', '.join(METHODS)}")
        if self.dtype not in BYTES:
            raise ValueError(f"dtype '{self.dtype}': expected fp32, bf16 or fp16")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ValueError(f"optimizer '{self.optimizer}': expected adamw or adamw8bit")
        if min(self.batch, self.seq, self.rank) < 1:
            raise ValueError("batch, seq and rank must be positive")
        if self.gpus < 1:
            raise ValueError(f"gpus {self.gpus}: expected at least 1")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel '{self.parallel}': expected ddp or fsdp")

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp" and self.gpus > 1


@dataclass(frozen=True)
class Breakdown:
    weights: int
    quant_stats: int
    adapter: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    temporaries: int
    overhead: int
    communication: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def trainable_params(shape: ModelShape, s: Setup) -> int:
    if s.method == "full":
        return shape.params
    return shape.lora_params(s.rank) + (shape.expert_lora_params(s.rank) if s.experts else 0)


def _weights(shape: ModelShape, s: Setup) -> tuple[int, int]:
    if s.method != "qlora":
        return shape.params * BYTES[s.dtype], 0
    quantized = shape.linear_params + shape.expert_weights * shape.experts * shape.moe_layers
    matrices = shape.linear_count + 2 * shape.experts * shape.moe_layers  # 2 per expert
    blocks = -(-quantized // s.blocksize)
    if s.double_quant:  # one 8-bit code per block, one fp32 scale per 256 codes, offsets
        stats = blocks + 4 * -(-blocks // 256) + 4 * matrices
    else:
        stats = 4 * blocks
    # Embeddings, norms, routers, biases and lm_head stay unquantized, in the compute dtype
    # (quantization.unquantized_dtype's default).
    return quantized // 2 + BYTES[s.dtype] * (shape.params - quantized), stats


def _optimizer(shape: ModelShape, s: Setup) -> int:
    n = trainable_params(shape, s)
    states = 8 * n if s.optimizer == "adamw" else 2 * n + 8 * -(-n // 256)
    if s.method == "full" and BYTES[s.dtype] < 4:
        states += 4 * n  # fp32 master weights of mixed-precision training
    return states


def _moe_saved(shape: ModelShape, s: Setup) -> int:
    """Per token, what an MoE layer's routed experts keep for backward (grouped-experts forward,
    measured with saved-tensor hooks on Qwen3-MoE and Mixtral layers): for each of its k
    (token, expert) rows the gathered input, gate_up's output, SiLU(gate) and the product
    (2I + I + I), down's output, and its routing-weighted copy (3h + 4I); each expert LoRA's
    x @ A^T (2r); the router's logits (E), and the int64 routing indices and weights (~8k)."""
    k, h, width = shape.experts_per_token, shape.hidden, shape.expert_intermediate
    lora = 2 * s.rank if s.experts and s.method != "full" else 0
    return k * (3 * h + 4 * width + lora + 8) + shape.experts


def _mlp_width(shape: ModelShape) -> int:
    """Per token, the MLP's hidden width: an MoE layer's k expert rows."""
    return shape.experts_per_token * shape.expert_intermediate if shape.experts \
        else shape.intermediate


def layer_activations(shape: ModelShape, s: Setup) -> int:
    """Values one decoder layer keeps for backward per token (its input included)."""
    mlp = _moe_saved(shape, s) if shape.experts else 4 * _mlp_width(shape)
    per_layer = 6 * shape.hidden + 2 * shape.kv_dim + mlp + 2 * shape.heads
    if s.method != "full":
        per_layer += shape.linears_per_layer * s.rank
    return per_layer


def _activations(shape: ModelShape, s: Setup) -> int:
    h, i = shape.hidden, _mlp_width(shape)
    per_layer = layer_activations(shape, s)
    tokens = s.batch * s.seq
    a = BYTES[s.dtype]
    if s.checkpointing:
        kept = shape.layers * h + per_layer
    else:
        kept = shape.layers * per_layer
    backward = 2 * h + 3 * i
    return tokens * (kept + backward + 2 * h) * a  # + embeddings out and final norm


def _logits(shape: ModelShape, s: Setup) -> int:
    tokens = s.batch * s.seq
    if s.loss_chunk:  # our loss: labelled positions only, chunk by chunk, fp32
        rows = min(s.loss_chunk, max(1, int(tokens * s.labelled_fraction)))
        return 3 * rows * shape.vocab * 4
    return tokens * shape.vocab * (BYTES[s.dtype] + 2 * 4)  # logits, fp32 copy and its grad


def _temporaries(shape: ModelShape, s: Setup) -> int:
    if s.method != "qlora":
        return 0
    # forward dequantizes one weight at a time; backward holds one more for the input grad
    largest = max([a * b for a, b in shape.linear_shapes()]
                  + [2 * shape.hidden * shape.expert_intermediate])
    return 2 * largest * BYTES[s.dtype]


def _per_gpu(n: int, s: Setup) -> int:
    return -(-n // s.gpus) if s.sharded else n


def _fsdp_gathered(shape: ModelShape, s: Setup, stats: int = 0) -> int:
    """Whole parameters FSDP holds besides the shards: the root unit and two decoder layers."""
    layer = sum(x * y for x, y in shape.linear_shapes())
    if s.method == "qlora":  # the fp32 root, two layers' 4-bit codes and scales
        return 4 * shape.other_params + 2 * (layer // 2 + -(-stats // shape.layers))
    return (shape.other_params + 2 * layer) * BYTES[s.dtype]


def _communication(shape: ModelShape, s: Setup, trainable: int, grad_bytes: int) -> int:
    if s.gpus == 1:
        return 0
    if s.sharded:  # one layer's unsharded gradients, before the reduce-scatter
        return -(-trainable // shape.layers) * grad_bytes
    return trainable * grad_bytes  # DDP's buckets: a flat copy of every trainable gradient


def estimate(shape: ModelShape, setup: Setup) -> Breakdown:
    """Bytes one training step needs on one device (per GPU when setup.gpus > 1)."""
    weights, stats = _weights(shape, setup)
    if setup.sharded:  # 4-bit codes and scales too (Linear4bit.shardable)
        weights = _per_gpu(weights, setup) + _fsdp_gathered(shape, setup, stats)
        stats = _per_gpu(stats, setup)
    trainable = trainable_params(shape, setup)
    adapter = 0 if setup.method == "full" else 4 * trainable  # LoRA weights train in fp32
    grad_bytes = BYTES[setup.dtype] if setup.method == "full" else 4
    return Breakdown(
        weights=weights, quant_stats=stats, adapter=_per_gpu(adapter, setup),
        grads=_per_gpu(trainable * grad_bytes, setup),
        optimizer=_per_gpu(_optimizer(shape, setup), setup),
        activations=_activations(shape, setup), logits=_logits(shape, setup),
        temporaries=_temporaries(shape, setup),
        overhead=_runtime_overhead(setup.device),
        communication=_communication(shape, setup, trainable, grad_bytes))
