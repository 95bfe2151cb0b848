"""The command line end to end on a tiny model folder (real SmolLM2 tokenizer, random weights)."""

import json
from pathlib import Path

import pytest
import yaml

from loratune.cli import main
from tiny import randomize_lora, tiny_llama


@pytest.fixture
def config(tmp_path, tiny_folder):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n"
                            for w in ["a", "b", "c", "d", "e", "f"]))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_folder)},
        "adapter": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data)}, "train": {"max_steps": 2, "batch_size": 2}}))
    return path


def _strong_copy(adapter: Path, model_folder: Path, out: Path) -> Path:
    """The trained adapter with large random LoRA B: two steps at lr 1e-3 barely move a greedy
    answer, and the chat check must tell an answer with the adapter from one without."""
    from transformers import AutoModelForCausalLM

    from loratune.adapters import load_adapter, save_adapter

    model = AutoModelForCausalLM.from_pretrained(model_folder)
    load_adapter(model, adapter)
    return save_adapter(randomize_lora(model, scale=2.0), out)


def _greedy_answers(model_folder: Path, adapter: Path, prompt: str, n: int) -> tuple[str, str]:
    """generate_chat's greedy answers with the adapter and without it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratune.adapters import load_adapter
    from loratune.eval.generate import generate_chat

    model = AutoModelForCausalLM.from_pretrained(model_folder)
    tok = AutoTokenizer.from_pretrained(model_folder)
    chat = [[{"role": "user", "content": prompt}]]
    without = generate_chat(model, tok, chat, max_new_tokens=n)[0]
    load_adapter(model, adapter)
    return generate_chat(model, tok, chat, max_new_tokens=n)[0], without


def test_train_chat_generate(tmp_path, config, tiny_folder, capsys):
    assert main(["train", str(config), "train.lr=1e-3"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == [
        "q_proj", "v_proj"]
    capsys.readouterr()
    strong = _strong_copy(adapter, tiny_folder, tmp_path / "strong")
    assert main(["chat", "--model", str(tiny_folder), "--adapter", str(strong), "--prompt", "hi",
                 "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out.strip()
    with_adapter, without = _greedy_answers(tiny_folder, strong, "hi", 4)
    assert printed == with_adapter != without and printed  # the adapter's answer, not the base's
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(tiny_folder), "--adapter", str(adapter),
                 "--prompt", "x", "--prompt", "y", "--out", str(out),
                 "--max-new-tokens", "2"]) == 0
    assert [json.loads(l)["prompt"] for l in out.read_text().splitlines()] == ["x", "y"]
    # A finished run is not overwritten without --overwrite.
    assert main(["train", str(config)]) == 2
    assert "finished run" in capsys.readouterr().err


def test_train_takes_overrides_after_its_flags(tmp_path, config):
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config), "--overwrite", "train.max_steps=3"]) == 0
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("train.batch_size=zero", "key 'train.batch_size'"),
    ("adapter.target_modules=[nothing]", "matches no linear layer"),
    ("data.train=missing.jsonl", "data file not found"),
    ("model.name=no-such-model", "model 'no-such-model' not found"),
])
def test_bad_input_exits_2_with_message(tmp_path, config, capsys, override, message):
    assert main(["train", str(config), override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing created for a run that never started


def test_demo_yaml_matches_demo_settings():
    from loratune.config import load_config
    from loratune.demo.job import demo_config

    shipped = load_config(Path(__file__).parents[1] / "examples" / "demo.yaml")
    assert shipped.model_dump() == demo_config("runs/demo").model_dump()


def test_train_nproc_refuses_a_world_size_that_does_not_divide_the_step(tmp_path, config, capsys):
    """Checked before torchrun starts: one clear message, nothing launched, no run folder."""
    assert main(["train", str(config), "--nproc", "2"]) != 0
    assert "world size 2 does not divide train.grad_accum=1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_nproc_runs_two_processes(tmp_path, config):
    # the README's form: the override after the flag
    assert main(["train", str(config), "--nproc", "2", "train.grad_accum=2"]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_step_may_span_two_epochs(tmp_path, config):
    """More micro-batches per step than one epoch holds: the step reads on into the next epoch."""
    assert main(["train", str(config), "train.grad_accum=3"]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["steps"] == 2 and summary["label_tokens"] > 0


def test_serve_command_answers_over_http(tmp_path, tiny_folder):
    """`loratune serve` as a user starts it: a real process, an adapter folder, an API key."""
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import torch

    from loratune.adapters import add_adapter, save_adapter
    from loratune.config import LoraConfig

    model = tiny_llama(vocab=49152)
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    save_adapter(model, tmp_path / "adapters" / "fin", "a")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratune", "serve", "--model", str(tiny_folder), "--adapters",
         str(tmp_path / "adapters"), "--port", str(port), "--api-key", "k", "--threads", "1",
         "--quantize", "nf4", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not start"
            time.sleep(0.5)
        auth = {"Authorization": "Bearer k"}
        models = httpx.get(f"{url}/v1/models", headers=auth).json()
        assert [m["id"] for m in models["data"]] == [tiny_folder.name, "fin"]
        body = {"model": "fin", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _TermAt:
    """A tracker that sends this process SIGTERM once step `step` is logged."""

    def __init__(self, step: int):
        self.step = step

    def log(self, record):
        if record["step"] == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    def close(self, state, adapter_dir):
        pass


def test_a_stopped_train_prints_its_checkpoint_and_the_resume_command(tmp_path, config, capsys,
                                                                      monkeypatch):
    """SIGTERM at step 2 of 4: the checkpoint and the whole command (config, every override,
    --resume, not --overwrite) are printed; that command finishes the run and the summary
    counts both parts."""
    import shlex

    import loratune.train.loop as loop

    monkeypatch.setattr(loop, "open_trackers", lambda cfg, out: [_TermAt(2)])
    words = ["train", str(config), "--overwrite", "train.lr=1e-3", "train.max_steps=4"]
    assert main(words) == 130
    err = capsys.readouterr().err
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert f"stopped at step 2; checkpoint {ckpt}\n" in err
    resume = err.split("to resume: ", 1)[1].splitlines()[0]
    assert resume == shlex.join(["loratune", "train", str(config), "train.lr=1e-3",
                                 "train.max_steps=4", "--resume"])
    monkeypatch.undo()
    assert main(shlex.split(resume)[1:]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()
             if '"loss"' in line]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert summary["steps"] == 4 and summary["parts"] == 2
    assert summary["tokens"] == sum(s["tokens"] for s in steps)
    assert summary["train_seconds"] >= sum(s["seconds"] for s in steps) - 0.02  # rounding


@pytest.mark.parametrize("quiet", [[], ["--quiet"]])
def test_waits_print_plain_progress_lines_unless_quiet(tmp_path, config, tiny_folder, capsys,
                                                       monkeypatch, quiet):
    """stderr is no terminal under pytest: plain lines for loading, training and eval (every
    wait shown at once here; 2 s in use); --quiet, before or after the command word, none."""
    from loratune import progress

    monkeypatch.setattr(progress, "SHOW_AFTER", 0.0)
    monkeypatch.setattr(progress, "EVERY", 0.0)
    assert main([*quiet, "train", str(config)]) == 0
    train_err = capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    assert main(["eval", "--model", str(tiny_folder), "--data", str(data), "--adapter",
                 str(tmp_path / "run" / "adapter"), "--max-new-tokens", "2", *quiet]) == 0
    eval_err = capsys.readouterr().err
    if quiet:
        assert train_err == "" and eval_err == ""
        return
    assert "\r" not in train_err + eval_err   # lines, not a redrawn bar
    assert "train: 2/2 steps, " in train_err and "steps/s" in train_err
    assert f"loading {tiny_folder} ..." in eval_err
    for column in ("base", "adapter"):
        assert f"eval {column}: generate: 6/6 prompts, " in eval_err
