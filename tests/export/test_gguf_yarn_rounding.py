"""`export gguf --round-yarn`: a GPT-OSS whose config says YaRN truncate: false (every released
one) is refused by default and, with the opt-in, written as llama.cpp runs it (truncate: true):
read back by our loader with the rounded model's logits, and the drift from the config's own
rotation stated."""

import json

import pytest
import torch

pytest.importorskip("gguf")

from loratune.cli import main  # noqa: E402
from loratune.export.gguf_arch import GGUFExportError  # noqa: E402
from loratune.export.gguf_file import write_gguf  # noqa: E402
from loratune.export.gguf_yarn import rounded_yarn  # noqa: E402
from loratune.models import load_model  # noqa: E402
from tests.export.test_gguf_moe_more import LONG, YARN, gpt_oss  # noqa: E402

UNROUNDED = {**YARN, "truncate": False}


@pytest.fixture(scope="module")
def unrounded(tmp_path_factory):
    """The tiny GPT-OSS saved with truncate: false, and the same weights with truncate: true."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("gpt-oss") / "m"
    rounded, tok = gpt_oss()
    rounded.save_pretrained(folder)
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = dict(UNROUNDED)
    (folder / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, rounded


def test_refused_without_the_opt_in_naming_it(unrounded, tmp_path):
    folder, *_ = unrounded
    with pytest.raises(GGUFExportError, match=r"truncate=false.*--round-yarn"):
        write_gguf(folder, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.iterdir())


def test_written_with_the_opt_in_as_the_rounded_model(unrounded, tmp_path, capsys):
    folder, model, rounded = unrounded
    path = write_gguf(folder, tmp_path / "m.gguf", "f32", round_yarn=True)
    assert "rotary frequencies change" in capsys.readouterr().out
    loaded, _ = load_model(str(path))
    with torch.no_grad():
        got = loaded(LONG).logits
        torch.testing.assert_close(got, rounded(LONG).logits, atol=1e-4, rtol=0)
        assert (got - model(LONG).logits).abs().max() > 1e-4  # the rounding shows in the logits
    # the user's folder is untouched: its config still says truncate: false
    assert json.loads((folder / "config.json").read_text())["rope_parameters"]["truncate"] is False


def test_the_cli_flag_reaches_the_writer(unrounded, tmp_path):
    folder, *_ = unrounded
    out = tmp_path / "m.gguf"
    args = ["export", "gguf", "--model", str(folder), "--out", str(out), "--type", "f32",
            "--no-modelfile"]
    assert main(args) != 0 and not out.exists()
    assert main([*args, "--round-yarn"]) == 0 and out.exists()


def test_the_drift_line_for_the_released_gpt_oss_rope():
    """GPT-OSS-20B/120B's rope (theta 150000, factor 32, 4096 original positions, head 64)."""
    from transformers import GptOssConfig

    config = GptOssConfig().to_dict()
    assert config["rope_parameters"]["truncate"] is False
    rounded, line = rounded_yarn(config)
    assert rounded["rope_parameters"]["truncate"] is True
    assert config["rope_parameters"]["truncate"] is False  # the caller's dict is not changed
    assert "9 of 32 rotary frequencies change" in line and "1 rad by position 45" in line
    assert rounded_yarn(rounded) == (rounded, None)  # nothing left to round
