"""`loratune search`: an Optuna study over adapter method, rank, targets, learning rate ... with
the memory planner as the constraint.

Every sampled configuration is planned first; one the planner puts above `search.memory_gib`
is pruned with the reason and never started. A feasible one trains in its own process (as
`compare` does, so its peak memory is its own) while this process reads its intermediate
held-out losses from metrics.jsonl and stops it when the pruner says so. The study lives in
Optuna's storage (`<output_dir>/study.db`): running the same command again continues it, and
finished trials (complete or pruned) are not run again.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml

from loratune.config import ConfigError, RunConfig, SearchConfig, SearchRange, build_config
from loratune.files import write_atomic_file

# search.space.targets names -> adapter.target_modules (Llama-style module names)
TARGETS = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "mlp": ["gate_proj", "up_proj", "down_proj"], "all-linear": "all-linear"}
# space key -> (section, key) it sets, for the keys that map one to one
PLAIN_KEYS = {"r": ("adapter", "r"), "lora_alpha": ("adapter", "lora_alpha"),
              "dropout": ("adapter", "lora_dropout"), "lr": ("train", "lr")}
POLL_S = 0.5  # how often a running trial's metrics.jsonl is read


class TrialFailed(RuntimeError):
    """A trial's process failed: the study records it as failed and goes on."""


# --- sampling ----------------------------------------------------------------------------------


def suggest(trial, name: str, spec, log: bool = False):
    """One value of `spec` (a list of choices or a SearchRange) under Optuna name `name`."""
    if not isinstance(spec, SearchRange):
        # Optuna stores choices as given only for None/bool/int/float/str: others by index.
        if all(v is None or isinstance(v, (bool, int, float, str)) for v in spec):
            return trial.suggest_categorical(name, spec)
        return spec[trial.suggest_categorical(name, list(range(len(spec))))]
    log = spec.log or log
    if isinstance(spec.low, int) and isinstance(spec.high, int) and not isinstance(
            spec.step, float):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step or 1, log=log)
    return trial.suggest_float(name, spec.low, spec.high, step=None if log else spec.step,
                               log=log)


def set_path(data: dict, path: str, value) -> None:
    *heads, last = path.split(".")
    for key in heads:
        data = data.setdefault(key, {})
    data[last] = value


def sampled_config(trial, base: dict, search: SearchConfig) -> dict:
    """The run config (a dict, `search` left out) of this trial's sampled values."""
    from loratune.adapters import method_record
    from loratune.recipes.compare import method_adapter

    space = search.space
    data = copy.deepcopy({k: v for k, v in base.items() if k != "search"})
    adapter = data.get("adapter") or {}
    method = suggest(trial, "method", space.method) if space.method else adapter.get(
        "method", "lora")
    data["adapter"] = adapter = method_adapter(adapter, method)
    own = method_record(method).config_class.model_fields
    for key, (section, field) in PLAIN_KEYS.items():
        spec = getattr(space, key)
        if spec is not None and (section != "adapter" or field in own):
            data.setdefault(section, {})[field] = suggest(trial, key, spec, log=key == "lr")
    if space.targets and "target_modules" in own:
        targets = suggest(trial, "targets", space.targets)
        adapter["target_modules"] = TARGETS.get(targets, targets) if isinstance(
            targets, str) else targets
    if space.quantization:
        quant = (base.get("model") or {}).get("quantization") or {}
        on = suggest(trial, "quantization", space.quantization)
        data.setdefault("model", {})["quantization"] = quant if on else None
    for path, spec in space.fields.items():
        set_path(data, path, suggest(trial, path, spec))
    return data


# --- the planner as the constraint --------------------------------------------------------------


def planned_gib(cfg: RunConfig) -> tuple[float, str]:
    """The planner's peak memory of one training step of `cfg`, in GiB, and a note on it."""
    from loratune.config.commands import PlanConfig
    from loratune.plan.from_run import run_settings
    from loratune.plan.memory import estimate
    from loratune.plan.report import setup_of
    from loratune.plan.shapes import resolve_shape

    note = ""
    run = cfg
    if getattr(cfg.adapter, "r", None) is None:
        # Methods without a rank train fewer weights than a rank-1 LoRA on every linear layer.
        run = cfg.model_copy(update={"adapter": build_config(
            {"adapter": {"method": "lora", "r": 1}}).adapter})
        note = f"{cfg.adapter.method} planned as LoRA r=1 (an upper bound of its weights)"
    settings = PlanConfig.model_validate(run_settings(run))
    total = estimate(resolve_shape(cfg.model.name), setup_of(settings)).total
    return total / 2**30, note


