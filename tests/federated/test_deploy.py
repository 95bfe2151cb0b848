"""Flower's deployment mode on this machine: a SuperLink and two SuperNodes over TLS (a CA made
here), the run started with `flwr run` on examples/federated_app, 2 rounds of the tiny model.
Every process started here is killed by its id (each in its own process group, with the
flwr-serverapp/flwr-clientapp processes it spawned)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_federate import run_local
from tls import make_certificates

from loratune.config import build_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            cwd=log.parent, start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of this pid: it and its children
        except ProcessLookupError:
            continue
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for(check, seconds: float, what: str, logs: list[Path]):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"{what} not within {seconds} s\n{tails}")


def run_yaml(tmp_path, tiny_folder, files):
    data = {"output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_folder)},
            "data": {"train": str(files[0]), "max_length": 64},
            "train": {"batch_size": 2, "lr": 2e-2, "warmup_ratio": 0.0},
            "federated": {"clients": 2, "rounds": 2, "local_steps": 2, "round_timeout": 400}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data


def client_files(tmp_path, data_file):
    rows = data_file.read_text().splitlines(keepends=True)
    files = [tmp_path / "client-0.jsonl", tmp_path / "client-1.jsonl"]
    files[0].write_text("".join(rows[:4]))
    files[1].write_text("".join(rows[4:]))
    return files


@pytest.mark.slow
def test_superlink_and_two_supernodes_over_tls_run_two_rounds(tmp_path, tiny_folder,
                                                               data_file):
    certs = make_certificates(tmp_path)
    files = client_files(tmp_path, data_file)
    config, data = run_yaml(tmp_path, tiny_folder, files)
    home, port = tmp_path / "flwr-home", free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-tls"\n\n[superlink.local-tls]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs["ca"]}"\n')
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "examples" / "federated_app" / "pyproject.toml", app)
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
    logs = [tmp_path / "superlink.log", tmp_path / "supernode-0.log", tmp_path / "supernode-1.log"]
    procs = []
    try:
        procs.append(start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]),
                            "--ssl-certfile", str(certs["cert"]), "--ssl-keyfile",
                            str(certs["key"]), "--port", str(port),
                            "--disable-runtime-dependency-installation"], logs[0], env))
        wait_for(lambda: "Uvicorn running on https" in logs[0].read_text(), 90,
                 "the SuperLink's TLS API", logs)
        for i in range(2):
            procs.append(start([str(BIN / "flower-supernode"), "--root-certificates",
                                str(certs["ca"]), "--superlink", f"127.0.0.1:{port}",
                                "--port", str(free_port()), "--node-config",
                                f'partition-id={i} data-path="{files[i]}"'], logs[1 + i], env))
        run = subprocess.run([str(BIN / "flwr"), "run", str(app), "local-tls", "--run-config",
                              f'config="{config}"', "--format", "json"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert json.loads(run.stdout)["success"], run.stdout
        out = tmp_path / "run"
        wait_for(lambda: (out / "adapter" / "adapter_model.safetensors").is_file(), 480,
                 "the final adapter", logs)
    finally:
        stop(procs)
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in records] == [[0, 1], [0, 1]]
    assert all(r["bytes_up"] == r["bytes_down"] > 0 for r in records)
    from loratune.adapters.peft_format import read_adapter_weights

    got = read_adapter_weights(out / "adapter")
    cfg = build_config({**data, "output_dir": str(tmp_path / "local"),
                        "federated": {**data["federated"], "client_data": [str(f) for f in files]}})
    want = run_local(cfg)  # the same rounds, in this process
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=0)
    assert any(float(want[k].abs().max()) > 0 for k in want if "lora_B" in k)
