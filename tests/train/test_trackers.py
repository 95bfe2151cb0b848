"""train.report_to: each tracker's files read back with the tracker's own reader."""

import json
import os

import pytest

from loratune.config import ConfigError, build_config
from loratune.train import train
from loratune.train.trackers import check_trackers
from tiny import tiny_llama


def _train(tmp_path, data_file, tok, report_to, **train_opts):
    cfg = build_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"r": 4, "lora_alpha": 8},
        "data": {"train": str(data_file), "max_length": 64, "eval_fraction": 0.25},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 5e-3, "eval_every": 2,
                  "report_to": report_to, **train_opts},
    })
    train(cfg, model=tiny_llama(vocab=len(tok)), tokenizer=tok, quiet=True)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records


def test_tensorboard_event_files_hold_the_metrics_and_config(tmp_path, data_file,
                                                             smol_tokenizer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records = _train(tmp_path, data_file, smol_tokenizer, ["tensorboard"])
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    losses = [(e.step, round(e.value, 5)) for e in acc.Scalars("train/loss")]
    assert losses == [(r["step"], round(r["loss"], 5)) for r in records if "loss" in r]
    assert [e.step for e in acc.Scalars("eval/loss")] == [r["step"] for r in records
                                                          if "eval_loss" in r]
    assert "train/lr" in acc.Tags()["scalars"] and "train/tokens_per_s" in acc.Tags()["scalars"]
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode()
             for t in ("config/text_summary", "outcome/text_summary")}
    assert "max_steps: 3" in texts["config/text_summary"]
    assert texts["outcome/text_summary"] == f"finished; adapter: {out / 'adapter'}"


@pytest.mark.parametrize("where", ["run folder", "mlflow_uri"])
def test_mlflow_store_holds_params_metrics_and_adapter(tmp_path, data_file, smol_tokenizer,
                                                       monkeypatch, where):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = (tmp_path / "elsewhere").as_uri() if where == "mlflow_uri" else None
    out, records = _train(tmp_path, data_file, smol_tokenizer, ["mlflow"], mlflow_uri=store)
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ   # allowed for the tracker alone
    assert (out / "mlruns").is_dir() == (store is None)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store or (out / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("loratune")
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.max_steps"] == "3" and run.data.params["adapter.r"] == "4"
    assert run.data.tags["adapter_dir"] == str(out / "adapter")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, round(m.value, 5)) for m in history) == \
        [(r["step"], round(r["loss"], 5)) for r in records if "loss" in r]


def _wandb_log_records(path):
    """The protobuf payloads of a .wandb file: a 7-byte header (':W&B', magic, version), then
    LevelDB-log records (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB
    blocks. Read here, not with W&B's code, so the test checks the file itself."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:          # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            yield parts


def _wandb_records(run_dir):
    """The history rows, the summary and the config of an offline W&B run's .wandb file."""
    from wandb.proto import wandb_internal_pb2

    [file] = run_dir.glob("run-*.wandb")
    history, summary, config = [], {}, {}
    for data in _wandb_log_records(file):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in rec.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in rec.summary.update})
        elif kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
    return history, summary, config


def test_wandb_offline_run_holds_config_metrics_and_adapter(tmp_path, data_file, smol_tokenizer,
                                                            monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, records = _train(tmp_path, data_file, smol_tokenizer, ["wandb"])
    [run_dir] = (out / "wandb").glob("offline-run-*")
    history, summary, config = _wandb_records(run_dir)
    losses = [(h["_step"], round(h["train/loss"], 5)) for h in history if "train/loss" in h]
    assert losses == [(r["step"], round(r["loss"], 5)) for r in records if "loss" in r]
    assert summary["adapter_dir"] == str(out / "adapter") and summary["outcome"] == "finished"
    assert config["train"]["max_steps"] == 3 and config["adapter"]["r"] == 4


def test_a_missing_tracker_package_names_it_and_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: mlflow needs the mlflow-skinny "
                       r"package; install it with pip install 'loratune\[trackers\]'"):
        check_trackers(["tensorboard", "mlflow"])


def test_a_missing_tracker_fails_before_the_run_folder_is_made(tmp_path, data_file,
                                                               smol_tokenizer, monkeypatch):
    import loratune.train.trackers as trackers

    monkeypatch.setitem(trackers.NEEDS, "tensorboard", ("no_such_module_x", "tensorboard"))
    with pytest.raises(ConfigError, match="tensorboard needs the tensorboard package"):
        _train(tmp_path, data_file, smol_tokenizer, ["tensorboard"])
    assert not (tmp_path / "run").exists()


def test_report_to_names_only_known_trackers():
    with pytest.raises(ConfigError, match="train.report_to.0"):
        build_config({"train": {"report_to": ["comet"]}})
