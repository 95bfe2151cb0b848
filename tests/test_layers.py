"""Imports point down: scripts/import_graph.py finds no upward import and no package cycle."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "import_graph.py"

# Known upward imports being removed elsewhere; delete an entry once its import is gone.
PENDING: dict[tuple[str, str], str] = {}  # (from, to): why an upward edge is allowed for now


@pytest.fixture(scope="module")
def graph():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def edges(graph):
    return {edge: where for edge, where in graph.collect_edges().items() if edge not in PENDING}


def test_every_imported_package_has_a_layer(graph, edges):
    assert graph.unplaced(edges) == [], "add the package to LAYERS in scripts/import_graph.py"


def test_no_package_imports_from_a_higher_layer(graph, edges):
    assert graph.upward(edges) == {}


def test_no_import_cycle_between_packages(graph, edges):
    assert graph.cycles(edges) == []


def test_the_script_finds_function_level_upward_imports_and_cycles(graph, tmp_path):
    pkg = tmp_path / "loratune"
    for folder in ("models", "train"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "load.py").write_text(
        "from . import __name__\n"  # relative, same package: no edge
        "def f():\n    from loratune.train.loop import train\n")
    (pkg / "train" / "loop.py").write_text("from ..models import load\n"
                                           "from loratune import files\n")
    edges = graph.collect_edges(pkg)
    assert set(edges) == {("models", "train"), ("train", "models"), ("train", "files")}
    assert edges[("models", "train")] == [f"{tmp_path.name}/loratune/models/load.py:3"]
    assert set(graph.upward(edges)) == {("models", "train")}
    assert graph.cycles(edges) == [["models", "train"]]
    assert graph.unplaced(edges) == []


def test_no_private_name_is_imported_from_another_package(graph):
    assert graph.private_imports() == [], "give the name a public one, or move the code"


def test_the_script_finds_private_names_imported_across_packages(graph, tmp_path):
    pkg = tmp_path / "loratune"
    for folder in ("data", "eval"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "formats.py").write_text("def _decode(p): ...\ndef __version__(): ...\n")
    (pkg / "data" / "read.py").write_text("from loratune.data.formats import _decode\n"
                                          "from .formats import _decode\n")  # same package
    (pkg / "eval" / "mc.py").write_text("import os\nfrom loratune.data.formats import (\n"
                                        "    __version__, _decode)\n")
    assert graph.private_imports(pkg) == [
        f"{tmp_path.name}/loratune/eval/mc.py:2 loratune.data.formats._decode"]
