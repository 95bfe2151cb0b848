"""The training run's config: one YAML file mirrors `RunConfig` (model, adapter, data, train,
eval), `key=value` overrides patch it.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, SerializeAsAny, field_validator, model_validator

from loratune.config.base import (USER_PATH, USER_URI, _Section, apply_overrides, read_yaml,
                                  validate_config)
from loratune.config.federated import FederatedConfig
from loratune.config.methods import (AdapterConfig, LoraConfig, adapter_config_from,
                                     adapter_options)


BLOCK_RANGE = (32, 4096)  # the 4-bit block sizes bitsandbytes' layout allows


def check_blocksize(blocksize: int) -> int:
    lo, hi = BLOCK_RANGE
    if not (lo <= blocksize <= hi and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"blocksize {blocksize}: expected a power of two from {lo} to {hi}")
    return blocksize


class QuantConfig(_Section):
    """QLoRA base: frozen linear weights stored in 4 bits (bitsandbytes' layout)."""

    bits: Literal[4] = 4
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantize the block scales too (~0.37 bit saved)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the 4-bit weights are dequantized to and the activations "
        "run in")
    unquantized_dtype: Literal["compute", "float32"] = Field(
        "compute", description="dtype of the weights left unquantized (embeddings, lm_head, "
        "norms, biases): compute (= compute_dtype: the smallest model) or float32 (as PEFT's "
        "prepare_model_for_kbit_training; the residual stream then runs in fp32)")
    kernel: Literal["auto", "torch", "triton", "bitsandbytes"] = Field(
        "auto", description="4-bit dequantization: torch (readable PyTorch, any device), triton "
        "(our kernel, CUDA), bitsandbytes (its CUDA kernels on the same bytes); auto: on CUDA "
        "bitsandbytes, else triton, whichever imports first, else torch")
    blocksize: int = Field(64, description="values per absmax block: a power of two, 32..4096")

    @field_validator("blocksize")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        return check_blocksize(v)


DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded model: every command's default base


class ModelConfig(_Section):
    name: str = Field(DEFAULT_MODEL, description="embedded name, HF folder or .gguf file",
                      json_schema_extra=USER_PATH)
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    strict_dtype: bool = Field(False, description="error instead of falling back to float32 "
                               "when the device has no native support for dtype")
    attn_implementation: str = Field(
        "auto", description="transformers attention backend (sdpa, eager, ...); auto: sdpa where "
        "the architecture has it, else eager (Gemma 2's logit softcapping has only eager)")
    packed_attention: Literal["mask", "flex", "varlen", "auto"] = Field(
        "mask", description="attention over packed rows: mask = a dense block-diagonal mask "
        "(attn_implementation); flex = flex_attention's document block mask; varlen = "
        "FlashAttention's variable-length kernel (flash-attn package); auto = varlen if "
        "installed, else flex. flex/varlen need CUDA (on CPU: mask, with a note)")
    fused_kernels: bool = Field(
        False, description="liger-kernel's fused RMSNorm and SwiGLU for Llama-style models on "
        "CUDA (extra: loratune[liger]); on CPU the plain path runs, with a note")
    quantization: QuantConfig | None = Field(None, description="set for QLoRA (4-bit base)")


class DataSource(_Section):
    """One source of a mixture (data.train or data.eval as a list; data/mixture.py)."""

    path: str = Field(description="named as data.train is (file, glob, dataset folder, Hub id, "
                      "demo)", json_schema_extra=USER_PATH)
    name: str | None = Field(None, description="the source's name in logs and per-source eval "
                             "losses (default: its path)")
    weight: float | None = Field(None, gt=0, description="data.train: sampling probability "
                                 "(weights are normalised; give one on every source or none)")
    epochs: float | None = Field(None, gt=0, description="data.train: passes over this source "
                                 "per epoch of the mixture (0.5: a seeded half; default 1)")

    @model_validator(mode="after")
    def _one_rule(self):
        if self.weight is not None and self.epochs is not None:
            raise ValueError(f"source {self.path}: give weight or epochs, not both")
        return self

    @property
    def label(self) -> str:
        return self.name or self.path


