"""One entry point: `loratune train|demo|chat|generate|eval`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _quiet_transformers() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _load(model_name: str, adapters: list[str], device: str, dtype: str):
    from loratune.adapters import load_adapter, set_active
    from loratune.config import ModelConfig
    from loratune.models import load_model

    model, tok = load_model(ModelConfig(name=model_name, device=device, dtype=dtype))
    names = []
    for i, folder in enumerate(adapters):
        name = f"a{i}" if len(adapters) > 1 else "default"
        load_adapter(model, folder, name, tokenizer=tok)
        names.append(name)
    if names:
        set_active(model, names)
        model.requires_grad_(False)
    return model, tok


def cmd_train(args) -> int:
    import os

    from loratune.config import load_config

    cfg = load_config(args.config, args.overrides)   # a bad config fails here, once
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from loratune.train.distributed import check_world_size, launch

        check_world_size(cfg.train.grad_accum, cfg.train.batch_size, args.nproc)
        argv = [args.config, *args.overrides]
        argv += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
        argv += ["--resume-skip-corrupt"] * args.resume_skip_corrupt
        return launch(args.nproc, argv)
    from loratune.train import train

    result = train(cfg, resume=args.resume or args.resume_skip_corrupt,
                   overwrite=args.overwrite, skip_corrupt=args.resume_skip_corrupt)
    if int(os.environ.get("RANK", 0)) == 0:  # every rank returns; one message
        print(f"adapter saved to {result.adapter_dir} ({result.steps} steps, "
              f"final loss {result.final_loss:.4f}, {result.seconds:.0f} s)")
    return 0


def cmd_demo(args) -> int:
    from loratune.demo.job import run_demo

    run_demo(output_dir=args.output_dir, overrides=args.overrides)
    return 0


def _system_messages(args) -> list[dict]:
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    return messages


def cmd_chat(args) -> int:
    from loratune.eval.generate import generate_chat

    model, tok = _load(args.model, args.adapter, args.device, args.dtype)
    history = _system_messages(args)
    opts = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                temperature=args.temperature or 1.0, top_p=args.top_p, seed=args.seed)
    if args.prompt is not None:
        history.append({"role": "user", "content": args.prompt})
        print(generate_chat(model, tok, [history], **opts)[0])
        return 0
    print("chat: empty line or Ctrl-D to quit, /reset to clear history")
    base = list(history)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = list(base)
            continue
        history.append({"role": "user", "content": line})
        answer = generate_chat(model, tok, [history], **opts)[0]
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}")
    return 0


def _given_paths(*names: str | None) -> list[Path]:
    """The command's inputs that are paths on disk (an embedded model's name is not)."""
    return [Path(n).expanduser() for n in names if n and Path(n).expanduser().exists()]


def cmd_generate(args) -> int:
    from loratune.config import DataConfig
    from loratune.data import load_conversations
    from loratune.eval.generate import generate_chat
    from loratune.files import check_new_file, check_output_path, write_atomic_file

    if args.out:  # before the slow part: never overwrite an input, or a file unasked
        check_output_path(args.out, _given_paths(args.input, args.model, *args.adapter))
        check_new_file(Path(args.out), args.overwrite)
    model, tok = _load(args.model, args.adapter, args.device, args.dtype)
    if args.input:
        convs = load_conversations(args.input, DataConfig(train=args.input))
        prompts = [c[:-1] if c and c[-1]["role"] == "assistant" else c for c in convs]
    else:
        prompts = [[{"role": "user", "content": p}] for p in args.prompt]
    answers = generate_chat(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size)

    def write(out) -> None:
        for prompt, answer in zip(prompts, answers):
            out.write(json.dumps({"prompt": prompt[-1]["content"], "answer": answer},
                                 ensure_ascii=False) + "\n")

    if not args.out:
        write(sys.stdout)
        return 0

    def fill(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)

    write_atomic_file(args.out, fill, overwrite=args.overwrite)
    return 0


def cmd_eval(args) -> int:
    from loratune.config import DataConfig
    from loratune.data import load_conversations
    from loratune.eval.heldout import exact_match_eval

    model, tok = _load(args.model, args.adapter, args.device, args.dtype)
    convs = load_conversations(args.data, DataConfig(train=args.data))
    report = exact_match_eval(model, tok, convs[: args.limit] if args.limit else convs,
                              args.max_new_tokens)
    print(f"exact match: {report.accuracy:.1%} ({sum(r.correct for r in report.rows)}/{report.n})")
    return 0


def cmd_compare(args) -> int:
    from loratune.recipes.compare import (load_settings, method_adapter, parse_method_values,
                                          run_variants, write_report)

    settings = load_settings(args.config, args.overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    variants = {m: method_adapter(settings.get("adapter") or {}, m) for m in methods}
    lrs = parse_method_values(args.lr, methods, "--lr")
    rows = run_variants(settings, variants, args.out, quiet=args.quiet, lrs=lrs)
    print(write_report(rows, Path(args.out), "compare"))
    print(f"\nwritten: {args.out}/compare.md, compare.png, compare.json")
    return 0


def cmd_tune_rank(args) -> int:
    from loratune.adapters import method_record
    from loratune.config import ConfigError
    from loratune.recipes.compare import (best_rank, load_settings, method_adapter,
                                          run_variants, write_report)

    settings = load_settings(args.config, args.overrides)
    base = settings.get("adapter") or {}
    method = base.get("method", "lora")
    if not method_record(method).has_rank:
        raise ConfigError(f"tune-rank varies r; adapter.method {method!r} has no r")
    ratio = base.get("lora_alpha", 8.0) / base.get("r", 8)
    ranks = [int(r) for r in args.ranks.split(",")]
    variants = {f"r{r}": {**method_adapter(base, method), "r": r, "lora_alpha": ratio * r}
                for r in ranks}
    rows = run_variants(settings, variants, args.out, quiet=args.quiet)
    print(write_report(rows, Path(args.out), "tune_rank"))
    best = best_rank(rows)
    print(f"\nbest: {best['variant']} (held-out exact match "
          f"{best['score'] if best['score'] is None else format(best['score'], '.1%')}, "
          f"adapter {best['adapter']})")
    return 0


def cmd_merge(args) -> int:
    import shutil

    from loratune.config import QuantConfig
    from loratune.export.merge import base_folder, merge_folder, nf4_round_trip, read_adapters
    from loratune.files import check_output_path

    check_output_path(args.out, _given_paths(args.model, *args.adapter))  # a gguf model file
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    adapters = read_adapters(args.adapter, weights)
    base, tmp = base_folder(args.model)
    try:
        transform = None
        if args.qlora:
            config = json.loads((base / "config.json").read_text())
            transform = nf4_round_trip(config, QuantConfig(type=args.qlora))
        report = merge_folder(base, adapters, Path(args.out), dtype=args.dtype,
                              shard_size=args.shard_size, overwrite=args.overwrite,
                              transform=transform)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {report.out}: {report.merged_modules} layers merged from {len(adapters)} "
          f"adapter(s), {report.shards} shard(s), {report.seconds:.1f} s")
    if args.check and adapters:
        from loratune.export.check import merged_logit_gap

        gap = merged_logit_gap(args.model, args.adapter, weights, report.out, args.qlora)
        print(f"max |logit difference| merged vs base + adapter{' (4-bit base)' if args.qlora else ''}: "
              f"{gap:.3g}")
    return 0


def cmd_export_gguf(args) -> int:
    import shutil
    import tempfile

    from loratune.export.gguf_file import write_gguf, write_lora_gguf
    from loratune.export.merge import base_folder, merge_folder, read_adapters
    from loratune.files import check_output_path

    check_output_path(args.out, _given_paths(args.model, *args.adapter))
    base, tmp = base_folder(args.model)
    try:
        if args.adapter_only:
            if len(args.adapter) != 1:
                raise ValueError("--adapter-only exports exactly one --adapter")
            out = write_lora_gguf(Path(args.adapter[0]), base, Path(args.out), args.type
                                  if args.type in ("f32", "f16") else "f32", args.overwrite)
        else:
            source = base
            work = None
            if args.adapter:
                weights = [float(w) for w in args.weights.split(",")] if args.weights else None
                work = Path(tempfile.mkdtemp(prefix="loratune-merge-"))
                source = merge_folder(base, read_adapters(args.adapter, weights),
                                      work / "merged").out
            try:
                out = write_gguf(source, Path(args.out), args.type,
                                 tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite)
            finally:
                if work is not None:
                    shutil.rmtree(work, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0


def cmd_serve(args) -> int:
    from loratune.serve.api import run

    return run(args)


def cmd_plan(args) -> int:
    from loratune.plan.report import run

    print(run(args))
    return 0


def _model_args(p: argparse.ArgumentParser, adapters: bool = True) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="embedded name, HF folder or .gguf file")
    if adapters:
        p.add_argument("--adapter", action="append", default=[],
                       help="adapter folder (PEFT format); repeat to stack several")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loratune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune an adapter from a YAML config")
    p.add_argument("config", help="YAML run config (see examples/)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=1e-4 adapter.r=16")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--resume-skip-corrupt", action="store_true",
                   help="resume from the newest readable checkpoint, passing over corrupt ones")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a used output_dir (the old run is kept as a backup)")
    p.add_argument("--nproc", type=int, default=None,
                   help="run N data-parallel processes on this machine (starts torchrun)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the main job: LoRA on the bundled demo task, before/after")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/demo-<time>)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("chat", help="chat with a base model and adapters")
    _model_args(p)
    p.add_argument("--prompt", help="one-shot: answer this and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="answer prompts from a file or the command line")
    _model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="data file (alpaca/messages/sharegpt)")
    src.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    p.add_argument("--out", help="JSONL output (default stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="exact-match accuracy on a held-out file")
    _model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="train several methods on the same data and budget")
    p.add_argument("config", help="YAML run config (its adapter options seed every method)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=40")
    p.add_argument("--methods", default="lora,dora,ia3",
                   help="comma-separated: lora,dora,ia3,prompt,prefix,bottleneck,moe_lora,adalora")
    p.add_argument("--lr", default="", help="per-method learning rates, e.g. ia3=1e-2,prompt=3e-2 "
                   "(others use train.lr)")
    p.add_argument("--out", default="runs/compare", help="folder for runs and the report")
    p.add_argument("--quiet", action="store_true", help="hide each run's progress")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("tune-rank", help="try several LoRA ranks, keep the best held-out score")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=40")
    p.add_argument("--ranks", default="4,8,16,32,64")
    p.add_argument("--out", default="runs/tune-rank")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tune_rank)

    def merge_args(p, adapters: bool) -> None:
        p.add_argument("--model", default="smollm2-135m-instruct",
                       help="embedded name, HF folder or .gguf file")
        if adapters:
            p.add_argument("--adapter", action="append", required=True,
                           help="adapter folder; repeat to merge a weighted combination")
            p.add_argument("--weights", help="one weight per adapter, e.g. 0.7,0.3")
            p.add_argument("--qlora", choices=["nf4", "fp4"], help="the adapter was trained on a "
                           "4-bit base: merge into the dequantized 4-bit weights it saw")
            p.add_argument("--check", action="store_true", help="load both and report the "
                           "largest logit difference (needs memory for two models)")
        p.add_argument("--out", required=True, help="output folder (written atomically)")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="dtype of the written weights (default: the base's)")
        p.add_argument("--shard-size", default="2GB", help="largest safetensors shard")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = sub.add_parser("merge", help="merge adapters into the base; write a Hugging Face folder")
    merge_args(p, adapters=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write the model in a deployable format")
    export = p.add_subparsers(dest="format", required=True)
    p = export.add_parser("hf", help="a plain Hugging Face folder (merge without adapters)")
    merge_args(p, adapters=False)
    p.set_defaults(func=cmd_merge, adapter=[], weights=None, qlora=None, check=False)
    p = export.add_parser("gguf", help="one GGUF file for llama.cpp (adapters merged in)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", action="append", default=[], help="adapter folder(s) to merge")
    p.add_argument("--weights", help="one weight per adapter, e.g. 0.7,0.3")
    p.add_argument("--out", required=True, help="output .gguf file")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0", "q4_k_m"])
    p.add_argument("--adapter-only", action="store_true",
                   help="write the LoRA adapter alone, for llama.cpp's --lora")
    p.add_argument("--tokenizer-pre", help="llama.cpp pre-tokenizer name, when the model has no "
                   "source GGUF to copy the tokenizer from (e.g. llama-bpe, smollm)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_gguf)

    from loratune.plan.report import add_arguments

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one base, many adapters")
    _model_args(p, adapters=False)
    p.add_argument("--adapters", default=None,
                   help="folder of PEFT LoRA adapters (sub-folder name = adapter name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-adapters", type=int, default=8, help="adapters held in memory at once")
    p.add_argument("--host-adapters", type=int, default=0,
                   help="evicted adapters kept in CPU memory (a second tier for GPU serving)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-completion-tokens", type=int, default=1024)
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds per request, queue included (then 504)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $LORATUNE_API_KEY)")
    p.add_argument("--insecure-no-key", action="store_true",
                   help="allow a non-loopback --host without an API key")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="larger request bodies get 413")
    p.add_argument("--route", default=None,
                   help="language router for model 'auto', e.g. zh=adapter_zh,en=adapter_en")
    p.add_argument("--quantize", choices=["nf4", "fp4"], default=None,
                   help="4-bit base weights (adapters stay full precision)")
    p.add_argument("--served-name", default=None, help="the base's id in /v1/models")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 on a CPU shared with other jobs)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("plan", help="memory needed for a training step, and what fits a GPU")
    add_arguments(p)
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    from loratune.adapters import AdapterError
    from loratune.config import ConfigError
    from loratune.data import DataError
    from loratune.models import ModelNotFound
    from loratune.plan import PlanError
    from loratune.train import RunFolderError

    try:
        return args.func(args)
    except (ConfigError, DataError, AdapterError, ModelNotFound, RunFolderError,
            FileExistsError, PlanError, ValueError) as err:
        print(f"loratune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
