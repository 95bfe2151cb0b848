"""Typed run configuration: one YAML file mirrors `RunConfig`, `key=value` overrides patch it.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, StringConstraints,
                      ValidationError, field_validator, model_validator)


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


# Options naming a file or folder the run reads or writes (or a tracker URI): the dashboard
# confines what a launched config may name to these (ui/confine.py).
USER_PATH = {"user_path": "path"}
USER_URI = {"user_path": "uri"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


# method name -> the options class that serves it; filled as the classes are defined.
_ADAPTER_OPTIONS: dict[str, type[AdapterConfig]] = {}


class AdapterConfig(_Section):
    """Base of every adapter method's options. A subclass serves the method names its `method`
    Literal lists: defining it is what makes `adapter.method: <name>` select it, so a method
    defined outside this file (a plugin, a test) needs no change here."""

    dtype: Literal["float32", "base"] = Field(
        "float32", description="dtype of the trained adapter weights: float32 (default; on a "
        "bf16/fp16 base the adapter casts at its boundary, so small updates are not rounded "
        "away) or base (the base model's dtype: less memory, but AdamW steps below the dtype's "
        "resolution are lost). Not written to adapter files")

    # Not part of the adapter's file (exclude): write_config puts it back into config.yaml.
    init_from: str | None = Field(
        None, exclude=True, json_schema_extra=USER_PATH, description="start from this adapter "
        "folder (e.g. an SFT adapter); its adapter_config.json gives the method and options")

    @classmethod
    def method_names(cls) -> tuple[str, ...]:
        field = cls.model_fields.get("method")
        return get_args(field.annotation) if field is not None else ()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs):
        super().__pydantic_init_subclass__(**kwargs)
        add_adapter_options(cls)


def add_adapter_options(cls: type[AdapterConfig]) -> None:
    for name in cls.method_names():
        _ADAPTER_OPTIONS[name] = cls


def forget_adapter_options(cls: type[AdapterConfig]) -> None:
    for name in [n for n, c in _ADAPTER_OPTIONS.items() if c is cls]:
        del _ADAPTER_OPTIONS[name]


def adapter_options() -> dict[str, type[AdapterConfig]]:
    """method name -> its options class, in the order the classes were defined."""
    return dict(_ADAPTER_OPTIONS)


class _LowRankFields(AdapterConfig):
    """Options every low-rank method shares, named as in PEFT so adapter files round-trip."""

    lora_alpha: float = Field(8.0, description="scale numerator: scale = alpha / r (or / sqrt(r))")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(
        "all-linear", description="module names, one regex string, or 'all-linear' (not lm_head)"
    )
    bias: Literal["none", "lora_only", "all"] = "none"
    use_rslora: bool = Field(False, description="scale alpha/sqrt(r) instead of alpha/r")
    init_lora_weights: Literal[True, "gaussian"] = Field(
        True, description="True: A kaiming-uniform; 'gaussian': A ~ N(0, 1/r); B = 0 in both"
    )
    modules_to_save: list[str] = Field(default_factory=list, description="fully trained modules")


class LoftQOptions(_Section):
    """LoftQ (init_lora_weights: loftq), named as PEFT's loftq_config."""

    loftq_bits: Literal[4] = Field(4, description="bits of the quantized residual base (NF4)")
    loftq_iter: int = Field(1, gt=0, description="alternations of NF4 quantization and SVD")


# Inits that move a rank-r part of the base weight into the adapter (the base keeps the rest);
# pissa_niter_K (a randomized SVD with K subspace iterations) too.
BASE_INITS = ("pissa", "olora", "loftq")


