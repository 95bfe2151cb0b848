"""`loratune plan`: print a memory breakdown, whether it fits, and settings that do."""

from __future__ import annotations

import os
from dataclasses import replace

from loratune.config.commands import PlanConfig
from loratune.plan.memory import METHODS, PARALLEL, Breakdown, Setup, estimate
from loratune.plan.recommend import GPUS, GiB, leanest_total, longest_seq, parse_memory, recommend
from loratune.plan.shapes import PRESETS, ModelShape, resolve_shape

ROWS = [("weights", "weights"), ("quant_stats", "quantization scales"),
        ("adapter", "adapter weights"), ("grads", "gradients"),
        ("optimizer", "optimizer states"), ("activations", "activations"),
        ("logits", "logits (loss)"), ("temporaries", "dequantized temporaries"),
        ("overhead", "runtime / CUDA context"),
        ("communication", "DDP/FSDP buffers")]
# On a CPU run the overhead row is the process itself: there is no CUDA context.
CPU_LABELS = {"overhead": "runtime (python, torch)"}


class PlanError(ValueError):
    pass


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def render(shape: ModelShape, setup: Setup, b: Breakdown) -> str:
    ckpt = "with" if setup.checkpointing else "without"
    lines = [f"{shape.name}: {shape.params / 1e9:.2f}B params, {setup.method}, "
             f"batch {setup.batch} x seq {setup.seq}, r={setup.rank}, {setup.dtype}, "
             f"{setup.optimizer}, {ckpt} gradient checkpointing, on {setup.device}"
             + (f"; per GPU of {setup.gpus} ({setup.parallel}, "
                f"{'base sharded' if setup.sharded else 'base replicated'})"
                if setup.gpus > 1 else "")] + moe_lines(shape, setup)
    other = estimate(shape, replace(setup, checkpointing=not setup.checkpointing))
    cpu = setup.device.split(":")[0] == "cpu"
    for key, label in ROWS:
        label = CPU_LABELS.get(key, label) if cpu else label
        value = getattr(b, key)
        if value:
            note = (f"   ({'without' if setup.checkpointing else 'with'} checkpointing: "
                    f"{gib(other.activations)})" if key == "activations" else "")
            lines.append(f"  {label:<26}{gib(value):>9} GiB{note}")
    lines.append(f"  {'total':<26}{gib(b.total):>9} GiB")
    return "\n".join(lines)


def moe_lines(shape: ModelShape, setup: Setup) -> list[str]:
    """A mixture-of-experts base: active parameters, routers, and the experts' LoRA."""
    if not shape.experts:
        return []
    per_expert = shape.expert_lora_params(setup.rank) // (shape.moe_layers * shape.experts)
    used = "included" if setup.experts else "not included: --experts adds them"
    return [f"  MoE: {shape.experts} routed experts x {shape.moe_layers} layers, "
            f"{shape.experts_per_token} per token: {shape.active_params / 1e9:.2f}B active; "
            f"routers {shape.router_params / 1e6:.2f}M params (unquantized, frozen)",
            f"  LoRA r={setup.rank} on the routed experts: {per_expert:,} params per expert, "
            f"{gib(4 * shape.expert_lora_params(setup.rank))} GiB in fp32 ({used})"]


def host_memory() -> tuple[int, int | None]:
    """(total, available now or None) bytes of this machine's RAM."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return total, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: the total alone
        return total, None


def ram_verdict(total: int) -> str:
    """Whether a CPU run fits this machine's RAM (and what is free now)."""
    ram, available = host_memory()
    word = "fits" if total <= ram else "does not fit"
    free = f"; {gib(available)} GiB available now" if available is not None else ""
    return f"{word} in this machine's RAM: {gib(total)} of {gib(ram)} GiB{free}"


def device_lines(total: int, setup: Setup) -> list[str]:
    """The verdict for the configured device when no --gpu is asked: RAM for a CPU run; for a
    GPU run the visible GPU's memory, else how to ask about one."""
    if setup.device.split(":")[0] == "cpu":
        return [ram_verdict(total)]
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(setup.device))
        return [verdict(total, props.name, props.total_memory)]
    return [f"no GPU here: --gpu NAME or SIZE says whether it fits one ({', '.join(GPUS)}, "
            "or e.g. 24GB)"]


def verdict(total: int, label: str, memory: int) -> str:
    word = "fits" if total <= memory else "does not fit"
    return f"{word} on {label}: {gib(total)} of {gib(memory)} GiB"