def check_feasible(trial, cfg: RunConfig, search: SearchConfig) -> None:
    """Prune (never start) a trial the planner puts above the memory budget."""
    import optuna

    planned, note = planned_gib(cfg)
    trial.set_user_attr("planned_gib", round(planned, 4))
    if note:
        trial.set_user_attr("plan_note", note)
    if search.memory_gib is not None and planned > search.memory_gib:
        why = f"planned {planned:.2f} GiB > search.memory_gib {search.memory_gib:g}"
        trial.set_user_attr("pruned_why", why)
        raise optuna.TrialPruned(why)


# --- one trial in its own process ---------------------------------------------------------------


def new_eval_losses(metrics: Path, after: int) -> list[tuple[int, float]]:
    """(step, held-out loss) records of metrics.jsonl past step `after` (the last step's loss
    is written twice: by eval_every and by the final evaluation)."""
    if not metrics.is_file():
        return []
    found = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line still being written
            break
        if "eval_loss" in record and int(record["step"]) > after:
            after = int(record["step"])
            found.append((after, float(record["eval_loss"])))
    return found


def watch(trial, proc: subprocess.Popen, metrics: Path) -> None:
    """Report the trial's intermediate held-out losses; stop its process when pruned."""
    import optuna

    last = 0
    while True:
        done = proc.poll() is not None
        for step, loss in new_eval_losses(metrics, last):
            last = step
            trial.report(loss, step)
            if not done and trial.should_prune():
                proc.kill()
                proc.wait()
                why = f"held-out loss {loss:.4f} at step {step} (pruner)"
                trial.set_user_attr("pruned_why", why)
                raise optuna.TrialPruned(why)
        if done:
            return
        time.sleep(POLL_S)


