"""`loratune search`: an Optuna study over adapter method, rank, targets, learning rate ... with
the memory planner as the constraint.

Every sampled configuration is planned first; one the planner puts above `search.memory_gib`
is pruned with the reason and never started. A feasible one trains in its own process (as
`compare` does, so its peak memory is its own) while this process reads its intermediate
held-out losses from metrics.jsonl and stops it when the pruner says so. The study lives in
Optuna's storage (`<output_dir>/study.db`): running the same command again continues it, and
finished trials (complete or pruned) are not run again, and several invocations sharing one
storage (workers, on one machine or many) split `search.trials` between them.

The objective is one name or a list (a multi-objective study, its Pareto front in the report):
held-out loss, a GRPO run's held-out reward, an `eval --task` metric scored in the trial's
process, measured peak memory, training time. Reports: search_report.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from loratune.config import ConfigError, RunConfig, SearchConfig, SearchRange, build_config
from loratune.config.run import SEARCH_OBJECTIVES

# search.space.targets names -> adapter.target_modules (Llama-style module names)
TARGETS = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "mlp": ["gate_proj", "up_proj", "down_proj"], "all-linear": "all-linear"}
# space key -> (section, key) it sets, for the keys that map one to one
PLAIN_KEYS = {"r": ("adapter", "r"), "lora_alpha": ("adapter", "lora_alpha"),
              "dropout": ("adapter", "lora_dropout"), "lr": ("train", "lr")}
POLL_S = 0.5  # how often a running trial's metrics.jsonl is read
WAIT_S = 2.0  # how often a worker with no trial left to claim looks at the others' again
# objective -> the metrics.jsonl key of its intermediate values (what the pruner judges)
INTERMEDIATE = {"eval_loss": "eval_loss", "reward": "eval_reward"}


class TrialFailed(RuntimeError):
    """A trial's process failed: the study records it as failed and goes on."""


class Surplus(TrialFailed):
    """Other workers claimed the study's last trials first: this one never starts."""


@dataclass(frozen=True)
class Goal:
    """What a trial is scored on: objective names, their directions, and the eval task."""

    names: tuple[str, ...]
    directions: tuple[str, ...]
    task: dict | None = None      # `loratune eval` options (objective task)
    metric: str | None = None     # the task's metric scored


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
    if space.alpha_over_r is not None and "r" in own and "lora_alpha" in own:
        ratio = suggest(trial, "alpha_over_r", space.alpha_over_r)
        adapter["lora_alpha"] = ratio * adapter.get("r", own["r"].default)
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


def new_eval_losses(metrics: Path, after: int, key: str = "eval_loss") -> list[tuple[int, float]]:
    """(step, value of `key`) records of metrics.jsonl past step `after` (the last step's value
    is written twice: by eval_every and by the final evaluation)."""
    if not metrics.is_file():
        return []
    found = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line still being written
            break
        if record.get(key) is not None and int(record["step"]) > after:
            after = int(record["step"])
            found.append((after, float(record[key])))
    return found


def watch(trial, proc: subprocess.Popen, metrics: Path, key: str | None = "eval_loss") -> None:
    """Report the trial's intermediate held-out scores (`key` of metrics.jsonl; None: none, as
    in a multi-objective study); stop its process when pruned."""
    import optuna

    last = 0
    while True:
        done = proc.poll() is not None
        for step, value in new_eval_losses(metrics, last, key) if key else []:
            last = step
            trial.report(value, step)
            if not done and trial.should_prune():
                proc.kill()
                proc.wait()
                name = "held-out loss" if key == "eval_loss" else f"held-out {key}"
                why = f"{name} {value:.4f} at step {step} (pruner)"
                trial.set_user_attr("pruned_why", why)
                raise optuna.TrialPruned(why)
        if done:
            return
        time.sleep(POLL_S)


