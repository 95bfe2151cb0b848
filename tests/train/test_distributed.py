"""Data-parallel training: 2 CPU processes (gloo, torchrun --standalone) against 1 process.

The same file is the worker torchrun starts: `python -m torch.distributed.run ... this_file
SPEC.json` trains every job of SPEC on every rank.
"""

import json
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from loratune.config import build_config
from loratune.train import RunFolderError, train
from loratune.train import distributed as lt_dist
from loratune.train.distributed import DistInfo, DistributedError

if __name__ == "__main__":  # a torchrun worker runs this file as a script: tiny.py is one up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import tiny_llama  # noqa: E402

WORDS = ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger", "lemon",
         "candle", "forest", "rocket"]


def _cfg_dict(out: Path, data: Path, adapter: dict | None = None, **train) -> dict:
    settings = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 5e-3,
                "warmup_ratio": 0.0, "save_every": 2, "save_total_limit": None,
                "eval_every": 2, **train}
    parallel = settings.pop("parallel", None)
    return {"output_dir": str(out), "parallel": parallel,
            "adapter": adapter or {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]},
            "data": {"train": str(data), "max_length": 48, "eval_fraction": 0.25},
            "train": settings}


def _build(spec: dict):
    spec = dict(spec)
    parallel = spec.pop("parallel")
    cfg = build_config(spec)
    if parallel:
        cfg.train.parallel = parallel
    return cfg


def _train(spec: dict, tok, resume=False, layer_calls: list | None = None,
           models: list | None = None):
    """One run of `spec`; `layer_calls` collects layer 0's MLP calls with gradients on: one per
    micro-batch in the forward, one more in backward when checkpointing recomputes the layer
    (a pre-hook: non-reentrant checkpointing stops at the last saved tensor, before post-hooks)."""
    spec = dict(spec)
    model = tiny_llama(vocab=len(tok))
    if layer_calls is not None:
        model.model.layers[0].mlp.register_forward_pre_hook(
            lambda mod, args: layer_calls.append(1) if torch.is_grad_enabled() else None)
    if spec.pop("quantize", False):  # QLoRA: 4-bit NF4 base (Linear4bit keeps it in buffers)
        from loratune.config import QuantConfig
        from loratune.models.quantize import prepare_for_kbit_training, quantize_model

        quantize_model(model, QuantConfig())
        prepare_for_kbit_training(model)
    if models is not None:
        models.append(model)
    return train(_build(spec), model=model, tokenizer=tok, quiet=True, resume=resume)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _losses(run: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in records if "loss" in r],
            [r["eval_loss"] for r in records if "eval_loss" in r])


def _cut_after_checkpoint(src: Path, dst: Path) -> None:
    """A copy of a finished run as if it died right after its step-2 checkpoint."""
    shutil.copytree(src, dst)
    (dst / "run_summary.json").unlink()
    shutil.rmtree(dst / "adapter")


def _torchrun(tmp_path: Path, jobs: list[dict], timeout: float = 300):
    spec = tmp_path / f"spec-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    cmd = lt_dist.torchrun_command(2, [str(Path(__file__).resolve()), str(spec)])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _write_data(folder: Path) -> Path:
    rows = [{"instruction": f"Repeat the word {w}", "input": "", "output": f"{w} {w} {w}"}
            for w in WORDS]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_file(tmp_path):
    return _write_data(tmp_path)