def launch(cfg_path: Path, result_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loratune.recipes.search", str(cfg_path),
                             str(result_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def run_trial(trial, data: dict, folder: Path) -> dict:
    """Train `data` in a child process; its result row (held-out loss, peak memory, time)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path, result_path = folder / "config.yaml", folder / "result.json"
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    result_path.unlink(missing_ok=True)
    proc = launch(cfg_path, result_path)
    try:
        watch(trial, proc, Path(data["output_dir"]) / "metrics.jsonl")
    finally:
        if proc.poll() is None:  # interrupted: no orphan trains on
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or not result_path.is_file():
        raise TrialFailed(f"trial {trial.number} failed (exit {proc.returncode}): "
                          f"{(proc.stderr.read() if proc.stderr else '')[-2000:]}")
    return json.loads(result_path.read_text())


def objective(trial, base: dict, search: SearchConfig, out: Path) -> float:
    data = sampled_config(trial, base, search)
    data["output_dir"] = str(out / "trials" / str(trial.number))
    trial.set_user_attr("config", data)
    try:
        cfg = build_config(data, f"trial {trial.number}")
    except ConfigError as err:  # a combination the config refuses: not a point of the space
        import optuna

        trial.set_user_attr("pruned_why", f"invalid config: {err}")
        raise optuna.TrialPruned(str(err)) from None
    check_feasible(trial, cfg, search)
    row = run_trial(trial, data, out / "trials" / f"{trial.number}.run")
    trial.set_user_attr("measured_peak_gib", round(row["peak_rss_mib"] / 1024, 4))
    trial.set_user_attr("seconds", row["seconds"])
    if row["eval_loss"] is None:
        raise TrialFailed(f"trial {trial.number}: no held-out loss (set data.eval or "
                          "data.eval_fraction)")
    return row["eval_loss"]


def exit_with_parent(every_s: float = 2.0) -> None:
    """End this process when the search that started it is gone (kill -9 included): an
    orphaned trial would train on unseen while the resumed study starts another."""
    import os
    import threading

    parent = os.getppid()

    def check() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=check, daemon=True).start()


def train_worker(cfg_path: str, result_path: str) -> None:
    """Child process: train one trial's config, write its row."""
    exit_with_parent()
    from loratune.config import load_config
    from loratune.data.bundled import resolve_data_paths
    from loratune.models import load_model
    from loratune.recipes import quiet_transformers
    from loratune.train import train

    quiet_transformers()
    cfg = load_config(cfg_path)
    model, tok = load_model(cfg.model)
    result = train(cfg, model=model, tokenizer=tok, overwrite=True, quiet=True,
                   data_paths=resolve_data_paths(cfg))
    summary = json.loads((result.output_dir / "run_summary.json").read_text())
    row = {"eval_loss": result.eval_loss, "final_loss": result.final_loss,
           "peak_rss_mib": summary["peak_rss_mib"], "seconds": round(result.seconds, 2),
           "trainable": summary["trainable_params"], "adapter": str(result.adapter_dir)}
    Path(result_path).write_text(json.dumps(row, indent=2) + "\n")


# --- the study ----------------------------------------------------------------------------------


def search_settings(config_path: str, overrides: list[str]) -> tuple[dict, SearchConfig, Path]:
    """The base config dict, its search section and the study folder; errors before any trial."""
    from loratune.recipes.compare import load_settings

    data = load_settings(config_path, overrides)
    cfg = build_config(data, config_path)
    if cfg.search is None:
        raise ConfigError(f"{config_path}: no search section (search.space, search.trials ...; "
                          "see examples/search.yaml)")
    held_out = cfg.data.eval is not None or cfg.data.eval_fraction > 0 or cfg.data.train in (
        "demo",)
    if not held_out:
        raise ConfigError(f"{config_path}: search.objective eval_loss needs held-out data: set "
                          "data.eval or data.eval_fraction")
    for path in cfg.search.space.fields:  # every path must name a key the run config takes
        probe = copy.deepcopy(data)
        spec = cfg.search.space.fields[path]
        set_path(probe, path, spec[0] if isinstance(spec, list) else spec.low)
        build_config(probe, f"{config_path} (search.space.fields.{path})")
    return data, cfg.search, Path(cfg.output_dir)


def open_study(search: SearchConfig, out: Path, seed: int):
    import optuna

    url = search.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    # Heartbeats: a trial whose process was killed (-9) is marked failed on the next start
    # (Optuna calls the option experimental; it has been stable since 2.9).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)
    sampler = (optuna.samplers.TPESampler(seed=seed) if search.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    pruner = {"median": optuna.pruners.MedianPruner(n_warmup_steps=1),
              "hyperband": optuna.pruners.HyperbandPruner(),
              "none": optuna.pruners.NopPruner()}[search.pruner]
    return optuna.create_study(storage=storage, study_name=search.study_name, sampler=sampler,
                               pruner=pruner, direction=search.direction, load_if_exists=True)


def finished(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def run_search(config_path: str, overrides: list[str], quiet: bool = False) -> Path:
    """Run (or continue) the study up to search.trials finished trials; write the reports in
    the study folder (output_dir), which is returned."""
    import optuna

    base, search, out = search_settings(config_path, overrides)
    out.mkdir(parents=True, exist_ok=True)
    if quiet:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = search.seed if search.seed is not None else build_config(base).train.seed
    study = open_study(search, out, seed)
    todo = search.trials - len(finished(study))
    if todo > 0:
        study.optimize(lambda t: objective(t, base, search, out), n_trials=todo,
                       timeout=search.time, catch=(TrialFailed,))
    write_reports(study, out)
    return out


# --- reports ------------------------------------------------------------------------------------


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        seconds = attrs.get("seconds")
        rows.append({"trial": t.number, "state": t.state.name.lower(), "params": t.params,
                     "eval_loss": t.value, "planned_gib": attrs.get("planned_gib"),
                     "measured_peak_gib": attrs.get("measured_peak_gib"), "seconds": seconds,
                     "pruned_why": attrs.get("pruned_why")})
    return rows


def best_trial(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    return study.best_trial if done else None


def markdown(rows: list[dict], best) -> str:
    lines = ["| trial | state | params | held-out loss | planned GiB | measured peak GiB | s | "
             "pruned why |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in r["params"].items())
        cells = [r["trial"], r["state"], params, r["eval_loss"], r["planned_gib"],
                 r["measured_peak_gib"], r["seconds"], r["pruned_why"]]
        lines.append("| " + " | ".join("–" if c is None else (f"{c:.4f}" if isinstance(c, float)
                                                               else str(c)) for c in cells) + " |")
    head = (f"best: trial {best.number}, held-out loss {best.value:.4f} (best.yaml)\n\n"
            if best else "no trial completed yet\n\n")
    return head + "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    write_atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)


def write_reports(study, out: Path) -> None:
    """report.md, report.json and (once a trial completed) best.yaml, each temp-then-rename."""
    rows, best = trial_rows(study), best_trial(study)
    write_text(out / "report.json", json.dumps({"best_trial": best.number if best else None,
                                                "trials": rows}, indent=2) + "\n")
    write_text(out / "report.md", markdown(rows, best))
    if best is not None:
        config = {**best.user_attrs["config"], "output_dir": str(out / "best")}
        write_text(out / "best.yaml", f"# trial {best.number} of {out / 'study.db'}: held-out "
                   f"loss {best.value:.4f}\n" + yaml.safe_dump(config, sort_keys=False))


if __name__ == "__main__":
    train_worker(sys.argv[1], sys.argv[2])
