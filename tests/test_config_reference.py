"""docs/config.md is generated from the config classes (scripts/config_reference.py): the
page in the tree must be what the classes say now, so a changed field cannot leave it stale."""

import importlib.util
from pathlib import Path

from loratune.config import commands as cc
from loratune.config.methods import LoraConfig, adapter_options
from loratune.config.run import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("config_reference",
                                                  ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_config_md_is_current():
    ref = _script()
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == ref.render(), (
        "docs/config.md is stale: run .venv/bin/python scripts/config_reference.py")


def test_the_reference_holds_every_key_and_description():
    text = _script().render()
    for name, field in RunConfig.model_fields["train"].annotation.model_fields.items():
        assert f"| `train.{name}` |" in text
    for method in adapter_options():
        assert f"`{method}`" in text
    assert LoraConfig.model_fields["r"].description in text
    assert "| `max_body_bytes` | int | 4194304 |" in text and "`--max-body-bytes`" in text


def test_every_command_config_is_documented():
    """A new command's options class must be added to the script's COMMANDS."""
    def public(cls):
        for sub in cls.__subclasses__():
            yield from ([sub] if not sub.__name__.startswith("_") else []) + list(public(sub))
    ours = {c for c in public(cc.CommandConfig) if c.__module__ == cc.__name__}
    assert ours <= set(_script().COMMANDS.values()), ours - set(_script().COMMANDS.values())


def test_check_flag_fails_on_a_stale_page(tmp_path, monkeypatch):
    ref = _script()
    monkeypatch.setattr(ref, "OUT", tmp_path / "config.md")
    (tmp_path / "config.md").write_text(ref.render().replace("rank of the update", "rank"))
    assert ref.main(["--check"]) == 1
    assert ref.main([]) == 0 and ref.main(["--check"]) == 0