def _check_sources(field: str, sources: list[DataSource], held_out: bool) -> None:
    """A mixture's sources: some, named apart, and weighted all or none."""
    if not sources:
        raise ValueError(f"data.{field}: an empty list; give a path or at least one source")
    labels = [s.label for s in sources]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"data.{field}: sources named alike ({', '.join(twice)}); give each "
                         "a distinct name:")
    weighted = [s.weight is not None for s in sources]
    if held_out and any(s.weight is not None or s.epochs is not None for s in sources):
        raise ValueError("data.eval: weight/epochs apply to data.train only; every held-out "
                         "source is scored whole")
    if any(weighted) and not all(weighted):
        raise ValueError(f"data.{field}: weights on some sources only "
                         f"({', '.join(s.label for s in sources if s.weight is None)} have "
                         "none); give every source a weight or none")


class DataConfig(_Section):
    train: str | list[DataSource] = Field(
        "demo", description="data file, a glob of files, a Hugging Face save_to_disk folder, "
        ".arrow file or Hub id (online or cached), or 'demo' for the bundled demo set "
        "('demo-pairs': its preference pairs); or a mixture: a list of sources {path, weight "
        "| epochs, name}", json_schema_extra=USER_PATH)
    eval: str | list[DataSource] | None = Field(
        None, description="held-out data, named as data.train is; 'demo' pairs with train: "
        "demo; a list of sources {path, name}: a held-out loss per source",
        json_schema_extra=USER_PATH)
    split: str = Field("train", description="the split of data.train when it is a Hub id or a "
                       "saved DatasetDict")
    eval_split: str = Field("test", description="the split of data.eval when it is a Hub id or "
                            "a saved DatasetDict")
    columns: dict[str, str] = Field(default_factory=dict, description="dataset column -> our "
                                    "field (instruction, input, output, messages, conversations, "
                                    "prompt, chosen, rejected, text, ...), renamed as records "
                                    "are read")
    filter: str | None = Field(
        None, description="records to keep (after data.columns): path/to/file.py:function "
        "called with each record, or an expression on its columns such as `len(output) > 10 "
        "and lang == \"en\"` (and/or/not, comparisons, in, + - / // % and * on numbers, "
        "indexing; calls of len str int float bool abs min max round lower upper strip "
        "startswith endswith words; no attribute access: lower(x), not x.lower()); records it "
        "gives False for are left out")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text"] = Field(
        "auto", description="text: raw documents for continued pretraining (loss on every "
        "token; .txt files, records with data.text_column, or a folder of them)")
    text_column: str = Field("text", description="data.format text: the field holding a "
                             "record's document (.jsonl, .json, .csv, .parquet)")
    documents: Literal["blank_line", "file"] = Field(
        "blank_line", description="data.format text: how a .txt file holds documents: separated "
        "by blank lines, or the whole file is one")
    template: str | None = Field(None, description="named chat template if the tokenizer has none")
    system_prompt: str | None = None
    max_length: int = Field(512, gt=8)
    overflow: Literal["truncate", "drop"] = "truncate"
    train_on: Literal["answers", "all"] = "answers"
    think: Literal["keep", "strip"] = Field(
        "keep", description="<think>...</think> blocks in answers (Qwen3's reasoning): keep and "
        "train on them as the chat template renders them, or strip them from every answer")
    packing: bool | Literal["auto"] = "auto"
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held-out share when no eval file")
    # --- images (data/images.py; vision-language models) ---
    image_max_pixels: int = Field(
        4096 * 4096, gt=0, description="images larger than this many pixels (width x height, "
        "read from the file's header before decoding) are refused, naming file, line and image")
    allow_remote_images: Literal[False] = Field(
        False, description="fetch http(s) image URLs: not supported yet; records naming one "
        "are refused (images are local paths relative to the data file, or data: URLs)")
    # --- streaming (data/batch_stream.py) ---
    streaming: bool | Literal["auto"] = Field(
        "auto", description="read data.train a window of records at a time (encoded and packed "
        "on the fly, memory flat in the file's size) instead of whole; needs train.max_steps "
        "(epochs end when the data does). auto: stream when data.train is larger than "
        "data.streaming_threshold_mb")
    streaming_threshold_mb: float = Field(1024.0, gt=0, description="data.streaming: auto "
                                          "streams data.train above this many MB on disk")
    shuffle_buffer: int = Field(10000, gt=0, description="streaming: records read, shuffled and "
                                "packed together (a window); a window holding the whole file "
                                "gives the batches the in-memory path gives")

    # --- new tokens (data/new_tokens.py) ---
    add_tokens: list[str] = Field(
        default_factory=list, description="tokens added to the tokenizer (domain words, "
        "markers); the embeddings grow by a row each (the mean of the existing rows, or see "
        "data.new_token_init), trained through adapter.modules_to_save: [embed_tokens, lm_head] "
        "and saved with the tokenizer in the adapter folder")
    add_special_tokens: list[str] = Field(
        default_factory=list, description="as data.add_tokens, added as special tokens (never "
        "split; dropped by decoding with skip_special_tokens)")
    new_token_init: dict[str, str] = Field(
        default_factory=dict, description="new token -> text: its rows start as the mean of "
        "that text's token embeddings (default: the mean of all rows)")

    @model_validator(mode="after")
    def _new_tokens(self):
        new = [*self.add_tokens, *self.add_special_tokens]
        twice = sorted({t for t in new if new.count(t) > 1 or not t})
        if twice:
            raise ValueError(f"data.add_tokens/add_special_tokens: {twice} given twice or empty")
        stray = [t for t in self.new_token_init if t not in new]
        if stray:
            raise ValueError(f"data.new_token_init: {stray} not in data.add_tokens or "
                             "data.add_special_tokens")
        return self

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _plain_sources(cls, value):
        """A list item may be a bare path: the source {path: it}."""
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _mixtures(self):
        if isinstance(self.train, list):
            _check_sources("train", self.train, held_out=False)
        if isinstance(self.eval, list):
            _check_sources("eval", self.eval, held_out=True)
        return self


OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "kto", "grpo")
# preference option -> the objectives that read it
PREFERENCE_OPTIONS = {
    "beta": ("dpo", "ipo", "simpo", "kto"),
    "label_smoothing": ("dpo", "simpo"),
    "simpo_gamma": ("simpo",),
    "orpo_lambda": ("orpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "reference": ("dpo", "ipo", "kto"),
}
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "simpo": 2.0}


class PreferenceConfig(_Section):
    """Options of the preference objectives (train.objective); each applies to some of them."""

    beta: float | None = Field(None, gt=0, description="strength: dpo/ipo/kto 0.1, simpo 2.0 "
                               "when unset (ipo: the target margin is 1/(2 beta))")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="share of pairs assumed "
                                   "mislabelled (conservative DPO / SimPO)")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin")
    orpo_lambda: float = Field(0.1, gt=0, description="weight of ORPO's odds-ratio term")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of desirable examples")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of undesirable ones")
    reference: Literal["live", "cached"] = Field(
        "live", description="reference log-probs: live (adapter off, every step) or cached "
        "(computed once, kept in the run folder as ref_logps.safetensors)")

    def beta_for(self, objective: str) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[objective]


RL_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo")
# loss -> (epsilon_low, epsilon_high) when unset: PPO's 0.2; DAPO's clip-higher 0.28; GSPO's
# sequence-level ratios sit near 1, so its paper clips at 3e-4 / 4e-4.
DEFAULT_EPSILON = {"grpo": (0.2, 0.2), "bnpo": (0.2, 0.2), "dr_grpo": (0.2, 0.2),
                   "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4)}


class RewardSpec(_Section):
    """One reward function of train.objective grpo and its weight in the summed reward."""

    function: str = Field(description="a built-in (exact_match, regex, numeric, code, length) "
                          "or user code as path/to/file.py:function or module:function, called "
                          "TRL's way: f(prompts, completions, **columns) -> list[float | None]")
    weight: float = 1.0
    column: str | None = Field(None, description="exact_match/numeric/code: the data column "
                               "holding the answer or the tests (default answer, tests for code)")
    pattern: str | None = Field(None, description="regex: the pattern a completion must match "
                                "(re.search; 1.0 if it does, else 0.0)")
    tolerance: float = Field(1e-6, ge=0, description="numeric: relative/absolute tolerance")
    target_length: int | None = Field(None, gt=0, description="length: completion characters "
                                      "beyond which each extra one costs 1/target_length")
    timeout: float = Field(10.0, gt=0, description="code: seconds per program")


class RlConfig(_Section):
    """Options of train.objective grpo: online RL on the adapter with programmatic rewards."""

    loss: Literal["grpo", "bnpo", "dr_grpo", "dapo", "gspo"] = Field(
        "dapo", description="grpo: token mean per sequence; bnpo: token mean per micro-batch; "
        "dr_grpo: token sum / (rows x max_completion_length); dapo: token sum / tokens of the "
        "whole step; gspo: sequence-level importance ratios, grpo's normalisation")
    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (a group)")
    max_completion_length: int = Field(256, gt=0, description="tokens per completion at most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (and the log-probs' "
                               "scale, as TRL)")
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.0, ge=0, description="KL penalty to the reference (the adapter off); "
                        "0: no reference forward")
    kl_correction: bool = Field(True, description="weight the KL term by the importance "
                                "ratio (DeepSeek-V3.2; TRL's use_bias_correction_kl)")
    num_iterations: int = Field(1, gt=0, description="updates per rollout (mu); >1 clips "
                                "against the log-probs of the policy that sampled")
    epsilon_low: float | None = Field(None, gt=0, lt=1, description="lower clip; default per loss "
                                      "(0.2; gspo 3e-4)")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip; default per loss "
                                       "(0.2; dapo 0.28; gspo 4e-4)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="advantage = (reward - group mean) / std of the group, of the "
        "whole batch, or not divided (Dr. GRPO)")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all "
                                   "equal (no signal) from the update")
    overlong_buffer: int = Field(0, ge=0, description="DAPO's soft overlong penalty: completions "
                                 "within this many tokens of max_completion_length lose up to "
                                 "overlong_penalty, linearly (0: off)")
    overlong_penalty: float = Field(1.0, ge=0)
    rewards: list[RewardSpec] = Field(default_factory=list, description="reward functions; "
                                      "their weighted sum is the reward")
    samples_logged: int = Field(4, ge=0, description="completions (with rewards) written per "
                                "step to completions.jsonl")

    def epsilons(self) -> tuple[float, float]:
        low, high = DEFAULT_EPSILON[self.loss]
        return (self.epsilon_low if self.epsilon_low is not None else low,
                self.epsilon_high if self.epsilon_high is not None else high)