def launch(cfg_path: Path, result_path: Path, task: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loratune.recipes.search", str(cfg_path),
                             str(result_path), json.dumps(task or {})],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_trial(trial, data: dict, folder: Path, goal: Goal) -> dict:
    """Train `data` in a child process; its result row (held-out loss, peak memory, time)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path, result_path = folder / "config.yaml", folder / "result.json"
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    result_path.unlink(missing_ok=True)
    proc = launch(cfg_path, result_path, goal.task)
    key = INTERMEDIATE.get(goal.names[0]) if len(goal.names) == 1 else None
    try:
        watch(trial, proc, Path(data["output_dir"]) / "metrics.jsonl", key)
    finally:
        if proc.poll() is None:  # interrupted: no orphan trains on
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or not result_path.is_file():
        raise TrialFailed(f"trial {trial.number} failed (exit {proc.returncode}): "
                          f"{(proc.stderr.read() if proc.stderr else '')[-2000:]}")
    return json.loads(result_path.read_text())


def objective_values(row: dict, goal: Goal, number: int) -> list[float]:
    """The trial's value of each objective, from its result row."""
    metrics = row.get("task_metrics") or {}
    if goal.metric is not None and goal.metric not in metrics:
        raise ConfigError(f"search.task.metric {goal.metric!r}: task {goal.task['task']} "
                          f"reports {', '.join(metrics)}")
    got = {"eval_loss": row["eval_loss"], "reward": row.get("eval_reward"),
           "peak_gib": row["peak_rss_mib"] / 1024, "seconds": row["seconds"],
           "task": metrics.get(goal.metric)}
    for name in goal.names:
        if got[name] is None:
            raise TrialFailed(f"trial {number}: no {name} (held-out data: set data.eval or "
                              "data.eval_fraction)")
    return [float(got[name]) for name in goal.names]


def claimed_before(study, number: int) -> int:
    """Trials numbered below `number` that count toward search.trials (all but failed)."""
    from optuna.trial import TrialState

    return sum(t.number < number and t.state != TrialState.FAIL
               for t in study.get_trials(deepcopy=False))


def run_one(trial, base: dict, search: SearchConfig, goal: Goal, out: Path, total: int):
    if claimed_before(trial.study, trial.number) >= total:  # another worker got there first
        trial.set_user_attr("failed_why", f"surplus: search.trials {total} already claimed "
                            "by other workers")
        raise Surplus(f"trial {trial.number}: search.trials already claimed")
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
    try:
        row = run_trial(trial, data, out / "trials" / f"{trial.number}.run", goal)
    except TrialFailed as err:
        trial.set_user_attr("failed_why", str(err)[-500:])
        raise
    trial.set_user_attr("result", row)
    trial.set_user_attr("measured_peak_gib", round(row["peak_rss_mib"] / 1024, 4))
    trial.set_user_attr("seconds", row["seconds"])
    values = objective_values(row, goal, trial.number)
    return values[0] if len(values) == 1 else values


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