def advice_lines(shape: ModelShape, setup: Setup, label: str, memory: int,
                 target_batch: int) -> list[str]:
    options = recommend(shape, setup, memory, target_batch)
    if not options:
        need = leanest_total(shape, setup)
        hint = "" if setup.method == "qlora" else "; try --method qlora"
        return [f"nothing fits on {label}: the leanest setting (batch 1, seq 256, checkpointing, "
                f"8-bit AdamW) needs {gib(need)} GiB{hint}"]
    lines = [f"settings that fit {label} (effective batch {target_batch}):"]
    for a in options:
        s = a.setup
        lines.append(f"  micro-batch {s.batch:>3} x grad_accum {a.grad_accum:>2}, seq {s.seq}, "
                     f"checkpointing {'on ' if s.checkpointing else 'off'}, {s.optimizer}: "
                     f"{gib(a.total)} GiB")
    lean = replace(options[-1].setup, checkpointing=True)
    seq = longest_seq(shape, lean, memory)
    if seq:
        lines.append(f"  longest sequence at batch 1 with checkpointing: {seq} tokens")
    return lines


def table(shapes: list[ModelShape], setup: Setup) -> str:
    """The seeds' matrix: each model x method -> GiB and the GPUs it fits."""
    names = list(GPUS)
    head = f"{'model':<24}{'method':<7}{'GiB':>8}  " + "  ".join(f"{n:>8}" for n in names)
    lines = [f"batch {setup.batch} x seq {setup.seq}, r={setup.rank}, {setup.dtype}, "
             f"{'with' if setup.checkpointing else 'without'} checkpointing, {setup.optimizer}",
             head]
    for shape in shapes:
        for method in METHODS:
            total = estimate(shape, replace(setup, method=method)).total
            marks = "  ".join(f"{'yes' if total <= GPUS[n][1] else '-':>8}" for n in names)
            lines.append(f"{shape.name:<24}{method:<7}{gib(total):>8}  {marks}")
    return "\n".join(lines)


def scaling_table(shapes: list[ModelShape], setup: Setup,
                  gpu_counts: tuple[int, ...] = (1, 2, 4, 8)) -> str:
    """GiB per GPU for each model x method x DDP/FSDP x GPU count."""
    head = (f"{'model':<16}{'method':<7}{'parallel':<9}"
            + "".join(f"{f'{n} GPU':>9}" for n in gpu_counts))
    lines = [f"GiB per GPU; batch {setup.batch} x seq {setup.seq} per GPU, r={setup.rank}, "
             f"{setup.dtype}, {'with' if setup.checkpointing else 'without'} checkpointing, "
             f"{setup.optimizer}", head]
    for shape in shapes:
        for method in METHODS:
            for parallel in PARALLEL:
                cells = [estimate(shape, replace(setup, method=method, parallel=parallel,
                                                 gpus=n)).total for n in gpu_counts]
                lines.append(f"{shape.name:<16}{method:<7}{parallel:<9}"
                             + "".join(f"{gib(c):>9}" for c in cells))
    return "\n".join(lines)


def setup_of(cfg: PlanConfig) -> Setup:
    return Setup(method=cfg.method, batch=cfg.batch, seq=cfg.seq, rank=cfg.rank, dtype=cfg.dtype,
                 optimizer=cfg.optimizer, checkpointing=cfg.checkpointing,
                 loss_chunk=cfg.loss_chunk, blocksize=cfg.blocksize,
                 double_quant=cfg.double_quant, device=cfg.device, gpus=cfg.gpus,
                 parallel=cfg.parallel, experts=cfg.experts)


def run(cfg: PlanConfig) -> str:
    """`loratune plan`'s report for options `cfg`."""
    try:
        setup = setup_of(cfg)
        presets = [PRESETS[n] for n in ("llama-2-7b", "llama-2-13b", "llama-2-70b")]
        if cfg.scaling:
            return scaling_table(presets, setup)
        if cfg.table:
            return table(presets, setup)
        shape = resolve_shape(cfg.model)
        b = estimate(shape, setup)
        lines = [render(shape, setup, b)]
        if not cfg.gpu:
            return "\n".join(lines + device_lines(b.total, setup))
        label, memory = parse_memory(cfg.gpu)
        lines.append(verdict(b.total, label, int(memory)))
        lines += advice_lines(shape, setup, label, memory, cfg.target_batch)
        return "\n".join(lines)
    except ValueError as err:
        raise PlanError(str(err)) from None
