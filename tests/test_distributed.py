"""Data-parallel training: 2 CPU processes (gloo, torchrun --standalone) against 1 process.

The same file is the worker torchrun starts: `python -m torch.distributed.run ... this_file
SPEC.json` trains every job of SPEC on every rank.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from loratune.config import build_config
from loratune.train import RunFolderError, train
from loratune.train import distributed as lt_dist
from loratune.train.distributed import DistInfo, DistributedError
from tiny import tiny_llama

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


def _train(spec: dict, tok, resume=False):
    spec = dict(spec)
    model = tiny_llama(vocab=len(tok))
    if spec.pop("quantize", False):  # QLoRA: 4-bit NF4 base (Linear4bit keeps it in buffers)
        from loratune.config import QuantConfig
        from loratune.quant.model import prepare_for_kbit_training, quantize_model

        quantize_model(model, QuantConfig())
        prepare_for_kbit_training(model)
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


@pytest.fixture
def data_file(tmp_path):
    rows = [{"instruction": f"Repeat the word {w}", "input": "", "output": f"{w} {w} {w}"}
            for w in WORDS]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assert_same_adapter(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.fixture
def one_thread():
    """torchrun gives each worker OMP_NUM_THREADS=1; the 1-process reference must use the same
    intra-op reduction order, or early Adam steps (tiny grads / sqrt(v)) amplify 1e-7 rounding
    differences to ~6e-5 in the adapter (measured: 0.0 difference with 1 thread each)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_processes_equal_one_with_accumulation(tmp_path, data_file, smol_tokenizer,
                                                   one_thread):
    single = tmp_path / "single"
    _train(_cfg_dict(single, data_file), smol_tokenizer)
    ref = _adapter(single)
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-3  # trained
    _cut_after_checkpoint(single, tmp_path / "resume_on_2")
    _cut_after_checkpoint(single, tmp_path / "resume_on_2_fsdp")

    qlora = {**_cfg_dict(tmp_path / "qlora_single", data_file), "quantize": True}
    _train(qlora, smol_tokenizer)
    moe = {"method": "moe_lora", "r": 2, "num_experts": 2, "router_aux_loss_coef": 0.1}
    _train(_cfg_dict(tmp_path / "moe_single", data_file, moe), smol_tokenizer)
    virtual = {"prompt": {"method": "prompt", "num_virtual_tokens": 4},
               "prefix": {"method": "prefix", "num_virtual_tokens": 4}}
    for method, adapter in virtual.items():
        _train(_cfg_dict(tmp_path / f"{method}_single", data_file, adapter), smol_tokenizer)

    jobs = [{"spec": _cfg_dict(tmp_path / "ddp", data_file)},
            {"spec": _cfg_dict(tmp_path / "resume_on_2", data_file), "resume": True},
            {"spec": _cfg_dict(tmp_path / "resume_on_2_fsdp", data_file, parallel="fsdp"),
             "resume": True},
            {"spec": _cfg_dict(tmp_path / "fsdp", data_file, parallel="fsdp")},
            {"spec": {**_cfg_dict(tmp_path / "qlora_fsdp", data_file, parallel="fsdp"),
                      "quantize": True}},
            {"spec": {**_cfg_dict(tmp_path / "qlora_ddp", data_file), "quantize": True}},
            {"spec": _cfg_dict(tmp_path / "moe_ddp", data_file, moe)},
            {"spec": _cfg_dict(tmp_path / "ddp_ckpt", data_file, gradient_checkpointing=True)},
            {"spec": _cfg_dict(tmp_path / "prompt_ddp", data_file, virtual["prompt"])},
            {"spec": _cfg_dict(tmp_path / "prefix_ddp", data_file, virtual["prefix"])},
            {"spec": _cfg_dict(tmp_path / "fsdp_ckpt", data_file, parallel="fsdp",
                               gradient_checkpointing=True)}]
    done = _torchrun(tmp_path, jobs)
    assert done.returncode == 0, done.stderr[-12000:]

    ref_loss, ref_eval = _losses(single)
    for name in ("ddp", "fsdp"):
        run = tmp_path / name
        _assert_same_adapter(_adapter(run), ref)
        loss, ev = _losses(run)
        assert loss == pytest.approx(ref_loss, abs=1e-5) and len(loss) == 4
        assert ev == pytest.approx(ref_eval, abs=1e-5) and len(ev) == 3
        summary = json.loads((run / "run_summary.json").read_text())
        assert (summary["world_size"], summary["parallel"]) == (2, name)
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    # Activation checkpointing recomputes each layer in backward: same numbers under DDP/FSDP.
    for name in ("ddp_ckpt", "fsdp_ckpt"):
        _assert_same_adapter(_adapter(tmp_path / name), ref)
        assert _losses(tmp_path / name)[0] == pytest.approx(ref_loss, abs=1e-5)
    # Virtual-token methods: the prompt embeddings / per-layer prefixes are the DDP parameters.
    for method in virtual:
        _assert_same_adapter(_adapter(tmp_path / f"{method}_ddp"),
                             _adapter(tmp_path / f"{method}_single"))
    # A 4-bit base: the frozen NF4 buffers replicated on each rank, LoRA sharded (FSDP) or not.
    q_ref, q_loss = _adapter(tmp_path / "qlora_single"), _losses(tmp_path / "qlora_single")[0]
    for name in ("qlora_fsdp", "qlora_ddp"):
        _assert_same_adapter(_adapter(tmp_path / name), q_ref)
        assert _losses(tmp_path / name)[0] == pytest.approx(q_loss, abs=1e-5)
    # MoE-LoRA's per-micro-batch balance loss: each rank adds its share, gradients summed.
    _assert_same_adapter(_adapter(tmp_path / "moe_ddp"), _adapter(tmp_path / "moe_single"))
    moe_records = [json.loads(x) for x in (tmp_path / "moe_ddp" / "metrics.jsonl").read_text()
                   .splitlines()]
    ref_records = [json.loads(x) for x in (tmp_path / "moe_single" / "metrics.jsonl")
                   .read_text().splitlines()]
    extra = [r["extra_loss"] for r in moe_records if "extra_loss" in r]
    assert len(extra) == 4 and extra == pytest.approx(
        [r["extra_loss"] for r in ref_records if "extra_loss" in r], abs=1e-6)
    # Resuming a 1-process checkpoint on 2 processes, and a 2-process one on 1 process.
    for name in ("resume_on_2", "resume_on_2_fsdp"):  # FSDP re-shards the optimizer states
        _assert_same_adapter(_adapter(tmp_path / name), ref)
        assert _losses(tmp_path / name)[0] == pytest.approx(ref_loss, abs=1e-5)
    for name in ("ddp", "fsdp"):
        back = tmp_path / f"{name}_on_1"
        _cut_after_checkpoint(tmp_path / name, back)
        result = _train(_cfg_dict(back, data_file), smol_tokenizer, resume=True)
        assert [h["step"] for h in result.history] == [3, 4]
        _assert_same_adapter(_adapter(back), ref)


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