class TrainConfig(_Section):
    objective: Literal["sft", "dpo", "ipo", "orpo", "simpo", "kto", "grpo"] = Field(
        "sft", description="sft: next-token loss; dpo/ipo/orpo/simpo: prompt/chosen/rejected "
        "pairs; kto: prompt/completion/label examples; grpo: prompts and reward functions "
        "(train.rl)")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    rl: RlConfig = Field(default_factory=RlConfig)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(8, gt=0, description="rows per micro-batch")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    loraplus_lr_ratio: float | None = Field(None, gt=0, description="LoRA+: lr of B = lr * ratio")
    embedding_lr: float | None = Field(
        None, gt=0, description="lr of the embeddings and output layer trained through "
        "adapter.modules_to_save (continued pretraining: usually 2-10x below lr); unset: lr")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes: ddp replicates the base, fsdp shards it")
    deepspeed: str | None = Field(
        None, description="DeepSpeed ZeRO-2/3 JSON config (needs CUDA and the deepspeed package)",
        json_schema_extra=USER_PATH)
    dist_timeout: float = Field(
        600, gt=0, description="seconds a collective waits for a stalled rank before failing")
    gradient_checkpointing: bool = False
    fused_lora: bool = Field(
        False, description="LoRA layers run base + adapter as one autograd op that keeps only "
        "x, the dropout mask and A·x for backward (less activation memory); other methods and "
        "layers with several active adapters take the plain path")
    offload_activations: bool = Field(
        False, description="keep tensors saved for backward in host memory (GPU runs)")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw8bit: moments stored as blockwise 8-bit codes")
    offload_optimizer: bool = Field(
        False, description="keep optimizer states in (pinned) host memory (GPU runs)")
    host_memory: Literal["auto", "low", "fast"] = Field(
        "auto", description="low: large host blocks from mmap, returned to the OS when freed "
        "(lower peak RSS, slower CPU steps); auto: low for QLoRA runs")
    loss_chunk: int = Field(1024, gt=0, description="tokens per chunk of the output-layer loss")
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    save_total_limit: int | None = Field(2, gt=0)
    seed: int = 42
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers fed the config and metrics "
        "(pip install 'loratune[trackers]')")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
        "<output_dir>/mlruns)", json_schema_extra=USER_URI)
    wandb_project: str = Field("loratune", description="W&B project (offline unless $WANDB_MODE)")

    @model_validator(mode="after")
    def _preference_options_fit(self):
        # By value, not by keys given: config.yaml lists every option with its default.
        for key, owners in PREFERENCE_OPTIONS.items():
            default = PreferenceConfig.model_fields[key].default
            if getattr(self.preference, key) != default and self.objective not in owners:
                raise ValueError(f"train.preference.{key} applies to train.objective "
                                 f"{'/'.join(owners)}, not {self.objective}")
        return self

    @model_validator(mode="after")
    def _rl_fits(self):
        if self.objective != "grpo":
            return self
        if not self.rl.rewards:
            raise ValueError("train.objective grpo needs train.rl.rewards: at least one reward "
                             "function, e.g. [{function: exact_match, column: answer}]")
        if self.batch_size % self.rl.num_generations:
            raise ValueError(f"train.batch_size {self.batch_size} must be a multiple of "
                             f"train.rl.num_generations {self.rl.num_generations} (whole groups "
                             "per micro-batch)")
        return self