def count_params(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def train_worker(cfg_path: str, result_path: str, task: dict | None = None) -> None:
    """Child process: train one trial's config (GRPO's recipe for train.objective grpo), score
    it on `task` when given, write its row."""
    exit_with_parent()
    from loratune.config import load_config
    from loratune.data.bundled import resolve_data_paths
    from loratune.models import load_model
    from loratune.recipes import quiet_transformers
    from loratune.recipes.compare import task_metrics
    from loratune.train import train
    from loratune.train.loop import peak_rss_mib

    quiet_transformers()
    cfg = load_config(cfg_path)
    model, tok = load_model(cfg.model)
    grpo = cfg.train.objective == "grpo"
    if grpo:  # its own recipe; its held-out score is a reward, in eval_loss's place
        from loratune.recipes.grpo import train_grpo

        result = train_grpo(cfg, model=model, tokenizer=tok, overwrite=True, quiet=True)
    else:
        result = train(cfg, model=model, tokenizer=tok, overwrite=True, quiet=True,
                       data_paths=resolve_data_paths(cfg))
    summary = json.loads((result.output_dir / "run_summary.json").read_text())
    trainable, total = count_params(model)
    row = {"eval_loss": None if grpo else result.eval_loss,
           "eval_reward": result.eval_loss if grpo else None, "final_loss": result.final_loss,
           "peak_rss_mib": summary.get("peak_rss_mib", peak_rss_mib()),
           "seconds": round(result.seconds, 2), "steps": result.steps,
           "trainable": summary.get("trainable_params", trainable),
           "all_params": summary.get("all_params", total), "adapter": str(result.adapter_dir)}
    if task:  # after the peak is read: the eval's memory is not the training's
        row["task_metrics"] = task_metrics(model, tok, cfg.model, task)[1]
    Path(result_path).write_text(json.dumps(row, indent=2) + "\n")


# --- the study ----------------------------------------------------------------------------------


def check_space_paths(data: dict, search: SearchConfig, source: str) -> None:
    """Every search.space.fields path must name a key the run config takes."""
    for path, spec in search.space.fields.items():
        probe = copy.deepcopy(data)
        set_path(probe, path, spec[0] if isinstance(spec, list) else spec.low)
        build_config(probe, f"{source} (search.space.fields.{path})")


def goal_of(cfg: RunConfig, source: str) -> Goal:
    """The objectives of cfg.search checked against the run (held-out data, GRPO, the task),
    each with its direction: the given one, else the metric's own."""
    search = cfg.search
    names = tuple(search.objective)
    grpo = cfg.train.objective == "grpo"
    held_out = cfg.data.eval is not None or cfg.data.eval_fraction > 0 or cfg.data.train == "demo"
    if ("eval_loss" in names or "reward" in names) and not held_out:
        raise ConfigError(f"{source}: search.objective {names[0] if len(names) == 1 else names} "
                          "needs held-out data: set data.eval or data.eval_fraction")
    if "eval_loss" in names and grpo:
        raise ConfigError(f"{source}: search.objective eval_loss: train.objective grpo has no "
                          "held-out loss; expected objective reward (its held-out reward)")
    if "reward" in names and not grpo:
        raise ConfigError(f"{source}: search.objective reward needs train.objective grpo (and "
                          f"train.rl.rewards); this run is {cfg.train.objective}")
    task, metric, own = None, None, dict(SEARCH_OBJECTIVES)
    if "task" in names:
        task, metric, own["task"] = search_task(search.task, source)
    directions = tuple(search.direction or [own[n] for n in names])
    return Goal(names, directions, task, metric)


def search_task(spec, source: str) -> tuple[dict, str, str]:
    """search.task as `loratune eval` options (checked, its data read, before any trial), the
    metric scored and its direction."""
    from loratune.eval.tasks import TaskError, task_record
    from loratune.recipes.compare import task_options

    try:
        record = task_record(spec.task)
        task = task_options(spec.task, spec.data, [f"{k}={v}" for k, v in spec.options.items()])
    except (TaskError, ValueError) as err:
        raise ConfigError(f"{source}: search.task: {err}") from None
    metric = spec.metric or record.headline
    return task, metric, "minimize" if metric in record.lower_better else "maximize"


def search_settings(config_path: str, overrides: list[str]) -> tuple[dict, SearchConfig, Path]:
    """The base config dict, its search section and the study folder; errors before any trial."""
    from loratune.recipes.compare import load_settings

    data = load_settings(config_path, overrides)
    return study_settings(data, config_path)[:3]


def study_settings(data: dict, source: str) -> tuple[dict, SearchConfig, Path, Goal]:
    cfg = build_config(data, source)
    if cfg.search is None:
        raise ConfigError(f"{source}: no search section (search.space, search.trials ...; "
                          "see examples/search.yaml)")
    goal = goal_of(cfg, source)
    check_space_paths(data, cfg.search, source)
    return data, cfg.search, Path(cfg.output_dir), goal


class PerTrialSeed:
    """A sampler seeded anew for each trial from (seed, trial number): a resumed study does not
    draw its first trials' values again, and workers started together do not draw the same."""

    def __init__(self, make, seed: int):
        self.make, self.seed, self.inner = make, seed, make(seed)

    def before_trial(self, study, trial) -> None:
        self.inner = self.make(self.seed + trial.number)
        self.inner.before_trial(study, trial)

    def __getattr__(self, name):  # infer_relative_search_space, sample_*, after_trial ...
        return getattr(self.inner, name)


def grid_space(search: SearchConfig) -> dict[str, list]:
    """search.space as GridSampler's {name: choices}; every key must be a list."""
    space = search.space
    grid = {k: v for k, v in space.model_dump(exclude={"fields"}, exclude_none=True).items()}
    grid.update(space.fields)
    ranges = [k for k, v in grid.items() if not isinstance(v, list)]
    if ranges:
        raise ConfigError(f"search.sampler grid: search.space {', '.join(ranges)} is a range; "
                          "expected lists of choices")
    return {k: (v if all(x is None or isinstance(x, (bool, int, float, str)) for x in v)
                else list(range(len(v)))) for k, v in grid.items()}


def make_sampler(search: SearchConfig, seed: int):
    import optuna

    if search.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(search), seed=seed)
    make = {"tpe": optuna.samplers.TPESampler,
            "random": optuna.samplers.RandomSampler}[search.sampler]
    return PerTrialSeed(lambda s: make(seed=s), seed)


