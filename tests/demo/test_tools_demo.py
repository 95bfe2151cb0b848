"""The tool-calling demo's pipeline on a tiny model: examples/tools.yaml trains (a few steps),
the adapter folder carries the chat template, `eval --task tools` scores base and adapter with
it, and `loratune serve` of the run folder answers the openai client's tools requests (call ->
result -> answer) without a flag. A random model writes no call: what is checked is that every
step reads the template the run trained with (without it, eval and serve refuse the tools)."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratune.cli import main
from loratune.data.templates import TEMPLATE_FILE, TEMPLATES

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "tools"))
import loop as tools_loop  # noqa: E402  (examples/tools/loop.py, the demo's client)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with the SmolLM2 tokenizer, and room for the tools' prompts."""
    from tiny import tiny_llama

    folder = tmp_path_factory.mktemp("tiny_long")
    model = tiny_llama(vocab=len(smol_tokenizer))
    model.config.max_position_embeddings = 1024
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_folder):
    out = tmp_path_factory.mktemp("tools") / "run"
    assert main(["train", str(ROOT / "examples" / "tools.yaml"), f"output_dir={out}",
                 f"model.name={tiny_folder}", "train.max_steps=2", "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_the_trained_adapter_carries_its_template_into_eval(run_dir, tiny_folder, tmp_path):
    adapter = run_dir / "adapter"
    assert (adapter / TEMPLATE_FILE).read_text() == TEMPLATES["chatml_tools"]
    out = tmp_path / "eval"
    assert main(["eval", "--task", "tools", "--data", str(ROOT / "examples/tools/heldout.jsonl"),
                 "--model", str(tiny_folder), "--adapter", str(adapter), "--limit", "4",
                 "--max-new-tokens", "4", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "eval-tools.json").read_text())
    assert [v["label"] for v in report["variants"]] == ["base", "adapter"]
    assert all("accuracy" in v["metrics"] for v in report["variants"])


def _serve(tiny_folder, run_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loratune", "serve", "--model",
                             str(tiny_folder), "--adapters", str(run_dir), "--port", str(port),
                             "--threads", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}/v1"


def _wait(proc, url: str, client) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            client.models.list()
            return
        except Exception:   # not listening yet
            time.sleep(0.5)
    raise AssertionError(f"serve did not answer at {url}")


@pytest.mark.slow
def test_the_served_adapter_runs_the_openai_client_loop(run_dir, tiny_folder):
    import openai

    proc, url = _serve(tiny_folder, run_dir)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        _wait(proc, url, client)
        calls, answer = tools_loop.loop(client, "adapter", "What's the weather in Oslo?",
                                        max_tokens=4)
        assert calls == [] and isinstance(answer, str)   # a random model answers in words
        # the round trip with a call made: the result is rendered and answered
        made = {"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}
        messages = [{"role": "user", "content": "What's the weather in Oslo?"},
                    {"role": "assistant", "content": None, "tool_calls": [made]},
                    {"role": "tool", "tool_call_id": "call_1",
                     "content": tools_loop.run_tool("get_weather", {"city": "Oslo"})}]
        final = client.chat.completions.create(model="adapter", messages=messages,
                                               tools=tools_loop.tools(), max_tokens=4)
        assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