class EvalConfig(_Section):
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(16, gt=0)
    limit: int | None = Field(None, gt=0, description="evaluate only the first N held-out items")


# --- search (recipes/search.py: `loratune search`) ---
TARGET_SETS = ("attention", "mlp", "all-linear")
RUN_SECTIONS = ("model", "adapter", "data", "train", "eval")


class SearchRange(_Section):
    """A numeric range of a searched value: ints when low and high are ints (and step unset)."""

    low: int | float
    high: int | float
    log: bool = Field(False, description="sample on a log scale (learning rates)")
    step: int | float | None = Field(None, gt=0, description="grid step within the range")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0, got {self.low}")
        return self


Searched = list[Any] | SearchRange  # a list: choices; a mapping: a range


def _as_range(v):
    """A mapping becomes a SearchRange here, so a bad one gets its own errors, not the union's."""
    if not isinstance(v, dict):
        return v
    try:
        return SearchRange.model_validate(v)
    except ValidationError as err:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'range'}: {e['msg']}"
                                   for e in err.errors())) from None


class SearchSpace(_Section):
    """What `loratune search` varies: each key a list of choices or a {low, high} range."""

    method: list[str] | None = Field(None, description="adapter methods to try (registry names)")
    r: Searched | None = Field(None, description="LoRA rank (methods that have r)")
    lora_alpha: Searched | None = None
    alpha_over_r: Searched | None = Field(None, description="lora_alpha as this multiple of "
                                          "the sampled r (alpha/r kept, as tune-rank does)")
    targets: list[str | list[str]] | None = Field(
        None, description="target sets: attention, mlp, all-linear, or a list of module names")
    lr: Searched | None = Field(None, description="train.lr; a range is sampled "
                                             "on a log scale")
    dropout: Searched | None = Field(None, description="adapter.lora_dropout")
    quantization: list[bool] | None = Field(None, description="[false, true]: QLoRA or not "
                                            "(true uses model.quantization, else its defaults)")
    fields: dict[str, Searched] = Field(
        default_factory=dict, description="any config field by dotted path, e.g. "
        "train.warmup_ratio: {low: 0, high: 0.1}")

    @field_validator("r", "lora_alpha", "alpha_over_r", "lr", "dropout", mode="before")
    @classmethod
    def _range(cls, v):
        return _as_range(v)

    @field_validator("fields", mode="before")
    @classmethod
    def _ranges(cls, v):
        return {k: _as_range(x) for k, x in v.items()} if isinstance(v, dict) else v

    @field_validator("method", "r", "lora_alpha", "alpha_over_r", "targets", "lr", "dropout",
                     "quantization")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("an empty list of choices: give at least one, or leave it out")
        return v

    @field_validator("method")
    @classmethod
    def _known_methods(cls, v):
        known = adapter_options()
        unknown = [m for m in v or [] if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}: expected {', '.join(known)}")
        return v

    @field_validator("targets")
    @classmethod
    def _target_sets(cls, v):
        bad = [t for t in v or [] if isinstance(t, str) and t not in TARGET_SETS]
        if bad:
            raise ValueError(f"unknown target set(s) {bad}: expected {', '.join(TARGET_SETS)} "
                             "or a list of module names")
        return v

    @field_validator("fields")
    @classmethod
    def _paths(cls, v):
        for path in v:
            head = path.split(".")[0]
            if head not in RUN_SECTIONS or "." not in path:
                raise ValueError(f"{path!r}: expected a dotted path into "
                                 f"{'/'.join(RUN_SECTIONS)}, e.g. train.warmup_ratio")
        return v

    @model_validator(mode="after")
    def _one_alpha(self):
        if self.lora_alpha is not None and self.alpha_over_r is not None:
            raise ValueError("lora_alpha and alpha_over_r both set: expected one of them")
        return self


