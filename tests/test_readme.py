"""Every `loratune ...` command in the code blocks of README.md and of the docs/*.md guides, read
from the pages' text itself:
parsed by the real command line and its config built and validated as the command would, without
training or loading a model (`plan` and `models list` run for real: they are cheap). Placeholders
(CONFIG.yaml, DIR, heldout.jsonl, ...) become tiny fixtures. A README command that stops working
fails here, and so in CI. Every docs page is linked from the README (the front door)."""

import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from loratune.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, re.M | re.S)


def readme_commands(text: str) -> list[str]:
    """The loratune commands of the bash blocks: continuation lines joined, comments cut, each
    `&&` part that runs loratune (`.venv/bin/loratune`, `torchrun ... -m loratune`)."""
    out = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            for part in (p.strip() for p in line.split("&&")):
                part = re.sub(r"^(\.venv/bin/loratune|torchrun .*?-m loratune)\b", "loratune",
                              part)
                if part.startswith("loratune "):
                    out.append(part)
    return out


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))
DOC_COMMANDS = [(page.name, c) for page in DOCS
                for c in readme_commands(page.read_text(encoding="utf-8"))]


def test_the_readme_and_docs_have_their_commands():
    words = {c.split()[1] for c in COMMANDS + [c for _, c in DOC_COMMANDS]}
    assert {"demo", "train", "chat", "generate", "eval", "plan", "serve", "ui", "merge",
            "export", "compare", "tune-rank"} <= words, words
    assert "loratune demo --quick" in COMMANDS


def test_the_readme_is_a_front_door_linking_every_doc():
    """Short (issue 25: under ~150 lines), and every docs/*.md page is one click away."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150, len(text.splitlines())
    unlinked = [p.name for p in DOCS if f"](docs/{p.name})" not in text]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_doc_links_point_at_pages_that_exist():
    """A relative link in README.md or a docs page names a file of the tree."""
    broken = []
    for page in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text("utf-8")):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_quickstart_test_command_is_what_ci_runs():
    """The Quickstart's test command is, word for word, a line of .ci/run."""
    quick = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    tests = [re.sub(r"\s+#\s.*$", "", line).strip() for block in code_blocks(quick)
             for line in block.splitlines() if "pytest" in line]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests and tests[0] in ci, (tests, "not a line of .ci/run")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Placeholder -> a path that exists: a config, data files, an adapter, a GGUF name."""
    from tiny import tiny_llama

    from loratune.adapters import add_adapter, save_adapter
    from loratune.config import LoraConfig

    tmp = tmp_path_factory.mktemp("readme")
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, lora_alpha=4), "default")
    adapter = tmp / "adapters" / "adapter_en"
    save_adapter(model, adapter, "default")
    shutil.copytree(adapter, tmp / "adapters" / "adapter_zh")
    config = tmp / "CONFIG.yaml"
    shutil.copy(ROOT / "examples" / "demo.yaml", config)
    # docs/scaling-out.md's run.yaml is a multi-GPU run: its step splits over 4 or 8 ranks
    run = yaml.safe_load(config.read_text())
    run["train"]["grad_accum"] = 8
    (tmp / "run.yaml").write_text(yaml.safe_dump(run))
    data = tmp / "data.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "hi"}\n')
    (tmp / "serve.yaml").write_text("port: 9000\n")
    samples = ROOT / "src" / "loratune" / "eval" / "samples" / "mc"
    return {"CONFIG.yaml": config, "DIR": adapter, "A": adapter, "B": adapter,
            "QLORA_DIR": adapter, "runs/demo-…/adapter": adapter, "adapters/": tmp / "adapters",
            "data.jsonl": data, "heldout.jsonl": data, "answers.jsonl": tmp / "answers.jsonl",
            "mmlu/test": samples / "test", "mmlu/dev": samples / "dev",
            "serve.yaml": tmp / "serve.yaml", "merged/": tmp / "merged",
            "folder/": tmp / "folder", "runs/": tmp / "runs",
            "model.gguf": tmp / "model.gguf", "runs/sft/adapter": adapter,
            "runs/dpo/adapter": adapter, "output_dir=runs/sft": f"output_dir={tmp / 'sft'}",
            "run.yaml": tmp / "run.yaml", "BASE": tmp / "base", "./adapters": tmp / "adapters",
            "~/data": tmp}


def substitute(command: str, fixtures: dict) -> list[str]:
    """The command's words with each placeholder (a whole word, or the value of key=value)
    made a fixture; `[--flag value]` (optional) taken as given."""
    words = []
    for word in shlex.split(command.replace("[", "").replace("]", ""))[1:]:
        key, eq, value = word.rpartition("=")
        if word in fixtures:
            word = str(fixtures[word])
        elif eq and value in fixtures:
            word = f"{key}={fixtures[value]}"
        words.append(word)
    return words


def dry_run(argv: list[str]) -> None:
    """What the command does before its slow part: its config, built and validated."""
    from loratune.config import commands as cc
    from loratune.flags import config_from_args

    args = build_parser().parse_args(argv)
    name = args.func.__name__.removeprefix("cmd_")
    if name == "train":
        from loratune.config import load_config
        from loratune.train.distributed import check_world_size

        cfg = load_config(args.config, args.overrides)
        if args.nproc:
            check_world_size(cfg.train.grad_accum, cfg.train.batch_size, args.nproc)
    elif name == "demo":
        from loratune.demo.job import demo_config

        demo_config(None, args.overrides)
    elif name in ("compare", "tune_rank"):
        from loratune.recipes.compare import load_settings, parse_method_values

        load_settings(args.config, args.overrides)
        if name == "compare" and args.lr:
            parse_method_values(args.lr, args.methods.split(","), "--lr")
    elif name == "federate":
        from loratune.config import load_config
        from loratune.recipes.federate import check_federated

        check_federated(load_config(args.config, args.overrides))
    elif name == "search":
        from loratune.recipes.search import search_settings

        search_settings(args.config, args.overrides)
    elif name in ("plan", "models"):
        assert main(argv) == 0
    else:
        classes = {"chat": cc.ChatConfig, "generate": cc.GenerateConfig,
                   "eval": cc.EvalCommandConfig, "merge": cc.MergeConfig, "serve": cc.ServeConfig,
                   "ui": cc.UiConfig, "export_hf": cc.ExportHfConfig,
                   "export_gguf": cc.ExportGgufConfig}
        config_from_args(classes[name], args)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command(command, fixtures, capsys):
    dry_run(substitute(command, fixtures))


@pytest.mark.parametrize("page,command", DOC_COMMANDS)
def test_docs_command(page, command, fixtures, capsys):
    dry_run(substitute(command, fixtures))
