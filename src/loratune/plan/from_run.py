"""A training config in the planner's terms: `loratune plan run.yaml` estimates the run itself."""

from __future__ import annotations

from loratune.config import ConfigError, RunConfig
from loratune.config.commands import PlanConfig

# planner option -> what sets it in a training config
RUN_KEYS = {
    "model": "model.name",
    "method": "model.quantization (set: qlora, else lora)",
    "batch": "train.batch_size",
    "seq": "data.max_length",
    "rank": "adapter.r",
    "dtype": "model.dtype (model.quantization.compute_dtype for QLoRA)",
    "optimizer": "train.optimizer",
    "checkpointing": "train.gradient_checkpointing",
    "loss_chunk": "train.loss_chunk",
    "blocksize": "model.quantization.blocksize",
    "double_quant": "model.quantization.double_quant",
    "device": "model.device",
    "parallel": "train.parallel",
    "target_batch": "train.batch_size x train.grad_accum",
    "experts": "adapter.target_modules ('experts' in it)",
}
PLAN_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def run_settings(run: RunConfig) -> dict:
    """The planner options (RUN_KEYS) that training run `run` amounts to."""
    quant = run.model.quantization
    adapter = run.adapter
    if getattr(adapter, "r", None) is None:
        raise ConfigError(f"adapter.method {adapter.method!r} has no rank: the planner estimates "
                          "low-rank methods (lora, dora, adalora, moe_lora)")
    out = {"model": run.model.name, "method": "qlora" if quant else "lora",
           "batch": run.train.batch_size, "seq": run.data.max_length,
           "rank": planned_rank(adapter),
           "dtype": PLAN_DTYPES[quant.compute_dtype if quant else run.model.dtype],
           "optimizer": run.train.optimizer, "checkpointing": run.train.gradient_checkpointing,
           "loss_chunk": run.train.loss_chunk, "device": run.model.device,
           "parallel": run.train.parallel,
           "target_batch": run.train.batch_size * run.train.grad_accum,
           "experts": _adapts_experts(adapter)}
    if quant:
        out.update(blocksize=quant.blocksize, double_quant=quant.double_quant)
    return out


def _adapts_experts(adapter) -> bool:
    """The adapter names the routed experts ('experts' in a target_modules list)."""
    targets = getattr(adapter, "target_modules", None)
    return isinstance(targets, list) and "experts" in targets


def planned_rank(adapter) -> int:
    """The LoRA rank the method counts as: its record's plan_rank (OFT's r counts blocks), else
    r (MoE-LoRA's experts hold as many weights as one LoRA of their summed rank)."""
    from loratune.adapters import method_record  # imported for every method's registration

    plan_rank = method_record(adapter.method).training.plan_rank
    if plan_rank is not None:
        return plan_rank(adapter)
    return adapter.r * getattr(adapter, "num_experts", 1)


def plan_for_run(run: RunConfig, options: PlanConfig, source: str = "the training config"
                 ) -> PlanConfig:
    """`options` (GPU, GPU count, output) with everything `run` decides taken from `run`."""
    clash = sorted(options.model_fields_set & RUN_KEYS.keys())
    if clash:
        flags = {key: flag for flag, key in PlanConfig.flag_keys().items()}
        raise ConfigError("; ".join(f"{flags[k]}: {source} decides it ({RUN_KEYS[k]})"
                                    for k in clash) + " - change it there or with key=value")
    settings = run_settings(run)
    return PlanConfig.model_validate({**options.model_dump(exclude_unset=True), **settings})


def run_notes(run: RunConfig) -> list[str]:
    """What the estimate of `run` leaves out or counts high."""
    from loratune.adapters import method_record  # imported for every method's registration

    adapter, train = run.adapter, run.train
    notes = []
    as_lora = method_record(adapter.method).training.plan_note
    if as_lora is not None:
        notes.append(f"{adapter.method} (rank {run_settings(run)['rank']}) is {as_lora}")
    targets = getattr(adapter, "target_modules", "all-linear")
    if targets not in ("all-linear", ["all-linear"]):
        notes.append(f"target_modules {targets!r}: the planner puts LoRA on every linear layer, "
                     "so adapter, gradient and optimizer figures are upper bounds")
    if getattr(adapter, "modules_to_save", None):
        notes.append(f"modules_to_save {adapter.modules_to_save} (fully trained) are not counted")
    for key in ("offload_optimizer", "offload_activations"):
        if getattr(train, key):
            notes.append(f"train.{key} is not modeled: those bytes are counted on the device")
    if train.deepspeed:
        notes.append("train.deepspeed is not modeled")
    return notes