class LoraConfig(_LowRankFields):
    """LoRA (and DoRA) hyper-parameters."""

    method: Literal["lora", "dora"] = Field(
        "lora", description="dora: weight-decomposed LoRA (a trained magnitude per output row)")
    r: int = Field(8, gt=0, description="rank of the update B·A")
    use_dora: bool = Field(False, description="PEFT's name for method: dora")
    init_lora_weights: Literal[True, "gaussian", "pissa", "olora", "loftq"] | Annotated[
        str, StringConstraints(pattern=r"^pissa_niter_[1-9][0-9]*$")] = Field(
        True, description="True: A kaiming-uniform, B = 0; 'gaussian': A ~ N(0, 1/r), B = 0; "
        "'pissa': A, B from W's r principal singular directions, the base keeps the residual "
        "('pissa_niter_K': by a randomized SVD with K iterations); 'olora': from W's QR "
        "factorization; 'loftq': the base becomes NF4(W - s·B·A), B·A fitted to the "
        "quantization error. Saved files are plain LoRAs of rank 2r for the unchanged base")
    loftq_config: LoftQOptions | None = Field(None, description="LoftQ's options (with "
                                              "init_lora_weights: loftq)")

    @model_validator(mode="after")
    def _base_init_fits(self):
        if self.init_lora_weights == "loftq" and self.loftq_config is None:
            self.loftq_config = LoftQOptions()
        elif self.init_lora_weights != "loftq" and self.loftq_config is not None:
            self.loftq_config = None  # PEFT writes {} when unused and ignores it
        changes_base = self.init_lora_weights in BASE_INITS or str(
            self.init_lora_weights).startswith("pissa")
        if changes_base and self.method != "lora":
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} changes the base "
                             f"weight and is for method lora only, not {self.method}")
        return self

    @model_validator(mode="after")
    def _dora_both_ways(self):
        if self.method == "dora" and not self.use_dora:
            self.use_dora = True
        elif self.use_dora and self.method == "lora":
            self.method = "dora"
        return self


class MoeLoraConfig(_LowRankFields):
    """Mixture of LoRA experts: per target module, `num_experts` LoRAs mixed by a learned router."""

    method: Literal["moe_lora"] = "moe_lora"
    r: int = Field(8, gt=0, description="rank of each expert")
    num_experts: int = Field(4, ge=2, description="LoRA experts per target module")
    top_k: int | None = Field(None, gt=0, description="route each token to its k best experts "
                              "(renormalized); None: dense softmax over all experts")
    router_aux_loss_coef: float = Field(0.01, ge=0, description="weight of the load-balancing loss")
    use_dora: Literal[False] = False

    @model_validator(mode="after")
    def _k_within_experts(self):
        if self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        return self


class AdaLoraConfig(_LowRankFields):
    """AdaLoRA: updates P·diag(E)·Q whose total rank shrinks from init_r to target_r per module
    (on average), pruning the least important singular values on a cubic schedule."""

    method: Literal["adalora"] = "adalora"
    init_r: int = Field(12, gt=0, description="starting rank of every module")
    target_r: int = Field(8, gt=0, description="average final rank per module (total budget)")
    tinit: int = Field(0, ge=0, description="warm-up steps before any pruning")
    tfinal: int = Field(0, ge=0, description="final steps trained at the target budget")
    deltaT: int = Field(1, gt=0, description="steps between budget allocations")
    beta1: float = Field(0.85, ge=0, lt=1, description="EMA of importance (sensitivity)")
    beta2: float = Field(0.85, ge=0, lt=1, description="EMA of importance uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the P/Q orthogonality loss")
    total_step: int | None = Field(None, gt=0, description="training steps (set by the trainer)")
    use_dora: Literal[False] = False

    @model_validator(mode="after")
    def _budget(self):
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} exceeds init_r={self.init_r}")
        return self

    @property
    def r(self) -> int:
        return self.init_r


class IA3Config(AdapterConfig):
    """(IA)³: learned per-channel scales on keys, values and the MLP's inner activation."""

    method: Literal["ia3"] = "ia3"
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        description="scaled layers: outputs scaled, except feedforward_modules (inputs scaled)")
    feedforward_modules: list[str] | str = Field(
        default_factory=lambda: ["down_proj"],
        description="targets whose input is scaled (the MLP activation); a subset of targets")
    init_ia3_weights: bool = Field(True, description="start the scales at 1 (no change)")
    modules_to_save: list[str] = Field(default_factory=list, description="fully trained modules")


class PromptConfig(AdapterConfig):
    """Prompt tuning: trained virtual-token embeddings in front of every input."""

    method: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, gt=0)
    prompt_tuning_init: Literal["random", "text"] = Field(
        "random", description="text: start from the embeddings of prompt_tuning_init_text")
    prompt_tuning_init_text: str | None = None

    @model_validator(mode="after")
    def _text_given(self):
        if self.prompt_tuning_init == "text" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init: text needs prompt_tuning_init_text")
        return self


class PrefixConfig(AdapterConfig):
    """Prefix tuning: trained key/value prefixes in every attention layer."""

    method: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, gt=0)
    prefix_projection: bool = Field(
        False, description="reparameterize through an MLP (embedding → hidden → all layers' k/v)")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="hidden width of that MLP (default: the model's hidden size)")


