"""The training loop on a tiny random Llama with the real SmolLM2 tokenizer (seconds)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loratune.config import build_config
from loratune.train import RunFolderError, train
from tiny import tiny_llama


@pytest.fixture
def data_file(tmp_path):
    rows = [{"instruction": f"Repeat the word {w}", "input": "", "output": f"{w} {w} {w}"}
            for w in ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger",
                      "lemon", "candle", "forest", "rocket"]]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, data_file, name="run", **train):
    settings = {"max_steps": 12, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0, **train}
    return build_config({
        "output_dir": str(tmp_path / name),
        "adapter": {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]},
        "data": {"train": str(data_file), "max_length": 64, "eval_fraction": 0.25},
        "train": settings,
    })


def _run(cfg, tok, **kw):
    model = tiny_llama(vocab=len(tok))
    return train(cfg, model=model, tokenizer=tok, quiet=True, **kw), model


def test_loss_falls_and_files_written(tmp_path, data_file, smol_tokenizer):
    result, _ = _run(_cfg(tmp_path, data_file, max_steps=30), smol_tokenizer)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 2.0
    out = result.output_dir
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "run_summary.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
    assert any("eval_loss" in r for r in records)


def test_same_seed_same_curve(tmp_path, data_file, smol_tokenizer):
    a, _ = _run(_cfg(tmp_path, data_file, "a", max_steps=5), smol_tokenizer)
    b, _ = _run(_cfg(tmp_path, data_file, "b", max_steps=5), smol_tokenizer)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])  # 8-bit: lm_head's states
def test_resume_continues_exactly(tmp_path, data_file, smol_tokenizer, optimizer):
    full, _ = _run(_cfg(tmp_path, data_file, "full", max_steps=8, grad_accum=2,
                        optimizer=optimizer), smol_tokenizer)
    cfg = _cfg(tmp_path, data_file, "cut", max_steps=8, grad_accum=2, save_every=3,
               save_total_limit=1, optimizer=optimizer)
    _run(cfg, smol_tokenizer)
    out = tmp_path / "cut"
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000006"]  # step 3 pruned by save_total_limit=1
    # Pretend the run died right after the step-6 checkpoint.
    (out / "run_summary.json").unlink()
    import shutil

    shutil.rmtree(out / "adapter")
    resumed, _ = _run(cfg, smol_tokenizer, resume=True)
    assert [h["step"] for h in resumed.history] == [7, 8]
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in full.history[6:]], rel=1e-5)
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, 9))


def test_finished_run_refused_then_backed_up(tmp_path, data_file, smol_tokenizer):
    cfg = _cfg(tmp_path, data_file, "run", max_steps=2)
    _run(cfg, smol_tokenizer)
    with pytest.raises(RunFolderError, match="finished run"):
        _run(cfg, smol_tokenizer)
    _run(cfg, smol_tokenizer, overwrite=True)
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("run.bak-")]
    assert len(backups) == 1 and (backups[0] / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoint_has_no_pickle(tmp_path, data_file, smol_tokenizer):
    _run(_cfg(tmp_path, data_file, "ck", max_steps=4, save_every=2), smol_tokenizer)
    files = {p.suffix for p in (tmp_path / "ck" / "checkpoints").rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors"}


def _count_layer_calls(model) -> list[int]:
    """Calls of layer 0's MLP with gradients on: one per micro-batch in the forward, one more
    in backward when the layer is checkpointed (recomputed). A pre-hook: torch's non-reentrant
    checkpoint stops recomputing at the last saved tensor, before a post-hook would run."""
    calls: list[int] = []
    model.model.layers[0].mlp.register_forward_pre_hook(
        lambda mod, args: calls.append(1) if torch.is_grad_enabled() else None)
    return calls


def test_gradient_checkpointing_recomputes_each_layer(tmp_path, data_file, smol_tokenizer):
    runs = {}
    for on in (False, True):
        model = tiny_llama(vocab=len(smol_tokenizer))
        calls = _count_layer_calls(model)
        cfg = _cfg(tmp_path, data_file, f"ckpt-{on}", max_steps=3, grad_accum=2,
                   loraplus_lr_ratio=16, gradient_checkpointing=on, schedule="linear")
        result = train(cfg, model=model, tokenizer=smol_tokenizer, quiet=True)
        runs[on] = (len(calls), [h["loss"] for h in result.history])
    assert runs[False][0] == 6 and runs[True][0] == 12  # 3 steps x 2 micro-batches (x 2)
    assert runs[True][1] == pytest.approx(runs[False][1], abs=1e-5)  # recomputed, same numbers


def _seen_rows(model) -> list[list[int]]:
    """Every row of token ids the embedding sees with gradients on (training forwards)."""
    rows: list[list[int]] = []
    model.model.embed_tokens.register_forward_pre_hook(
        lambda mod, args: rows.extend(args[0].tolist()) if torch.is_grad_enabled() else None)
    return rows


def _unpadded(row: list[int], pad: int) -> tuple[int, ...]:
    while row and row[-1] == pad:  # the same for a row with or without right padding
        row = row[:-1]
    return tuple(row)


def test_each_epoch_is_reshuffled_by_the_seed(tmp_path, data_file, smol_tokenizer):
    from loratune import data as lt_data
    from loratune.train.loop import build_data

    seen = {}
    for seed in (1, 2):
        cfg = build_config({"output_dir": str(tmp_path / f"seed{seed}"),
                            "adapter": {"r": 2, "target_modules": ["q_proj"]},
                            "data": {"train": str(data_file), "max_length": 64, "packing": False},
                            "train": {"epochs": 2, "batch_size": 4, "seed": seed}})
        model = tiny_llama(vocab=len(smol_tokenizer))
        rows = _seen_rows(model)
        result = train(cfg, model=model, tokenizer=smol_tokenizer, quiet=True)
        assert result.steps == 6  # 12 rows, 4 per step, 2 epochs
        examples = build_data(cfg, smol_tokenizer)[0]
        expected = [row for epoch in (0, 1) for b in lt_data.batches(
            examples, 4, 64, False, smol_tokenizer.pad_token_id, seed, epoch)
            for row in b["input_ids"].tolist()]
        assert rows == expected  # the loop trains on exactly batches(seed, epoch), in order
        first, second = rows[:12], rows[12:]
        assert second != first  # reshuffled: same rows (padding aside), another order
        pad = smol_tokenizer.pad_token_id
        assert sorted(_unpadded(r, pad) for r in second) == sorted(
            _unpadded(r, pad) for r in first)
        seen[seed] = rows
    assert seen[1][:12] != seen[2][:12] and seen[1][12:] != seen[2][12:]


def test_resume_with_incompatible_config_is_refused(tmp_path, data_file, smol_tokenizer):
    from loratune.adapters import AdapterError

    cfg = _cfg(tmp_path, data_file, "inc", max_steps=4, save_every=2)
    _run(cfg, smol_tokenizer)
    (tmp_path / "inc" / "run_summary.json").unlink()
    other = cfg.model_copy(deep=True)
    other.adapter.r = 8
    with pytest.raises(AdapterError, match="does not fit this configuration.*shape"):
        _run(other, smol_tokenizer, resume=True)


def test_dora_run_trains_and_saves_a_dora_adapter(tmp_path, data_file, smol_tokenizer):
    from loratune.adapters import load_adapter

    cfg = _cfg(tmp_path, data_file, "dora", max_steps=20)
    cfg.adapter.method = "dora"
    result, model = _run(cfg, smol_tokenizer)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.5
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    keys = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any(k.endswith("lora_magnitude_vector") for k in keys)
    fresh = tiny_llama(vocab=len(smol_tokenizer))
    load_adapter(fresh, result.adapter_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def _adapter_cfg(tmp_path, data_file, name, adapter, **train):
    cfg = _cfg(tmp_path, data_file, name, **train).model_dump()
    cfg["adapter"] = adapter
    return build_config(cfg)


def test_a_method_record_refuses_resume(tmp_path, data_file, smol_tokenizer):
    # prefix's record: with prefix_projection, checkpoints hold computed prefixes, not the MLP.
    cfg = _adapter_cfg(tmp_path, data_file, "proj", {"method": "prefix", "num_virtual_tokens": 2,
                                                     "prefix_projection": True},
                       max_steps=4, save_every=2)
    _run(cfg, smol_tokenizer)
    (tmp_path / "proj" / "run_summary.json").unlink()
    saved = (tmp_path / "proj" / "config.yaml").read_bytes()
    with pytest.raises(RunFolderError, match=r"resume is not supported for adapter.method: "
                                             r"prefix \(with prefix_projection, checkpoints"):
        _run(cfg, smol_tokenizer, resume=True)
    assert (tmp_path / "proj" / "config.yaml").read_bytes() == saved
    plain = _adapter_cfg(tmp_path, data_file, "plain", {"method": "prefix",
                                                        "num_virtual_tokens": 2},
                         max_steps=4, save_every=2)
    _run(plain, smol_tokenizer)
    (tmp_path / "plain" / "run_summary.json").unlink()
    result, _ = _run(plain, smol_tokenizer, resume=True)
    assert [h["step"] for h in result.history] == [3, 4]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_from_the_record_must_fit_the_context(tmp_path, data_file,
                                                             smol_tokenizer, method):
    # The tiny model has 128 positions; rows are up to 64 tokens.
    cfg = _adapter_cfg(tmp_path, data_file, method, {"method": method,
                                                     "num_virtual_tokens": 65})
    with pytest.raises(ValueError, match=r"num_virtual_tokens=65 plus data.max_length=64 "
                                         r"exceeds the model's context of 128.*at most 64"):
        _run(cfg, smol_tokenizer)
    assert not (tmp_path / method).exists()
    cfg.adapter.num_virtual_tokens = 64
    _run(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 1})}),
         smol_tokenizer)


def test_the_recipe_reads_the_files_its_caller_resolved(tmp_path, data_file, smol_tokenizer):
    cfg = _cfg(tmp_path, data_file, "given", max_steps=1)
    cfg.data.train = str(tmp_path / "not-read.jsonl")
    held = tmp_path / "held.jsonl"
    held.write_text(data_file.read_text().split("\n", 1)[0] + "\n")
    result, _ = _run(cfg, smol_tokenizer, data_paths=(str(data_file), str(held)))
    assert result.steps == 1 and result.eval_loss is not None
    written = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    assert written["data"]["train"] == cfg.data.train  # the config as given, not the paths


def test_demo_names_are_resolved_by_the_demo_package():
    from loratune.demo import demo_heldout_path, demo_train_path, resolve_data_paths

    cfg = build_config({"data": {"train": "demo"}})
    assert resolve_data_paths(cfg) == (str(demo_train_path()), str(demo_heldout_path()))
    cfg = build_config({"data": {"train": "mine.jsonl", "eval": "demo"}})
    assert resolve_data_paths(cfg) == ("mine.jsonl", str(demo_heldout_path()))
    cfg = build_config({"data": {"train": "mine.jsonl"}})
    assert resolve_data_paths(cfg) == ("mine.jsonl", None)


def test_continued_pretraining_on_text(tmp_path, smol_tokenizer):
    """data.format text through the loop: packed by default, loss falls, tied embeddings train
    as one matrix saved under both names."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The {w} lantern burns kelp oil on the island." for w in
                                  ["red", "green", "gold", "pale", "old", "small", "tall", "blue"]))
    cfg = build_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"r": 4, "lora_alpha": 8, "modules_to_save": ["embed_tokens", "lm_head"]},
        "data": {"format": "text", "train": str(corpus), "max_length": 48},
        "train": {"max_steps": 20, "batch_size": 2, "lr": 5e-3, "embedding_lr": 1e-3,
                  "warmup_ratio": 0.0},
    })
    model = tiny_llama(vocab=len(smol_tokenizer), tie=True)
    result = train(cfg, model=model, tokenizer=smol_tokenizer, quiet=True)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.5
    summary = json.loads((result.output_dir / "run_summary.json").read_text())
    assert summary["packing"] is True
    saved = load_file(result.output_dir / "adapter" / "adapter_model.safetensors")
    embed = saved["base_model.model.model.embed_tokens.weight"]
    assert torch.equal(embed, saved["base_model.model.lm_head.weight"])
    assert not torch.equal(embed, model.model.embed_tokens.original.weight)