def open_storage(search: SearchConfig, out: Path):
    import optuna

    url = search.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    # SQLite: writers of several workers wait for the file lock instead of failing at 5 s.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    # Heartbeats: a trial whose process was killed (-9) is marked failed 30 s on (Optuna calls
    # the option experimental; it has been stable since 2.9).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=10,
                                          grace_period=30)


def open_study(search: SearchConfig, goal: Goal, out: Path, seed: int):
    import optuna
    import sqlalchemy.exc

    single = len(goal.names) == 1
    pruner = {"median": optuna.pruners.MedianPruner(n_warmup_steps=1),
              "hyperband": optuna.pruners.HyperbandPruner(),
              "none": optuna.pruners.NopPruner()}[search.pruner or ("median" if single
                                                                     else "none")]
    for attempt in range(5):  # workers started together race to create the tables
        try:
            return optuna.create_study(storage=open_storage(search, out),
                                       study_name=search.study_name,
                                       sampler=make_sampler(search, seed), pruner=pruner,
                                       directions=list(goal.directions), load_if_exists=True)
        except sqlalchemy.exc.SQLAlchemyError:  # locked, or the other one inserted first
            if attempt == 4:
                raise
            time.sleep(1 + attempt)


def trial_counts(study) -> tuple[int, int]:
    """(finished: complete or pruned, running or waiting) trials of the study, all workers."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    done = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    return done, sum(s in (TrialState.RUNNING, TrialState.WAITING) for s in states)


def finished(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def study_total(search: SearchConfig) -> int:
    """search.trials; with the grid sampler, at most the grid's size."""
    if search.sampler != "grid":
        return search.trials
    size = 1
    for choices in grid_space(search).values():
        size *= len(choices)
    return min(search.trials, size)


def run_trials(study, objective, total: int, seconds: float | None) -> None:
    """Run trials until the study (all workers) holds `total` finished ones, or this worker
    has started `total` (failed ones included: a config that always fails ends the run; a
    rerun tries again). A worker whose remaining slots are all taken by running trials waits:
    one may fail (its slot opens again) or be stale (killed -9: the heartbeat marks it failed)."""
    import optuna

    start, started = time.monotonic(), []

    def counted(trial):
        started.append(trial.number)
        try:
            return objective(trial)
        except Surplus:  # never ran: not one of this worker's
            started.pop()
            raise

    while len(started) < total:
        with warnings.catch_warnings():  # experimental since 2.9, as the heartbeat
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        done, running = trial_counts(study)
        if done >= total or (seconds is not None and time.monotonic() - start > seconds):
            return
        if done + running >= total:
            time.sleep(WAIT_S)
            continue
        study.optimize(counted, n_trials=1, catch=(TrialFailed,))


def run_search(config_path: str, overrides: list[str], quiet: bool = False) -> Path:
    """Run (or continue) the study up to search.trials finished trials; write the reports in
    the study folder (output_dir), which is returned."""
    from loratune.recipes.compare import load_settings

    return run_study(load_settings(config_path, overrides), config_path, quiet)


def run_study(data: dict, source: str, quiet: bool = False) -> Path:
    """run_search on a config dict (`source` names it in errors)."""
    import optuna

    from loratune.recipes.search_report import write_reports

    base, search, out, goal = study_settings(data, source)
    out.mkdir(parents=True, exist_ok=True)
    if quiet:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = search.seed if search.seed is not None else build_config(base).train.seed
    study = open_study(search, goal, out, seed)
    total = study_total(search)
    run_trials(study, lambda t: run_one(t, base, search, goal, out, total), total, search.time)
    write_reports(study, goal, out)
    return out


# --- tune-rank: a preset of the study -----------------------------------------------------------


def rank_preset(settings: dict, ranks: list[int], out: str) -> dict:
    """`loratune tune-rank`: a grid study over adapter.r (alpha/r kept), one trial per rank,
    scored on held-out loss, in `out`."""
    from loratune.adapters import method_record

    adapter = settings.get("adapter") or {}
    method = adapter.get("method", "lora")
    if not method_record(method).has_rank:
        raise ConfigError(f"tune-rank varies r; adapter.method {method!r} has no r")
    ratio = adapter.get("lora_alpha", 8.0) / adapter.get("r", 8)
    search = {"space": {"r": ranks, "alpha_over_r": [ratio]}, "sampler": "grid",
              "trials": len(ranks), "pruner": "none", "objective": "eval_loss"}
    return {**settings, "output_dir": out, "search": search}


if __name__ == "__main__":
    train_worker(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
