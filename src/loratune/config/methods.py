"""Adapter methods' options: one class per method (its `method` Literal names it), the base
they share, and `adapter_config_from`, which picks the class a mapping's `method` names.

Defining a subclass of `AdapterConfig` is what makes `adapter.method: <name>` select it.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, Field, StringConstraints, model_validator

from loratune.config.base import USER_PATH, _Section


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


def trains_layer_biases(config: AdapterConfig) -> bool:
    """bias: <method>_only (lora_only, vera_only, oft_only): the biases of the adapted layers
    train and are saved with the adapter (PEFT's rule: any value ending in _only)."""
    return str(getattr(config, "bias", "none")).endswith("_only")


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
    loftq_iter: int = Field(1, gt=0, le=16, description="alternations of NF4 quantization and "
                            "SVD, each per layer at load too (PEFT uses 1-5; at most 16, so a "
                            "downloaded adapter_config cannot make loading run for hours)")


class EvaOptions(_Section):
    """EVA (init_lora_weights: eva), named as PEFT's eva_config (EvaConfig)."""

    rho: float = Field(2.0, ge=1.0, description="a layer may get up to rho·r ranks when the "
                       "budget (r per layer) is redistributed; 1.0: every layer keeps r")
    tau: float = Field(0.99, ge=0.0, le=1.0, description="a layer's SVD stops once every "
                       "component it needs is this cosine-similar to the batch before's")
    use_label_mask: bool = Field(True, description="use only the positions whose label is not "
                                 "label_mask_value (the trained tokens)")
    label_mask_value: int = Field(-100, description="the label of positions left out")
    whiten: bool = Field(False, description="divide each component by the square root of its "
                         "singular value")
    adjust_scaling_factors: bool = Field(
        True, description="scale each layer's alpha with its new rank (alpha·r_new/r), so "
        "every layer keeps the scale alpha/r")


# Inits that move a rank-r part of the base weight into the adapter (the base keeps the rest);
# pissa_niter_K (a randomized SVD with K subspace iterations) too.
BASE_INITS = ("pissa", "olora", "loftq")
# Inits whose options sit in a field of their own (PEFT's names), None when another init runs.
INIT_OPTIONS = {"loftq": ("loftq_config", LoftQOptions), "eva": ("eva_config", EvaOptions)}


class LoraConfig(_LowRankFields):
    """LoRA (and DoRA) hyper-parameters."""

    method: Literal["lora", "dora"] = Field(
        "lora", description="dora: weight-decomposed LoRA (a trained magnitude per output row)")
    r: int = Field(8, gt=0, description="rank of the update B·A")
    use_dora: bool = Field(False, description="PEFT's name for method: dora")
    init_lora_weights: Literal[True, "gaussian", "pissa", "olora", "loftq", "eva"] | Annotated[
        str, StringConstraints(pattern=r"^pissa_niter_[1-9][0-9]?$")] = Field(
        True, description="True: A kaiming-uniform, B = 0; 'gaussian': A ~ N(0, 1/r), B = 0; "
        "'pissa': A, B from W's r principal singular directions, the base keeps the residual "
        "('pissa_niter_K': by a randomized SVD with K iterations, K an integer 1-99); 'olora': from W's QR "
        "factorization; 'loftq': the base becomes NF4(W - s·B·A), B·A fitted to the "
        "quantization error; 'eva': A from the SVD of each layer's inputs over the first "
        "training batches, ranks redistributed across layers (eva_config), B = 0. PiSSA and "
        "OLoRA files are saved as plain LoRAs of rank 2r for the unchanged base")
    loftq_config: LoftQOptions | None = Field(None, description="LoftQ's options (with "
                                              "init_lora_weights: loftq)")
    eva_config: EvaOptions | None = Field(None, description="EVA's options (with "
                                          "init_lora_weights: eva)")

    @model_validator(mode="after")
    def _init_options_fit(self):
        for init, (field, options) in INIT_OPTIONS.items():
            if self.init_lora_weights == init and getattr(self, field) is None:
                setattr(self, field, options())
            elif self.init_lora_weights != init and getattr(self, field) is not None:
                setattr(self, field, None)  # PEFT writes {}/null when unused and ignores it
        data_or_base = self.init_lora_weights in (*BASE_INITS, "eva") or str(
            self.init_lora_weights).startswith("pissa")
        if data_or_base and self.method != "lora":
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} is for method lora "
                             f"only, not {self.method}")
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
    bias: Literal["none", "all", "vera_only"] = Field(
        "none", description="biases trained (and saved) with the adapter: all, or vera_only "
        "(those of the adapted layers)")
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
    bias: Literal["none", "all", "oft_only"] = Field(
        "none", description="biases trained (and saved) with the adapter: all, or oft_only "
        "(those of the adapted layers)")
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