# search.objective names -> the direction each is better in ("task": the task's metric says)
SEARCH_OBJECTIVES = {"eval_loss": "minimize", "reward": "maximize", "task": None,
                     "peak_gib": "minimize", "seconds": "minimize"}


def _one_or_list(v):
    return [v] if isinstance(v, str) else v


class SearchTask(_Section):
    """search.objective task: an `eval --task` run on each trained trial, in its process."""

    task: str = Field(description="an eval task: exact, mc, perplexity, generate, code, ...")
    data: str = Field(description="the task's data file", json_schema_extra=USER_PATH)
    metric: str | None = Field(None, description="the metric scored (default: the task's "
                               "headline, e.g. mc acc)")
    options: dict[str, Any] = Field(default_factory=dict, description="eval options of the "
                                    "task, e.g. {shots: 1, limit: 50}")


class SearchConfig(_Section):
    """`loratune search`: an Optuna study over `space`, every trial checked by the planner."""

    space: SearchSpace = Field(default_factory=SearchSpace)
    objective: list[Literal["eval_loss", "reward", "task", "peak_gib", "seconds"]] = Field(
        ["eval_loss"], description="one name or a list (a list: a multi-objective study, the "
        "Pareto front): eval_loss (held-out loss), reward (held-out mean reward of train."
        "objective grpo), task (search.task's metric), peak_gib (measured peak memory), "
        "seconds (training time)")
    direction: list[Literal["minimize", "maximize"]] | None = Field(
        None, description="one per objective (default: each one's own; task: the metric's)")
    task: SearchTask | None = Field(None, description="the eval task of objective task")
    memory_gib: float | None = Field(None, gt=0, description="planned peak memory limit: "
                                     "trials the planner puts above it are pruned, never run")
    trials: int = Field(20, gt=0, description="finished trials (complete or pruned) the study "
                        "holds when done, all workers together; a rerun continues up to it")
    time: float | None = Field(None, gt=0, description="seconds after which this invocation "
                                 "starts no new trial (a running one finishes)")
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="grid: every combination of a space of lists once (trials: their "
        "number at most)")
    pruner: Literal["median", "hyperband", "none"] | None = Field(
        None, description="stops trials whose intermediate held-out score (train.eval_every) "
        "is weak; default median, none with several objectives (Optuna prunes one only)")
    seed: int | None = Field(None, description="sampler seed (default: train.seed)")
    storage: str | None = Field(None, description="Optuna storage URL (default: sqlite:///"
                                "<output_dir>/study.db); workers sharing it split the trials",
                                json_schema_extra=USER_URI)
    study_name: str = "search"

    @field_validator("objective", "direction", mode="before")
    @classmethod
    def _listed(cls, v):
        return _one_or_list(v)

    @model_validator(mode="after")
    def _objectives(self):
        names = self.objective
        if not names or len(set(names)) != len(names):
            raise ValueError(f"objective {names}: expected one or more different names")
        if self.direction is not None and len(self.direction) != len(names):
            raise ValueError(f"direction {self.direction}: expected one per objective {names}")
        if "task" in names and self.task is None:
            raise ValueError("objective task needs search.task: {task: NAME, data: FILE}")
        if len(names) > 1 and self.pruner not in (None, "none"):
            raise ValueError(f"pruner {self.pruner} with {len(names)} objectives: Optuna prunes "
                             "single-objective studies only (leave pruner out or set none)")
        return self


class RunConfig(_Section):
    output_dir: str = "runs/demo"
    model: ModelConfig = Field(default_factory=ModelConfig)
    # SerializeAsAny: dump the method's own fields, not just those of the base class.
    adapter: SerializeAsAny[AdapterConfig] = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    search: SearchConfig | None = Field(None, description="`loratune search` only: the "
                                        "space, objective and budget of the study")
    federated: FederatedConfig | None = Field(None, description="`loratune federate` only: "
                                              "clients, rounds, partition and aggregation")

    @field_validator("adapter", mode="wrap")
    @classmethod
    def _by_method(cls, v, handler):
        # `method` picks the class, so errors name that method's fields instead of all seven.
        return adapter_config_from(v)

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


def build_config(data: dict, source: str = "config") -> RunConfig:
    return validate_config(RunConfig, data, source)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or defaults when path is None) and apply overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(Path(path)) if path is not None else "defaults"
    return build_config(apply_overrides(data, list(overrides)), source)