def test_deepspeed_is_refused_on_cpu(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2},
                                "train_micro_batch_size_per_gpu": 2}))
    assert not torch.cuda.is_available()
    opts = SimpleNamespace(grad_accum=2, batch_size=2, parallel="ddp", deepspeed=str(path))
    with pytest.raises(DistributedError, match=r"ZeRO-2\) needs CUDA GPUs.*parallel: ddp.*"
                       r"parallel: fsdp"):
        lt_dist.check_parallel_options(opts, "lora", DistInfo())
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(DistributedError, match="stage=1; expected 2 or 3"):
        lt_dist.check_deepspeed(str(path))
    with pytest.raises(DistributedError, match="is not a file"):
        lt_dist.check_deepspeed(str(tmp_path / "missing.json"))


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
    # re-created after destroy_process_group in the same process may fail to reconnect.
    dist.init_process_group("gloo")
    for job in json.loads(Path(spec_path).read_text()):
        if job.get("fail_rank") == rank:
            real, calls = lt_dist.causal_lm_loss, []

            def failing(*args, **kw):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError(f"rank {rank} failed on purpose")
                return real(*args, **kw)

            lt_dist.causal_lm_loss = failing
        _train(job["spec"], tok, resume=job.get("resume", False))


if __name__ == "__main__":
    _worker(sys.argv[1])
