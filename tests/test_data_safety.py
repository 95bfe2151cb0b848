"""Data loss and durability: outputs never swallow inputs, refusals change nothing, writes are
fsync'ed before they are published, and leftovers of killed writes are cleaned up."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from loratune.adapters import add_adapter, save_adapter
from loratune.cli import main
from loratune.config import LoraConfig, build_config
from loratune.train import RunFolderError, train
from tiny import tiny_llama

DEAD_PID = 4194305  # above Linux's largest pid_max: never a live process


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def run_with_adapter(tmp_path):
    """A run folder as train leaves it: adapter, a checkpoint, config and metrics."""
    run = tmp_path / "run"
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, run / "adapter")
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "trainer_state.json").write_text("{}")
    (run / "config.yaml").write_text("output_dir: run\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run


@pytest.fixture
def base_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "models" / "base")
    return tmp_path / "models" / "base"


# 1. merge / export --out never replaces or holds an input


@pytest.mark.parametrize("where, message", [
    ("run", "contains the input"),            # the run folder: adapter and checkpoints
    ("adapter", "is the input"),
    ("adapter/sub", "is inside the input folder"),
    ("models", "contains the input"),         # the folder holding the base model
    ("models/base", "is the input"),
])
def test_merge_out_holding_an_input_is_refused(tmp_path, run_with_adapter, base_dir, capsys,
                                               where, message):
    out = tmp_path / "run" / "adapter" / "sub" if where == "adapter/sub" else {
        "run": run_with_adapter, "adapter": run_with_adapter / "adapter",
        "models": base_dir.parent, "models/base": base_dir}[where]
    before = snapshot(tmp_path)
    code = main(["merge", "--model", str(base_dir), "--adapter", str(run_with_adapter / "adapter"),
                 "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_export_hf_out_holding_the_model_is_refused(tmp_path, base_dir, capsys):
    before = snapshot(tmp_path)
    assert main(["export", "hf", "--model", str(base_dir), "--out", str(base_dir.parent),
                 "--overwrite"]) == 2
    assert "contains the input" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["weights_file", "run_folder"])
def test_export_gguf_out_on_an_input_is_refused(tmp_path, run_with_adapter, base_dir, capsys,
                                                target):
    pytest.importorskip("gguf")
    adapter = run_with_adapter / "adapter"
    out = adapter / "adapter_model.safetensors" if target == "weights_file" else run_with_adapter
    before = snapshot(tmp_path)
    assert main(["export", "gguf", "--model", str(base_dir), "--adapter", str(adapter),
                 "--adapter-only", "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_merge_overwrite_refuses_cwd_and_foreign_folders(tmp_path, run_with_adapter, base_dir,
                                                         monkeypatch, capsys):
    work = tmp_path / "home" / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "mine.py").write_text("print('mine')\n")
    monkeypatch.chdir(work)
    args = ["merge", "--model", str(base_dir), "--adapter", str(run_with_adapter / "adapter"),
            "--overwrite", "--out"]
    before = snapshot(tmp_path)
    for out, message in [(str(work), "current directory"), (".", "current directory"),
                         (str(tmp_path / "home"), "holds the current directory"),
                         (str(work / "src"), "does not look like")]:
        assert main(args + [out]) == 2, out
        assert message in capsys.readouterr().err, out
    assert snapshot(tmp_path) == before
    # A model folder (config.json) written earlier is replaced as asked.
    assert main(args + [str(tmp_path / "merged")]) == 0
    assert main(args + [str(tmp_path / "merged")]) == 0


# 2. generate --out


def test_generate_out_refuses_existing_file_and_its_input(tmp_path, tiny_folder, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"instruction": "say a", "output": "a"}) + "\n")
    old = tmp_path / "answers.jsonl"
    old.write_text("my earlier answers\n")
    gen = ["generate", "--model", str(tiny_folder), "--max-new-tokens", "2"]
    assert main(gen + ["--prompt", "x", "--out", str(old)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert old.read_text() == "my earlier answers\n"
    for spelled in (str(data), str(tmp_path / "." / "prompts.jsonl")):
        assert main(gen + ["--input", str(data), "--out", spelled, "--overwrite"]) == 2
        assert "is the input" in capsys.readouterr().err
    assert json.loads(data.read_text())["output"] == "a"
    assert main(gen + ["--prompt", "x", "--out", str(old), "--overwrite"]) == 0
    assert json.loads(old.read_text())["prompt"] == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "prompts.jsonl"]


def test_generate_crash_while_writing_keeps_the_old_file(tmp_path, tiny_folder, monkeypatch):
    old = tmp_path / "answers.jsonl"
    old.write_text("my earlier answers\n")
    calls = []
    real = json.dumps

    def failing(obj, **kw):
        calls.append(obj)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(obj, **kw)

    monkeypatch.setattr("loratune.cli.json.dumps", failing)
    with pytest.raises(OSError, match="disk full"):
        main(["generate", "--model", str(tiny_folder), "--max-new-tokens", "2", "--prompt", "x",
              "--prompt", "y", "--out", str(old), "--overwrite"])
    assert old.read_text() == "my earlier answers\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl"]


# 3. train --overwrite only moves a loratune run away


@pytest.fixture
def data_file(tmp_path):
    rows = [{"instruction": f"Repeat {w}", "output": f"{w} {w}"}
            for w in ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger"]]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(output_dir, data_file, **train_opts):
    return build_config({
        "output_dir": str(output_dir),
        "adapter": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data_file), "max_length": 48},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, **train_opts},
    })


def _train(cfg, tok, **kw):
    return train(cfg, model=tiny_llama(vocab=len(tok)), tokenizer=tok, quiet=True, **kw)


def test_train_overwrite_refuses_cwd_parents_home_and_foreign_folders(
        tmp_path, data_file, smol_tokenizer, monkeypatch):
    work = tmp_path / "home" / "project"
    (work / "src").mkdir(parents=True)
    (work / "src" / "mine.py").write_text("print('mine')\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("keep me\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for output_dir, message in [(".", "current directory"), (work, "current directory"),
                                ("..", "holds the current directory"),
                                (tmp_path / "home", "holds the current directory"),
                                (tmp_path / "elsewhere", "'notes.txt'")]:
        with pytest.raises(RunFolderError, match=message):
            _train(_cfg(output_dir, data_file), smol_tokenizer, overwrite=True)
        assert snapshot(tmp_path) == before
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunFolderError, match="home directory"):
        _train(_cfg(tmp_path / "home", data_file), smol_tokenizer, overwrite=True)
    assert snapshot(tmp_path) == before


# 4. a refused --resume leaves config.yaml as it was


def test_refused_resume_leaves_config_yaml_byte_for_byte(tmp_path, data_file, smol_tokenizer):
    from loratune.adapters import AdapterError

    run = tmp_path / "run"
    _train(_cfg(run, data_file, save_every=2), smol_tokenizer)
    (run / "run_summary.json").unlink()  # the run "died" after its step-2 checkpoint
    saved = (run / "config.yaml").read_bytes()
    for changed, error in [({"batch_size": 4}, RunFolderError), ({"seed": 7}, RunFolderError)]:
        with pytest.raises(error, match="incompatible configuration"):
            _train(_cfg(run, data_file, save_every=2, **changed), smol_tokenizer, resume=True)
        assert (run / "config.yaml").read_bytes() == saved
    other = _cfg(run, data_file, save_every=2)
    other.adapter.r = 4
    with pytest.raises(AdapterError, match="does not fit this configuration"):
        _train(other, smol_tokenizer, resume=True)
    assert (run / "config.yaml").read_bytes() == saved


def test_resume_without_a_checkpoint_is_refused_and_changes_nothing(tmp_path, data_file,
                                                                    smol_tokenizer):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(run), "seed": 1}))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    before = snapshot(run)
    with pytest.raises(RunFolderError, match="no checkpoint to resume from"):
        _train(_cfg(run, data_file, lr=5e-4), smol_tokenizer, resume=True)
    assert snapshot(run) == before
    with pytest.raises(RunFolderError, match="no checkpoint to resume from"):
        _train(_cfg(tmp_path / "never", data_file), smol_tokenizer, resume=True)
    assert not (tmp_path / "never").exists()


# 5. leftovers of killed writes


def _plant(folder: Path, name: str) -> Path:
    path = folder / name
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"half written")
    return path


def test_next_start_of_the_run_removes_leftovers_of_killed_writes(tmp_path, data_file,
                                                                  smol_tokenizer):
    run = tmp_path / "run"
    _train(_cfg(run, data_file, save_every=2), smol_tokenizer)
    (run / "run_summary.json").unlink()
    ckpts = run / "checkpoints"
    dead = [_plant(ckpts, ".step-00000004.tmpab12cd34"),          # older loratune's name
            _plant(ckpts, f".step-00000004.tmp-{DEAD_PID}-x1y2z3w4"),
            _plant(run, f".adapter.tmp-{DEAD_PID}-abcdefgh"),
            _plant(run, ".adapter.old")]
    alive = _plant(run, f".adapter.tmp-{os.getpid()}-abcdefgh")  # a write still in progress
    _train(_cfg(run, data_file, save_every=2), smol_tokenizer, resume=True)
    assert not any(p.exists() for p in dead)
    assert alive.exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]


def test_next_write_into_the_parent_removes_leftovers_and_restores_a_lost_folder(tmp_path):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    first = save_adapter(model, tmp_path / "ad")
    good = snapshot(first)
    # Killed between moving the old folder aside and renaming the new one in:
    os.replace(first, tmp_path / f".ad.old-{DEAD_PID}")
    _plant(tmp_path, f".ad.tmp-{DEAD_PID}-abcdefgh")
    _plant(tmp_path, f".other.tmp-{DEAD_PID}-abcdefgh")  # another name: not this write's
    with pytest.raises(FileExistsError, match="already exists"):
        save_adapter(model, tmp_path / "ad")  # the previous adapter is back, so not replaced
    assert snapshot(tmp_path / "ad") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".other.tmp-{DEAD_PID}-abcdefgh", "ad"]


def test_pruned_checkpoints_never_linger_half_deleted(tmp_path, monkeypatch):
    """Pruning renames a checkpoint out of the step-NNNNNNNN namespace before deleting it."""
    import shutil

    from loratune.train.checkpoint import list_checkpoints, save_checkpoint

    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_checkpoint(tmp_path, 1, model, opt, {})
    seen = []
    real = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (seen.append(Path(p).name),
                                                              real(p, *a, **k)))
    save_checkpoint(tmp_path, 2, model, opt, {}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    assert "step-00000001" not in seen


# 6. fsync before publishing


def _record(monkeypatch) -> list[tuple]:
    events: list[tuple] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, **kw)

    def rename(src, dst, **kw):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


def _check_synced_then_published(events: list[tuple], out: Path) -> None:
    out = Path(os.path.realpath(out))
    publish = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out)]
    assert publish, f"{out} was never renamed into place"
    i = publish[-1]
    tmp = Path(events[i][1])
    synced = {e[1] for e in events[:i] if e[0] == "fsync"}
    for f in out.rglob("*"):
        assert str(tmp / f.relative_to(out)) in synced, f"{f} not fsync'ed before the rename"
    assert str(tmp) in synced, "the folder itself was not fsync'ed before the rename"
    assert ("fsync", str(out.parent)) in events[i + 1:], "parent folder not fsync'ed after"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fds through /proc")
@pytest.mark.parametrize("writer", ["checkpoint", "adapter", "merge", "overwrite"])
def test_writes_are_fsynced_before_the_rename_that_publishes_them(tmp_path, base_dir,
                                                                  monkeypatch, writer):
    from loratune.export.merge import merge_folder, read_adapters
    from loratune.train.checkpoint import save_checkpoint

    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    adapter = save_adapter(model, tmp_path / "ad")
    events = _record(monkeypatch)
    if writer == "checkpoint":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        out = save_checkpoint(tmp_path / "ckpts", 3, model, opt, {"total_steps": 4})
    elif writer == "adapter":
        out = save_adapter(model, tmp_path / "ad2")
    elif writer == "merge":
        out = merge_folder(base_dir, read_adapters([adapter], None), tmp_path / "merged",
                           shard_size="20KB").out
    else:
        out = save_adapter(model, adapter, overwrite=True)
    _check_synced_then_published(events, out)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fds through /proc")
def test_file_writes_are_fsynced_before_the_rename(tmp_path, tiny_folder, monkeypatch):
    events = _record(monkeypatch)
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--model", str(tiny_folder), "--max-new-tokens", "2",
                 "--prompt", "x", "--out", str(out)]) == 0
    i = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out))
    assert ("fsync", events[i][1]) in events[:i]
    assert ("fsync", str(tmp_path)) in events[i + 1:]
