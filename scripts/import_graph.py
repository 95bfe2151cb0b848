#!/usr/bin/env python3
"""loratune's imports between its packages: every edge, the ones that point up, and cycles.

    python scripts/import_graph.py            # edges, upward imports, cycles, counts
    python scripts/import_graph.py --check    # exit 1 on any upward import or cycle, or a
                                              # private name imported from another package

Reads src/loratune with `ast` (nothing is imported), so module-level and function-level
imports count alike. A package is the first name under `loratune` (`adapters`, `train`, ...);
a top-level module (`files.py`, `flags.py`) is its own package. An import points up when it
reaches a higher layer of LAYERS; imports inside one layer are allowed as long as the packages
form no cycle. A package missing from LAYERS is an error: place it before it is imported.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "loratune"

# Bottom to top; a package may import from its own layer (no cycle) and the layers below.
LAYERS: list[tuple[str, ...]] = [
    ("config", "flags",                       # typed configs (and their command-line flags),
     "files", "readers", "progress",          # atomic writes, checked reads, progress lines,
     "http_guard",                            # what local HTTP servers accept from browsers,
     "user_code"),                            # user functions a config names (file.py:fn)
    ("quant",),                               # the 4-bit format, Linear4bit, 8-bit AdamW
    ("models", "data"),                       # base models (4-bit ones too), data sets
    ("adapters",),                            # methods, injection, the PEFT format
    ("train", "eval", "export", "serve", "plan"),
    ("recipes", "demo",                       # jobs and experiments built from the above,
     "federated",                             # Flower server/client apps over train's steps,
     "ui"),                                   # the dashboard over their run folders
    ("cli", "__main__"),
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}

Edges = dict[tuple[str, str], list[str]]  # (from, to) -> ["path:line", ...]


def package_of(module: str) -> str | None:
    """`loratune.adapters.io` -> `adapters`; `loratune` itself -> None."""
    parts = module.split(".")
    if parts[0] != "loratune" or len(parts) == 1:
        return None
    return parts[1]


def module_name(path: Path, src: Path = SRC) -> str:
    """src/loratune/adapters/io.py -> `loratune.adapters.io` (`src` is the loratune folder)."""
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The loratune modules one import statement names (`from loratune import data` names
    `loratune.data`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against the importing module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target == "loratune":
        return [f"loratune.{a.name}" for a in node.names]
    return [target]


def collect_edges(src: Path = SRC) -> Edges:
    edges: Edges = defaultdict(list)
    for path in sorted(src.rglob("*.py")):
        module = module_name(path, src)
        here = package_of(module)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for target in imported_modules(node, module, path.name == "__init__.py"):
                there = package_of(target)
                if here and there and there != here:
                    edges[(here, there)].append(f"{path.relative_to(src.parents[1])}:{node.lineno}")
    return dict(edges)


def private_imports(src: Path = SRC) -> list[str]:
    """`path:line module._name` for each `from loratune.<pkg>... import _name` in another
    package: a name another package needs is an interface, so it gets a public name (or the
    code moves to where it is used)."""
    found = []
    for path in sorted(src.rglob("*.py")):
        module = module_name(path, src)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets = imported_modules(node, module, path.name == "__init__.py")
            if not isinstance(node, ast.ImportFrom) or package_of(targets[0]) in (
                    None, package_of(module)):
                continue
            found += [f"{path.relative_to(src.parents[1])}:{node.lineno} {targets[0]}.{a.name}"
                      for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def unplaced(edges: Edges) -> list[str]:
    return sorted({p for edge in edges for p in edge if p not in RANK})


def upward(edges: Edges) -> Edges:
    return {(a, b): where for (a, b), where in edges.items()
            if a in RANK and b in RANK and RANK[b] > RANK[a]}


def cycles(edges: Edges) -> list[list[str]]:
    """Strongly connected groups of two or more packages (Tarjan); each holds a cycle."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph[b]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def report(edges: Edges, private: list[str] = ()) -> str:
    lines = ["edges (from -> to: import statements):"]
    for (a, b), where in sorted(edges.items()):
        lines.append(f"  {a} -> {b}: {len(where)}")
    up = upward(edges)
    lines.append("upward imports:")
    for (a, b), where in sorted(up.items()):
        lines.append(f"  {a} -> {b}: {', '.join(where)}")
    groups = cycles(edges)
    lines.append("cycles (packages that reach each other):")
    for group in groups:
        inside = [f"{a}->{b}" for (a, b) in sorted(edges) if a in group and b in group]
        lines.append(f"  {' <-> '.join(group)} ({', '.join(inside)})")
    lines.append("private names imported from another package:")
    lines += [f"  {where}" for where in private]
    missing = unplaced(edges)
    if missing:
        lines.append(f"not placed in LAYERS: {', '.join(missing)}")
    lines.append(f"{len(edges)} package edges ({sum(map(len, edges.values()))} import "
                 f"statements); {len(up)} upward ({sum(map(len, up.values()))} statements); "
                 f"{len(groups)} cycles; {len(private)} private names imported across packages")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on an upward import, a cycle, an unplaced package or a "
                    "private name imported across packages")
    args = ap.parse_args()
    edges = collect_edges()
    private = private_imports()
    print(report(edges, private))
    bad = upward(edges) or cycles(edges) or unplaced(edges) or private
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