def test_adalora_resume_continues_exactly(tmp_path, data_file, smol_tokenizer):
    """AdaLoRA's rank allocator (importance EMAs, masks) lives outside the adapter weights:
    an SFT resume restores it from the checkpoint, so the resumed run prunes as the unbroken
    one does and ends with the same adapter."""
    def cfg(name, **kw):
        c = build_config({
            "output_dir": str(tmp_path / name),
            "adapter": {"method": "adalora", "init_r": 8, "target_r": 2, "tinit": 1,
                        "tfinal": 1, "deltaT": 1, "lora_alpha": 8},
            "data": {"train": str(data_file), "max_length": 64},
            "train": {"max_steps": 10, "batch_size": 4, "lr": 2e-2, "warmup_ratio": 0.0, **kw}})
        return c

    full, _ = _run(cfg("full"), smol_tokenizer)
    cut = cfg("cut", save_every=4)
    _run(cut, smol_tokenizer)
    out = tmp_path / "cut"
    (out / "run_summary.json").unlink()
    import shutil

    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "step-00000008")   # back to step 4, mid-schedule
    state = load_file(str(out / "checkpoints" / "step-00000004" / "trainer_state.safetensors"))
    assert "hooks.final" in state and any(k.startswith("hooks.ema_ipt.") for k in state)
    resumed, _ = _run(cut, smol_tokenizer, resume=True)
    assert [h["step"] for h in resumed.history] == list(range(5, 11))
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in full.history[4:]], rel=1e-5)
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_the_last_steps_held_out_loss_is_not_measured_twice(tmp_path, data_file, smol_tokenizer,
                                                             monkeypatch):
    """eval_every dividing max_steps measures the held-out loss at the last step; saving does
    not run the same pass again (on the real model each pass costs minutes)."""
    from loratune.train import loop

    calls = []
    real = loop.held_out_losses
    monkeypatch.setattr(loop, "held_out_losses", lambda run: calls.append(1) or real(run))
    result, _ = _run(_cfg(tmp_path, data_file, max_steps=4, eval_every=2), smol_tokenizer)
    assert len(calls) == 2 and result.eval_loss is not None
    lines = [json.loads(l) for l in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [l for l in lines if "eval_loss" in l]
    assert [l["step"] for l in evals] == [2, 4]
    summary = json.loads((result.output_dir / "run_summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-6)
