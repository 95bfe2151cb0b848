"""Typed options of the commands besides train: serve, merge, export, chat, generate, eval, plan.

Each class is both the command line and the YAML file: a field `max_body_bytes` is the flag
`--max-body-bytes` and the key `max_body_bytes:`; the model a command loads is a `model:`
section (`ModelConfig`, as in a training config) whose flags `FLAGS` names. `loratune serve
--config serve.yaml --port 9000` reads the file, then the flags given override it. As in
`RunConfig`, an unknown key or a wrong type is an error naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from loratune.config.base import read_yaml, set_key, validate_config
from loratune.config.run import DEFAULT_MODEL, ModelConfig, check_blocksize


def _comma_separated(v):
    """'0.7,0.3' (a flag's value) -> ['0.7', '0.3']; a YAML list passes as it is."""
    if isinstance(v, str):
        return v.split(",") if v.strip() else None
    return v


Dtype = Literal["float32", "bfloat16", "float16"]
# data/tool_calls.PARSERS (config imports nothing above it; a test keeps the two equal)
ToolParser = Literal["hermes", "llama3_json", "mistral", "phi4"]
Weights = Annotated[list[float] | None, BeforeValidator(_comma_separated)]
MODEL_FLAGS = {"--model": "model.name", "--device": "model.device", "--dtype": "model.dtype"}


class CommandConfig(BaseModel):
    """Base of a command's options. `FLAGS` maps the flags of keys inside sections to their
    dotted keys (with help text where the field's own description does not fit); every
    top-level field that is not a section is its own flag."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    FLAGS: ClassVar[dict[str, str | tuple[str, str]]] = {}

    @classmethod
    def flag_keys(cls) -> dict[str, str]:
        """flag -> dotted key, for every flag of the command."""
        out = {flag: spec if isinstance(spec, str) else spec[0] for flag, spec in cls.FLAGS.items()}
        out.update({f"--{name.replace('_', '-')}": name for name, field in cls.model_fields.items()
                    if not _is_section(field.annotation)})
        return out

    @classmethod
    def load(cls, path: str | Path | None = None, given: dict[str, Any] | None = None):
        """The options in YAML file `path` (if any), with `given` ({dotted key: value}, the
        flags typed) on top."""
        flags = {key: flag for flag, key in cls.flag_keys().items()}
        data = read_yaml(path) if path is not None else {}
        for key, value in (given or {}).items():
            set_key(data, key.split("."), value, f"{flags.get(key, key)} (in {path})")
        source = f"{path} and flags" if path is not None and given else str(path or "flags")
        return validate_config(cls, data, source, flags)


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


# -- serve ----------------------------------------------------------------------------------------
class _HttpAccess(CommandConfig):
    """Who may reach a local HTTP server (serve, ui): one set of rules for both
    (serve.api.startup_api_key, http_guard.HostPolicy)."""

    api_key: str | None = Field(
        None, description="require 'Authorization: Bearer KEY' (default: $LORATUNE_API_KEY)")
    insecure_no_key: bool = Field(False,
                                  description="allow a non-loopback --host without an API key")
    allowed_host: list[str] = Field(
        default_factory=list, description="another Host name the server answers (besides "
        "loopback names and --host), e.g. a name it is reached by through a proxy; repeat")


class ServeConfig(_HttpAccess):
    """`loratune serve`: an OpenAI-compatible HTTP server, one base and many adapters."""

    FLAGS: ClassVar = {**MODEL_FLAGS, "--quantize": (
        "model.quantization.type", "4-bit base weights (adapters stay full precision)")}

    model: ModelConfig = Field(default_factory=ModelConfig)
    adapters: str | None = Field(
        None, description="folder of PEFT LoRA adapters (sub-folder name = adapter name)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_adapters: int = Field(8, gt=0, description="adapters held in memory at once")
    host_adapters: int = Field(
        0, ge=0, description="evicted adapters kept in CPU memory (a second tier for GPU serving)")
    max_batch: int = Field(16, gt=0, description="requests decoded together")
    max_queue: int = Field(64, ge=0, description="waiting requests before 429")
    max_prompt_tokens: int = Field(2048, gt=0)
    max_completion_tokens: int = Field(1024, gt=0)
    kv_cache: Literal["auto", "slots", "dynamic"] = Field(
        "auto", description="the batch's KV cache: slots (preallocated rows written in place), "
        "dynamic (transformers' DynamicCache, for models slots refuse), auto (slots if the model "
        "allows)")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="replay each decode step as a CUDA graph (auto: on when the model "
        "is on CUDA and served from slots)")
    request_timeout: float = Field(120.0, gt=0,
                                   description="seconds per request, queue included (then 504)")
    # a 2048-token prompt is ~10 KB; 4 MiB leaves ample room
    max_body_bytes: int = Field(4 * 2**20, ge=1, description="larger request bodies get 413")
    route: str | None = Field(
        None, description="language router for model 'auto', e.g. zh=adapter_zh,en=adapter_en")
    served_name: str | None = Field(None, description="the base's id in /v1/models")
    threads: int | None = Field(None, gt=0,
                                description="torch threads (1 on a CPU shared with other jobs)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    tool_parser: ToolParser | None = Field(
        None, description="how answers are read as tool calls (default: from the chat template)")
    image_root: str | None = Field(
        None, description="folder that image parts' paths are read under (resolved, links "
        "included: a path leading outside is refused); none: images only as data: URLs")
    allow_remote_images: bool = Field(
        False, description="fetch image parts' http(s) URLs (refused when off)")
    image_max_pixels: int = Field(
        4096 * 4096, gt=0, description="image parts larger than this many pixels (width x "
        "height, read from the header before decoding), or a request's images together, are "
        "refused with a 400")


# -- merge and export -----------------------------------------------------------------------------
class ExportHfConfig(CommandConfig):
    """`loratune export hf`: the base as a plain Hugging Face folder (a GGUF file converted)."""

    model: str = Field(DEFAULT_MODEL, description="embedded name, HF folder or .gguf file")
    out: str = Field(description="output folder (written atomically)")
    dtype: Dtype | None = Field(None, description="dtype of the written weights (default: the "
                                "base's)")
    shard_size: str = Field("2GB", description="largest safetensors shard")
    overwrite: bool = Field(False, description="replace an existing --out")


class MergeConfig(ExportHfConfig):
    """`loratune merge`: adapters folded into the base, written as a Hugging Face folder."""

    adapter: list[str] = Field(min_length=1, description="adapter folder; repeat to merge a "
                               "weighted combination")
    weights: Weights = Field(None, description="one weight per adapter, e.g. 0.7,0.3")
    qlora: Literal["nf4", "fp4"] | None = Field(
        None, description="the adapter was trained on a 4-bit base: merge into the dequantized "
        "4-bit weights it saw")
    check: bool = Field(False, description="load both and report the largest logit difference "
                        "(needs memory for two models)")


class ExportGgufConfig(CommandConfig):
    """`loratune export gguf`: one GGUF file for llama.cpp (adapters merged in), or a LoRA."""

    model: str = Field(DEFAULT_MODEL, description="embedded name, HF folder or .gguf file")
    adapter: list[str] = Field(default_factory=list, description="adapter folder(s) to merge")
    weights: Weights = Field(None, description="one weight per adapter, e.g. 0.7,0.3")
    out: str = Field(description="output .gguf file")
    type: Literal["f32", "f16", "q8_0", "q4_0", "q4_k_m"] = "f16"
    adapter_only: bool = Field(False, description="write the LoRA adapter alone, for llama.cpp's "
                               "--lora")
    tokenizer_pre: str | None = Field(
        None, description="llama.cpp pre-tokenizer name for a byte-level BPE tokenizer, in place "
        "of the one detected from tokenizer.json (e.g. llama-bpe, qwen2, smollm)")
    round_yarn: bool = Field(False, description="write a model whose YaRN says truncate: false "
                             "(every GPT-OSS) as llama.cpp runs it, with the correction range "
                             "rounded to whole dimensions (prints how far the rotations drift)")
    modelfile: bool = Field(True, description="also write an Ollama Modelfile beside --out "
                            "(<out stem>.Modelfile: FROM, TEMPLATE, stop tokens, ADAPTER)")
    overwrite: bool = Field(False, description="replace an existing --out (and its Modelfile)")


# -- chat, generate, eval -------------------------------------------------------------------------
class _WithAdapters(CommandConfig):
    FLAGS: ClassVar = MODEL_FLAGS

    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: list[str] = Field(default_factory=list, description="adapter folder (PEFT format); "
                               "repeat to stack several")


class ChatConfig(_WithAdapters):
    """`loratune chat`: talk to the base with its adapters, or answer one prompt."""

    prompt: str | None = Field(None, description="one-shot: answer this and exit")
    system: str | None = Field(None, description="system prompt")
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None


class GenerateConfig(_WithAdapters):
    """`loratune generate`: answer prompts from a data file or the command line."""

    input: str | None = Field(None, description="data file (alpaca/messages/sharegpt)")
    prompt: list[str] = Field(default_factory=list, description="a prompt; repeat for several")
    out: str | None = Field(None, description="JSONL output (default stdout)")
    overwrite: bool = Field(False, description="replace an existing --out")
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        if self.input and self.prompt:
            raise ValueError("give input (--input) or prompt (--prompt), not both")
        if not (self.input or self.prompt):
            raise ValueError("give input (--input FILE) or prompt (--prompt TEXT, repeatable)")
        return self


Ints = Annotated[list[int], BeforeValidator(_comma_separated)]


class EvalCommandConfig(_WithAdapters):
    """`loratune eval`: a task (`loratune.eval.tasks`) on the base and each adapter, side by
    side. Options marked (mc), (code)... are read by that task only."""

    FLAGS: ClassVar = {**MODEL_FLAGS, "--quantize": (
        "model.quantization.type", "4-bit base weights, nf4 or fp4 (adapters stay full "
        "precision)")}

    task: str = Field("exact", description="exact, mc, perplexity, generate, code, preference, "
                      "tools, or another registered task")
    adapter: list[str] = Field(default_factory=list, description="adapter folder (PEFT format); "
                               "repeat to score several side by side")
    data: str = Field(description="the task's data file (mc: a file or a folder of them)")
    limit: int | None = Field(None, gt=0, description="evaluate only the first N items")
    out: str | None = Field(None, description="folder for eval-TASK.json and .md (default: the "
                            "run folder of a single adapter trained by loratune)")
    base: bool = Field(True, description="also score the base model, beside the adapters")
    stack: bool = Field(False, description="score the adapters stacked as one model, not one "
                        "column each")
    batch_size: int = Field(16, gt=0, description="prompts or options per forward")
    max_new_tokens: int | None = Field(None, gt=0, description="generated tokens per answer "
                                       "(default: exact 32, generate 128, code 384, tools 256)")
    shots: int = Field(0, ge=0, description="(mc) solved examples before each question, from "
                       "--dev")
    dev: str | None = Field(None, description="(mc) file or folder of solved examples for "
                            "--shots (MMLU's dev split)")
    mc_score: Literal["text", "letter"] = Field(
        "text", description="(mc) score each option's text, or its letter after 'Answer:'")
    max_length: int | None = Field(None, gt=1, description="(perplexity) window in tokens "
                                   "(default: the model's context length, at most 2048)")
    stride: int | None = Field(None, gt=0, description="(perplexity) tokens a window moves on "
                               "(default: half the window)")
    samples: int = Field(1, gt=0, description="(code) completions per problem (n of pass@k)")
    k: Ints = Field(default_factory=lambda: [1], description="(code) pass@k for each k, e.g. "
                    "1,10 (k <= --samples)")
    temperature: float = Field(0.0, ge=0, description="(generate, code) 0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, description="sampling seed")
    timeout: float = Field(10.0, gt=0, description="(code) wall seconds per completion")
    cpu_seconds: int = Field(5, gt=0, description="(code) CPU seconds per completion")
    memory_mb: int = Field(1024, gt=0, description="(code) address space per completion, MiB")
    workers: int = Field(2, gt=0, description="(code) completions run at once")
    tool_parser: ToolParser | None = Field(
        None, description="(tools) how answers are read as calls (default: from the template)")
    sandbox: Literal["bwrap", "none"] = Field(
        "bwrap", description="(code) bwrap: each completion under bubblewrap (namespaces, "
        "seccomp, a capped tmpfs; apt-get install bubblewrap); none: on this machine with only "
        "an audit hook and limits (a warning; not a boundary)")

    @model_validator(mode="after")
    def _k_within_samples(self):
        bad = [k for k in self.k if not 0 < k <= self.samples]
        if bad:
            raise ValueError(f"k (--k): {bad[0]} is not within 1..samples ({self.samples})")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples (--samples) > 1 needs temperature (--temperature) > 0: "
                             "greedy completions are all the same")
        return self


# -- plan -----------------------------------------------------------------------------------------
class PlanConfig(CommandConfig):
    """`loratune plan`: the memory one training step needs, and what fits a GPU."""

    model: str = Field("llama-2-7b", description="preset (llama-2-7b|13b|70b, 7b/13b/70b, "
                       "smollm2-135m-instruct, qwen3-30b-a3b), HF folder or config.json")
    method: Literal["full", "lora", "qlora"] = "qlora"
    batch: int = Field(1, gt=0, description="rows per micro-batch")
    seq: int = Field(512, gt=0, description="tokens per row")
    rank: int = Field(16, gt=0, description="LoRA rank")
    dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="base weights (full/lora) or compute dtype (qlora); activations too")
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    checkpointing: bool = Field(True, description="gradient checkpointing")
    loss_chunk: int = Field(1024, ge=0, description="tokens per chunk of the output-layer loss "
                            "(0: full logits)")
    blocksize: int = Field(64, gt=0, description="4-bit block size (qlora)")
    double_quant: bool = Field(True, description="quantized block scales (qlora)")
    device: str = Field("cuda", description="cuda or cpu (sets the runtime overhead)")
    gpu: str | None = Field(None, description="memory to fit: 24GB, 24GiB, 12g, or a GPU "
                            "(rtx3060, rtx4090, a100-40, a100-80, h100)")
    target_batch: int = Field(16, gt=0, description="effective batch to reach")
    table: bool = Field(False, description="print the 7B/13B/70B x full/LoRA/QLoRA matrix instead")
    gpus: int = Field(1, gt=0, description="data-parallel GPUs; figures are per GPU")
    experts: bool = Field(False, description="MoE bases: LoRA on the routed experts too "
                          "('experts' in adapter.target_modules), r per expert and projection")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp replicates the base on every GPU, fsdp shards it")
    scaling: bool = Field(False, description="print 7B/13B/70B x method x ddp/fsdp on 1/2/4/8 "
                          "GPUs instead")

    @field_validator("blocksize")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        return check_blocksize(v)


# -- ui -------------------------------------------------------------------------------------------
class UiConfig(_HttpAccess):
    """`loratune ui`: a local web dashboard over a folder of runs (same key rules as serve)."""

    runs: str = Field("runs", description="folder of run folders (launched runs go here too)")
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=0, le=65535)
    serve_url: str | None = Field(
        None, description="a running `loratune serve` for the chat playground, e.g. "
        "http://127.0.0.1:8000")
    serve_key: str | None = Field(None, description="the API key that server wants, if any")
    serve_adapters: str | None = Field(
        None, description="no --serve-url: start a loratune serve over this adapters folder "
        "for the chat page (stopped with the dashboard)")
    serve_model: str | None = Field(None, description="the base model that server loads "
                                    "(default: serve's default)")
    data_root: list[str] = Field(
        default_factory=list, description="a folder runs launched from the dashboard may read "
        "data, models, init_from and DeepSpeed configs from (besides --runs); repeat (default: "
        "the current directory)")
    allow_remote_tracker: bool = Field(
        False, description="let launched runs send to a remote MLflow URI (http://...)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "warning"