def _assert_same_adapter(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@contextmanager
def _single_thread():
    """torchrun gives each worker OMP_NUM_THREADS=1; the 1-process reference must use the same
    intra-op reduction order, or early Adam steps (tiny grads / sqrt(v)) amplify 1e-7 rounding
    differences to ~6e-5 in the adapter (measured: 0.0 difference with 1 thread each)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with _single_thread():
        yield


MOE = {"method": "moe_lora", "r": 2, "num_experts": 2, "router_aux_loss_coef": 0.1}
VIRTUAL = {"prompt": {"method": "prompt", "num_virtual_tokens": 4},
           "prefix": {"method": "prefix", "num_virtual_tokens": 4}}


def _write_pairs(folder: Path) -> Path:
    rows = [{"prompt": f"Repeat the word {w}", "chosen": f"{w} {w} {w}", "rejected": f"no {w}"}
            for w in WORDS]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pref_dict(out: Path, pairs: Path, objective: str, **preference) -> dict:
    spec = _cfg_dict(out, pairs, objective=objective, lr=2e-2)
    spec["train"]["preference"] = preference
    return spec


def _jobs(tmp: Path, data: Path) -> dict[str, dict]:
    """The 2-process jobs, by name (each trains into tmp/name)."""
    def cfg(name, adapter=None, **train):
        return _cfg_dict(tmp / name, data, adapter, **train)

    pairs = tmp / "pairs.jsonl"

    return {"ddp": {"spec": cfg("ddp")},
            "fsdp": {"spec": cfg("fsdp", parallel="fsdp")},
            "ddp_ckpt": {"spec": cfg("ddp_ckpt", gradient_checkpointing=True)},
            "fsdp_ckpt": {"spec": cfg("fsdp_ckpt", parallel="fsdp", gradient_checkpointing=True)},
            "prompt_ddp": {"spec": cfg("prompt_ddp", VIRTUAL["prompt"])},
            "prefix_ddp": {"spec": cfg("prefix_ddp", VIRTUAL["prefix"])},
            "qlora_fsdp": {"spec": {**cfg("qlora_fsdp", parallel="fsdp"), "quantize": True}},
            "qlora_ddp": {"spec": {**cfg("qlora_ddp"), "quantize": True}},
            "qlora_fsdp_fused": {"spec": {**cfg("qlora_fsdp_fused", parallel="fsdp",
                                                fused_lora=True, gradient_checkpointing=True),
                                          "quantize": True}},
            "moe_ddp": {"spec": cfg("moe_ddp", MOE)},
            "dpo_ddp_cached": {"spec": _pref_dict(tmp / "dpo_ddp_cached", pairs, "dpo",
                                                  reference="cached")},
            "dpo_fsdp": {"spec": {**_pref_dict(tmp / "dpo_fsdp", pairs, "dpo"),
                                  "parallel": "fsdp"}},
            "kto_ddp": {"spec": _pref_dict(tmp / "kto_ddp", pairs, "kto")},
            "resume_on_2": {"spec": cfg("resume_on_2"), "resume": True},
            "resume_on_2_fsdp": {"spec": cfg("resume_on_2_fsdp", parallel="fsdp"),
                                 "resume": True}}


@pytest.fixture(scope="module")
def launched(tmp_path_factory, smol_tokenizer):
    """The 1-process references, then ONE torchrun launch for all 2-process jobs (a launch per
    job would pay torchrun's and the imports' start-up 11 times). The worker records each job's
    outcome per rank and goes on after a failure, so each test below reports its own job; a job
    that leaves the ranks out of step (one raised inside a collective) can still fail the ones
    after it, each with its own message."""
    tmp = tmp_path_factory.mktemp("dist")
    data = _write_data(tmp)
    with _single_thread():
        _train(_cfg_dict(tmp / "single", data), smol_tokenizer)
        _cut_after_checkpoint(tmp / "single", tmp / "resume_on_2")
        _cut_after_checkpoint(tmp / "single", tmp / "resume_on_2_fsdp")
        _train({**_cfg_dict(tmp / "qlora_single", data), "quantize": True}, smol_tokenizer)
        _train(_cfg_dict(tmp / "moe_single", data, MOE), smol_tokenizer)
        for method, adapter in VIRTUAL.items():
            _train(_cfg_dict(tmp / f"{method}_single", data, adapter), smol_tokenizer)
        pairs = _write_pairs(tmp)
        for objective in ("dpo", "kto"):
            _train(_pref_dict(tmp / f"{objective}_single", pairs, objective), smol_tokenizer)
    jobs = [{**job, "report": str(tmp / f"{name}.outcome")}
            for name, job in _jobs(tmp, data).items()]
    try:
        done = _torchrun(tmp, jobs, timeout=600)
        log = f"torchrun exit {done.returncode}\n{done.stderr[-8000:]}"
    except subprocess.TimeoutExpired as err:
        log = f"torchrun timed out after {err.timeout} s\n{str(err.stderr or '')[-8000:]}"
    ref = _adapter(tmp / "single")
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-3  # trained
    return SimpleNamespace(tmp=tmp, data=data, log=log, ref=ref,
                           ref_losses=_losses(tmp / "single"))


def _job(launched, name: str) -> list[dict]:
    """Job `name`'s outcome on ranks 0 and 1; the test fails with the job's own error."""
    outcomes = []
    for rank in (0, 1):
        path = launched.tmp / f"{name}.outcome.rank{rank}.json"
        if not path.is_file():
            pytest.fail(f"job {name}: rank {rank} left no outcome; {launched.log}")
        outcome = json.loads(path.read_text())
        if not outcome["ok"]:
            pytest.fail(f"job {name} failed on rank {rank}:\n{outcome['error']}")
        outcomes.append(outcome)
    return outcomes


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_accumulation(launched, name, smol_tokenizer, one_thread):
    outcomes = _job(launched, name)
    run, (ref_loss, ref_eval) = launched.tmp / name, launched.ref_losses
    _assert_same_adapter(_adapter(run), launched.ref)
    loss, ev = _losses(run)
    assert loss == pytest.approx(ref_loss, abs=1e-5) and len(loss) == 4
    assert ev == pytest.approx(ref_eval, abs=1e-5) and len(ev) == 2   # steps 2 and 4 (eval_every)
    summary = json.loads((run / "run_summary.json").read_text())
    assert (summary["world_size"], summary["parallel"]) == (2, name)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    # 4 steps of 2 micro-batches: one per rank per step, each layer run once (no checkpointing).
    assert [o["layer_calls"] for o in outcomes] == [4, 4]
    # A 2-process checkpoint resumed on 1 process.
    back = launched.tmp / f"{name}_on_1"
    _cut_after_checkpoint(run, back)
    result = _train(_cfg_dict(back, launched.data), smol_tokenizer, resume=True)
    assert [h["step"] for h in result.history] == [3, 4]
    _assert_same_adapter(_adapter(back), launched.ref)


@pytest.mark.parametrize("name", ["ddp_ckpt", "fsdp_ckpt"])
def test_checkpointing_recomputes_layers_under_two_processes(launched, name):
    outcomes = _job(launched, name)
    # Each rank's 4 micro-batches run layer 0 twice: forward, and recomputed in backward.
    assert [o["layer_calls"] for o in outcomes] == [8, 8]
    # Same numbers as the 1-process run without checkpointing.
    _assert_same_adapter(_adapter(launched.tmp / name), launched.ref)
    assert _losses(launched.tmp / name)[0] == pytest.approx(launched.ref_losses[0], abs=1e-5)


@pytest.mark.parametrize("method", list(VIRTUAL))
def test_virtual_tokens_two_processes_equal_one(launched, method):
    # The prompt embeddings / per-layer prefixes are the DDP parameters.
    _job(launched, f"{method}_ddp")
    _assert_same_adapter(_adapter(launched.tmp / f"{method}_ddp"),
                         _adapter(launched.tmp / f"{method}_single"))


@pytest.mark.parametrize("name", ["qlora_fsdp", "qlora_ddp", "qlora_fsdp_fused"])
def test_4bit_base_two_processes_equal_one(launched, name):
    # FSDP: each rank holds half of the 4-bit codes and scales (and of the LoRA weights); DDP:
    # the whole 4-bit base on each rank.
    outcomes = _job(launched, name)
    single = launched.tmp / "qlora_single"
    _assert_same_adapter(_adapter(launched.tmp / name), _adapter(single))
    assert _losses(launched.tmp / name)[0] == pytest.approx(_losses(single)[0], abs=1e-5)
    held = [o["bytes_4bit"][0] for o in outcomes]
    whole = outcomes[0]["bytes_4bit"][1]
    assert whole > 5_000 and outcomes[1]["bytes_4bit"][1] == whole
    if name != "qlora_ddp":  # qlora_fsdp_fused: the fused LoRA op dequantizes the gathered
        # codes in backward, under checkpointing's recomputation.
        # Halves up to padding (dim 0 of each tensor split in two) and the replicated
        # double-quant offset and second-level scales.
        assert [h / whole for h in held] == [pytest.approx(0.5, abs=0.02)] * 2, (held, whole)
        summary = json.loads((launched.tmp / name / "run_summary.json").read_text())
        assert (summary["base_4bit_bytes"], summary["base_4bit_bytes_rank0"]) == (whole, held[0])
    else:
        assert held == [whole, whole]


def test_moe_lora_two_processes_equal_one(launched):
    # The per-micro-batch balance loss: each rank adds its share, gradients summed.
    _job(launched, "moe_ddp")
    _assert_same_adapter(_adapter(launched.tmp / "moe_ddp"), _adapter(launched.tmp / "moe_single"))

    def extra(run):
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["extra_loss"] for r in records if "extra_loss" in r]

    got = extra(launched.tmp / "moe_ddp")
    assert len(got) == 4 and got == pytest.approx(extra(launched.tmp / "moe_single"), abs=1e-6)


PREFERENCE_KEYS = ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "kl",
                   "eval_loss", "eval_margin", "eval_accuracy")


@pytest.mark.parametrize("name,single", [("dpo_ddp_cached", "dpo_single"),
                                         ("dpo_fsdp", "dpo_single"),
                                         ("kto_ddp", "kto_single")])
def test_preference_two_processes_equal_one(launched, name, single):
    """Pairs split over the ranks, the reference run on each rank's share (or read from the
    cache), rewards and accuracy summed over the ranks: the same adapter and metrics."""
    _job(launched, name)
    run, ref = launched.tmp / name, launched.tmp / single
    _assert_same_adapter(_adapter(run), _adapter(ref))

    def metrics(folder):
        records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: r[k] for k in PREFERENCE_KEYS if k in r} for r in records]

    got, want = metrics(run), metrics(ref)
    assert len(got) == len(want) and any("margin" in r for r in got)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and a == pytest.approx(b, abs=1e-5)
    if name.endswith("cached"):
        assert (run / "ref_logps.safetensors").is_file()


@pytest.mark.parametrize("name", ["resume_on_2", "resume_on_2_fsdp"])
def test_one_process_checkpoint_resumes_on_two(launched, name):
    _job(launched, name)  # FSDP re-shards the optimizer states
    _assert_same_adapter(_adapter(launched.tmp / name), launched.ref)
    assert _losses(launched.tmp / name)[0] == pytest.approx(launched.ref_losses[0], abs=1e-5)


def test_a_failing_rank_stops_the_others(tmp_path, data_file):
    spec = _cfg_dict(tmp_path / "fail", data_file, max_steps=50, save_every=None)
    t0 = time.monotonic()
    done = _torchrun(tmp_path, [{"spec": spec, "fail_rank": 1}], timeout=240)
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stdout + done.stderr
    assert time.monotonic() - t0 < 200  # torchrun tore the group down: no wait on rank 0
    assert not (tmp_path / "fail" / "run_summary.json").exists()


def test_world_size_must_divide_grad_accum():
    with pytest.raises(DistributedError, match=r"world size 2 does not divide train.grad_accum"
                       r"=3.*batch_size=4 rows \(12 rows\).*e.g. 4.*divides 3: 1, 3"):
        lt_dist.check_world_size(3, 4, 2)
    lt_dist.check_world_size(4, 4, 2)
    assert lt_dist.local_micro_indices(4, DistInfo(1, 2, 1)) == [1, 3]
    assert lt_dist.local_micro_indices(4, DistInfo(0, 1, 0)) == [0, 1, 2, 3]
    opts = SimpleNamespace(grad_accum=2, batch_size=2, parallel="ddp", deepspeed=None)
    with pytest.raises(DistributedError, match="adalora is not supported"):
        lt_dist.check_parallel_options(opts, "adalora", DistInfo(0, 2, 0))
    assert lt_dist.check_parallel_options(opts, "adalora", DistInfo()) == "ddp"
    with pytest.raises(DistributedError, match="train.parallel 'zero'"):
        lt_dist.check_parallel_options(SimpleNamespace(**{**vars(opts), "parallel": "zero"}),
                                       "lora", DistInfo(0, 2, 0))


def test_deepspeed_config_is_checked(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(DistributedError, match="stage=1; expected 2 or 3"):
        lt_dist.check_deepspeed(str(path))
    with pytest.raises(DistributedError, match="is not a file"):
        lt_dist.check_deepspeed(str(tmp_path / "missing.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without "
                    "CUDA; this one has a GPU")
def test_deepspeed_is_refused_on_cpu(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2},
                                "train_micro_batch_size_per_gpu": 2}))
    opts = SimpleNamespace(grad_accum=2, batch_size=2, parallel="ddp", deepspeed=str(path))
    with pytest.raises(DistributedError, match=r"ZeRO-2\) needs CUDA GPUs.*parallel: ddp.*"
                       r"parallel: fsdp"):
        lt_dist.check_parallel_options(opts, "lora", DistInfo())


def test_checkpoint_from_another_accumulation_is_refused(tmp_path, data_file, smol_tokenizer):
    run = tmp_path / "run"
    _train(_cfg_dict(run, data_file, max_steps=3, eval_every=None), smol_tokenizer)
    (run / "run_summary.json").unlink()
    with pytest.raises(RunFolderError, match="train.grad_accum: checkpoint 2, config 4"):
        _train(_cfg_dict(run, data_file, max_steps=3, grad_accum=4), smol_tokenizer,
               resume=True)


def test_torchrun_command():
    cmd = lt_dist.torchrun_command(2, ["-m", "loratune", "train", "c.yaml"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                       "-m", "loratune", "train", "c.yaml"]
    multi = lt_dist.torchrun_command(4, ["x.py"], nnodes=2, rdzv_endpoint="node0:29500")
    assert "--standalone" not in multi and multi[-5:] == ["--rdzv-backend", "c10d",
                                                          "--rdzv-endpoint", "node0:29500",
                                                          "x.py"]
    with pytest.raises(DistributedError, match="rendezvous endpoint"):
        lt_dist.torchrun_command(2, ["x.py"], nnodes=2)


def _worker(spec_path: str) -> None:
    """Run under torchrun: every job on every rank; rank `fail_rank` raises at its 3rd forward."""
    import os

    import torch.distributed as dist

    from loratune.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    rank = int(os.environ["RANK"])
    # One group for all jobs (train() joins an existing group and leaves it open); a gloo group
    # re-created after destroy_process_group in the same process may fail to reconnect. A short
    # timeout: a job that leaves the other rank waiting fails it, not the whole launch.
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    for job in json.loads(Path(spec_path).read_text()):
        if job.get("fail_rank") == rank:
            real, calls = lt_dist.causal_lm_loss, []

            def failing(*args, **kw):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError(f"rank {rank} failed on purpose")
                return real(*args, **kw)

            lt_dist.causal_lm_loss = failing
        if "report" not in job:  # an error ends the launch
            _train(job["spec"], tok, resume=job.get("resume", False))
            continue
        calls: list[int] = []
        models: list = []
        try:
            _train(job["spec"], tok, resume=job.get("resume", False), layer_calls=calls,
                   models=models)
            outcome = {"ok": True, "layer_calls": len(calls),
                       "bytes_4bit": lt_dist.local_4bit_bytes(models[0])}
        except Exception:
            outcome = {"ok": False, "error": traceback.format_exc()}
        Path(f"{job['report']}.rank{rank}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    _worker(sys.argv[1])