class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters: down-project, nonlinearity, up-project, residual (Houlsby et al.)."""

    method: Literal["bottleneck"] = "bottleneck"
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and after the MLP; pfeiffer: MLP only")
    bottleneck_size: int = Field(64, gt=0, description="width of the down-projection")
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    modules_to_save: list[str] = Field(default_factory=list, description="fully trained modules")


class _FactoredUpdateFields(AdapterConfig):
    """Options LoHa and LoKr share, named as in PEFT (after LyCORIS) so adapter files round-trip.
    Their classes live here, not in adapters/: the CLI parses a config before it imports torch."""

    r: int = Field(8, gt=0, description="rank of each low-rank factor")
    alpha: float = Field(8.0, description="scale numerator: the update is scaled by alpha / r")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training only: each step "
                                "drops each output row of the update with this probability")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training only: each step "
                                  "skips a layer's whole update with this probability")
    target_modules: list[str] | str = Field(
        "all-linear", description="module names, one regex string, or 'all-linear' (not lm_head)")
    modules_to_save: list[str] = Field(default_factory=list, description="fully trained modules")

    @property
    def lora_alpha(self) -> float:
        """`alpha` under the name per-module alpha patterns are resolved with (adapters/inject)."""
        return self.alpha


class LoHaConfig(_FactoredUpdateFields):
    """LoHa: the update is the Hadamard (element-wise) product of two rank-r products."""

    method: Literal["loha"] = "loha"
    init_weights: bool = Field(True, description="True: one factor starts at 0 (a fresh adapter "
                               "changes nothing); False: all factors random")


class LoKrConfig(_FactoredUpdateFields):
    """LoKr: the update is the Kronecker product of a small and a large (low-rank) factor."""

    method: Literal["lokr"] = "lokr"
    decompose_both: bool = Field(False, description="also write the small factor as a rank-r "
                                 "product (when r is below half its larger side)")
    decompose_factor: int = Field(-1, ge=-1, description="split each dimension as m·n, m = this "
                                  "when it divides the dimension, else the largest divisor below "
                                  "it up to the square root; -1: near the square root")
    rank_dropout_scale: bool = Field(False, description="with rank_dropout: scale the kept rows "
                                     "up by 1/(fraction kept)")
    init_weights: bool | Literal["lycoris"] = Field(
        True, description="True: the small factor starts at 0; lycoris: the large one does "
        "(either way a fresh adapter changes nothing); False: all factors random")


class VeraConfig(AdapterConfig):
    """VeRA: one pair of frozen random projections A, B shared by every adapted layer; each layer
    trains two vectors only, d on the rank and b on the outputs: ΔW = diag(b)·B·diag(d)·A.
    (Here, not in adapters/vera.py: the CLI parses a config before it imports torch.)"""

    method: Literal["vera"] = "vera"
    r: int = Field(256, gt=0, description="rank of the shared projections (a layer trains only "
                   "r + out values, so VeRA affords far higher ranks than LoRA)")
    target_modules: list[str] | str = Field(
        "all-linear", description="module names, one regex string, or 'all-linear' (not lm_head)")
    projection_prng_key: int = Field(0, description="seed the shared projections are drawn from")
    save_projection: bool = Field(
        True, description="write the projections into the adapter file; false: a reader draws "
        "them again from projection_prng_key (a smaller file, exact only while torch's random "
        "generator stays the same)")
    vera_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    d_initial: float = Field(0.1, description="starting value of every d (b starts at 0, so a "
                             "fresh adapter changes nothing)")
    bias: Literal["none", "all"] = "none"
    init_weights: bool = Field(True, description="True: d = d_initial, b = 0; False: b = 1, "
                               "d ~ N(0, 1) (the adapter changes the output from the start)")
    modules_to_save: list[str] = Field(default_factory=list, description="fully trained modules")


class OFTConfig(AdapterConfig):
    """OFT: each adapted layer sees its input turned by a block-diagonal orthogonal matrix, the
    Cayley transform of trained skew-symmetric blocks (PEFT's OFT, version 0.18 and later).
    (Here, not in adapters/oft.py: the CLI parses a config before it imports torch.)"""

    method: Literal["oft"] = "oft"
    r: int = Field(0, ge=0, description="blocks per layer; give r or oft_block_size and set the "
                   "other to 0 (r × oft_block_size = the layer's input width)")
    oft_block_size: int = Field(32, ge=0, description="width of each block (a divisor of the "
                                "input width; otherwise the nearest divisor, with a warning)")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training only: each step "
                                  "this fraction of a layer's blocks is left unturned")
    target_modules: list[str] | str = Field(
        "all-linear", description="module names, one regex string, or 'all-linear' (not lm_head)")
    bias: Literal["none", "all"] = "none"
    init_weights: bool = Field(True, description="True: every block starts as the identity; "
                               "False: random generators (std 0.1)")
    coft: bool = Field(False, description="constrained OFT: before each use a block's generator "
                       "is pulled back to Frobenius norm eps/√blocks at most")
    eps: float = Field(6e-5, gt=0, description="COFT's radius (only with coft: true)")
    block_share: bool = Field(False, description="one trained block, shared by all blocks of a "
                              "layer")
    use_cayley_neumann: bool = Field(
        True, description="approximate the Cayley transform by a truncated Neumann series "
        "(no matrix inverse: faster, nearly orthogonal) instead of solving it exactly")
    num_cayley_neumann_terms: int = Field(5, gt=0, description="terms of that series")
    modules_to_save: list[str] = Field(default_factory=list, description="fully trained modules")

    @model_validator(mode="after")
    def _r_or_block_size(self):
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(f"r={self.r}, oft_block_size={self.oft_block_size}: give exactly one "
                             "of them and set the other to 0 (r × oft_block_size is a layer's "
                             "input width)")
        return self


def adapter_config_from(data: dict | AdapterConfig | None) -> AdapterConfig:
    """The config class `data['method']` names (default lora); errors list the methods."""
    if data is None:
        return LoraConfig()
    if isinstance(data, BaseModel):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping of adapter options, got {data!r}")
    method = data.get("method", "dora" if data.get("use_dora") else "lora")
    if method not in _ADAPTER_OPTIONS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(_ADAPTER_OPTIONS)}")
    cls = _ADAPTER_OPTIONS[method]
    foreign = [k for k in data if k not in cls.model_fields]
    if foreign:
        owners = {k: [m for m, c in _ADAPTER_OPTIONS.items() if k in c.model_fields and m != method]
                  for k in foreign}
        detail = "; ".join(f"'{k}'" + (f" (an option of {', '.join(dict.fromkeys(o))})" if o else
                                       " (no method has it)") for k, o in owners.items())
        # The method's own options first, those every method has (adapter.dtype) last.
        own = [f for f in cls.model_fields if f != "method" and f not in AdapterConfig.model_fields]
        raise ValueError(f"method {method!r} has no option {detail}. Options of {method}: "
                         f"{', '.join(own + list(AdapterConfig.model_fields))}")
    return cls.model_validate(data)


class DataConfig(_Section):
    train: str = Field("demo", description="data file, or 'demo' for the bundled demo set "
                       "('demo-pairs': its preference pairs)", json_schema_extra=USER_PATH)
    eval: str | None = Field(None, description="held-out file; 'demo' pairs with train: demo",
                             json_schema_extra=USER_PATH)
    format: Literal["auto", "alpaca", "messages", "sharegpt"] = "auto"
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


class RunConfig(_Section):
    output_dir: str = "runs/demo"
    model: ModelConfig = Field(default_factory=ModelConfig)
    # SerializeAsAny: dump the method's own fields, not just those of the base class.
    adapter: SerializeAsAny[AdapterConfig] = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

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


def _format_errors(err: ValidationError, source: str, flags: dict[str, str] | None = None) -> str:
    """One line per problem, naming the key (and its command-line flag, when it has one)."""
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        flag = next((flags[k] for k in _prefixes(key) if k in flags), None) if flags else None
        named = f"key '{key}'" + (f" ({flag})" if flag else "")
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        elif e["type"] == "missing":
            lines.append(f"  missing {named}")
        elif not key:  # a rule across several keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {named}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _prefixes(key: str) -> list[str]:
    """'weights.1' -> ['weights.1', 'weights']: the key, then the keys that hold it."""
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 1e-4); the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        set_key(data, path, value, f"override '{item}'")
    return data


def set_key(data: dict, path: list[str], value: Any, what: str) -> None:
    """data[path[0]][path[1]]... = value, making the sections on the way."""
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def build_config(data: dict, source: str = "config") -> RunConfig:
    return validate_config(RunConfig, data, source)


def validate_config(cls: type[_Section], data: dict, source: str,
                    flags: dict[str, str] | None = None):
    """`cls` from `data`, or a ConfigError naming each bad key (and its flag, from `flags`)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, flags)) from None


def read_yaml(path: str | Path) -> dict:
    """The mapping a YAML config file holds; a ConfigError for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or defaults when path is None) and apply overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(Path(path)) if path is not None else "defaults"
    return build_config(apply_overrides(data, list(overrides)), source)
