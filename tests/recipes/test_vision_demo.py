"""The vision demo's pipeline, a handful of steps: examples/vision.yaml trains the bundled
tiny-vlm (built into the cache on first use), `eval --task vqa` scores base and adapter on the
held-out file, and `serve --model tiny-vlm` answers a held-out image question as eval does. The
committed data is scripts/make_vision_data.py's output."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loratune.cli import main

ROOT = Path(__file__).resolve().parents[2]
VISION = ROOT / "examples" / "vision"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache of its own, so tiny-vlm is built here from its config (first use)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORATUNE_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("vision") / "run"
    assert main(["train", str(ROOT / "examples" / "vision.yaml"), f"output_dir={out}",
                 "train.max_steps=6", "train.batch_size=2", "train.warmup_ratio=0",
                 "--quiet"]) == 0
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_vlm_is_built_on_first_use_the_same_every_time(run_dir, cache, tmp_path):
    from loratune.models.tiny_vlm import build_tiny_vlm

    built = cache / "models" / "tiny-vlm"
    assert (built / "SOURCE").is_file() and json.loads(
        (built / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    build_tiny_vlm(tmp_path)   # again, elsewhere: seed 0 gives the same bytes
    assert digest(tmp_path / "model.safetensors") == digest(built / "model.safetensors")


def test_the_demo_trains_and_eval_scores_base_and_adapter(run_dir, tmp_path):
    losses = [json.loads(line)["loss"] for line in
              (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 6 and sum(losses[3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    out = tmp_path / "eval"
    assert main(["eval", "--task", "vqa", "--model", "tiny-vlm", "--data",
                 str(VISION / "heldout.jsonl"), "--adapter", str(run_dir / "adapter"),
                 "--limit", "4", "--max-new-tokens", "4", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "eval-vqa.json").read_text())
    assert [v["label"] for v in report["variants"]] == ["base", "adapter"]
    assert all(set(v["metrics"]) == {"exact_match", "token_f1"} for v in report["variants"])


def test_serve_answers_a_held_out_image_question_as_eval_does(run_dir):
    """The server loads tiny-vlm by name and the run's adapter; its greedy reply to a held-out
    question with the image as a path under --image-root is eval's prediction."""
    from loratune.adapters import load_adapter
    from loratune.config import DataConfig
    from loratune.data.dataset import read_image_conversations
    from loratune.eval.tasks import vqa
    from loratune.models import load_model
    from loratune.serve.api import build_app
    from loratune.serve.engine import Engine
    from loratune.serve.image_prompt import ImageSource
    from loratune.serve.pool import AdapterPool

    record = json.loads((VISION / "heldout.jsonl").read_text().splitlines()[0])
    model, tok = load_model("tiny-vlm")
    engine = Engine(model, tok, AdapterPool(str(run_dir)), base_name="tiny-vlm").start()
    question = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": record["messages"][0]["content"][0]["image"]}},
        {"type": "text", "text": record["messages"][0]["content"][1]["text"]}]}]
    try:
        with TestClient(build_app(engine, images=ImageSource(root=VISION)),
                        base_url="http://127.0.0.1:8000") as client:
            resp = client.post("/v1/chat/completions", json={
                "model": "adapter", "messages": question, "temperature": 0, "max_tokens": 6})
    finally:
        engine.stop()
    assert resp.status_code == 200, resp.text
    reply = resp.json()["choices"][0]["message"]["content"]

    fresh, tok = load_model("tiny-vlm")
    load_adapter(fresh, run_dir / "adapter")
    where, messages, images = read_image_conversations(
        VISION / "heldout.jsonl", DataConfig(train="x"))[0]
    ids, image_inputs = vqa.prompt_example(tok, where, messages, images)
    answer = vqa.answer(fresh, tok, ids, image_inputs, 6)
    # A few steps in, the byte-level model may end on a cut UTF-8 sequence: the server holds
    # those bytes back (a later token could complete them), eval decodes them as U+FFFD.
    assert reply and answer.startswith(reply) and not answer[len(reply):].strip("\ufffd")


def test_committed_data_is_the_generators_output(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_vision_data.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_text() == (VISION / name).read_text()
    made = sorted(p.relative_to(tmp_path) for p in (tmp_path / "images").iterdir())
    assert made == sorted(p.relative_to(VISION) for p in (VISION / "images").iterdir())
    assert all(digest(tmp_path / p) == digest(VISION / p) for p in made)
    assert sum(p.stat().st_size for p in VISION.rglob("*") if p.is_file()) < 1 << 20
