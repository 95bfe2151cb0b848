"""Split one data.train file across simulated clients (federated.partition), one JSONL file
per client, so each client trains on its own file as a real one would.

Every split is a pure function of (records, clients, seed); each client's records keep the
file's order, so one client holding everything trains on exactly the plain run's file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from loratune.data.formats import read_records
from loratune.files import write_atomic_file


class PartitionError(ValueError):
    """A partition that cannot give every client data; the message says what to change."""


def iid(n: int, clients: int, seed: int) -> list[list[int]]:
    """Shuffled, then cut into `clients` near-equal shares."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::clients]) for i in range(clients)]


def by_column(records: list[dict], column: str, clients: int) -> list[list[int]]:
    """Whole groups of one column's values per client: the sorted values dealt round-robin."""
    values = []
    for i, record in enumerate(records):
        if column not in record:
            raise PartitionError(f"federated.partition column:{column}: record {i} has no "
                                 f"'{column}' field (it has {', '.join(sorted(record))})")
        values.append(str(record[column]))
    distinct = sorted(set(values))
    if len(distinct) < clients:
        raise PartitionError(f"federated.partition column:{column}: {len(distinct)} distinct "
                             f"values ({', '.join(distinct)}) for {clients} clients; expected "
                             "at least one value per client")
    owner = {v: k % clients for k, v in enumerate(distinct)}
    return [[i for i, v in enumerate(values) if owner[v] == c] for c in range(clients)]


def dirichlet_shares(clients: int, alpha: float, rng: random.Random) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(clients)]
    total = sum(draws) or 1.0
    return [d / total for d in draws]


def cut_by_shares(indices: list[int], shares: list[float]) -> list[list[int]]:
    """Consecutive pieces of `indices` sized by `shares` (the remainders rounded in turn)."""
    bounds, acc = [0], 0.0
    for share in shares:
        acc += share
        bounds.append(round(acc * len(indices)))
    bounds[-1] = len(indices)
    return [indices[a:b] for a, b in zip(bounds, bounds[1:])]


def dirichlet(records: list[dict], clients: int, alpha: float, seed: int,
              column: str | None = None) -> list[list[int]]:
    """Non-IID: client sizes ~ Dir(alpha); with a column, each value's records split by its own
    Dir(alpha) draw (label skew). Small alpha: very unequal clients."""
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        key = str(record.get(column)) if column else ""
        groups.setdefault(key, []).append(i)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for key in sorted(groups):
        members = groups[key][:]
        rng.shuffle(members)
        for c, piece in enumerate(cut_by_shares(members, dirichlet_shares(clients, alpha, rng))):
            parts[c].extend(piece)
    return [sorted(p) for p in parts]


def split(records: list[dict], spec: str, clients: int, seed: int) -> list[list[int]]:
    """Each client's record indices for federated.partition `spec`."""
    kind, _, rest = spec.partition(":")
    if kind == "iid":
        parts = iid(len(records), clients, seed)
    elif kind == "column":
        parts = by_column(records, rest, clients)
    else:
        alpha, _, column = rest.partition(":")
        parts = dirichlet(records, clients, float(alpha), seed, column or None)
    empty = [c for c, p in enumerate(parts) if not p]
    if empty:
        raise PartitionError(f"federated.partition {spec}: client {empty[0]} gets no records "
                             f"of {len(records)} ({len(empty)} empty); use fewer clients, a "
                             "larger Dirichlet alpha or another seed")
    return parts


def write_partitions(source: str | Path, spec: str, clients: int, seed: int,
                     out: Path) -> list[Path]:
    """out/client-<k>/train.jsonl for every client (atomic writes); their paths."""
    records = read_records(source)
    paths = []
    for c, part in enumerate(split(records, spec, clients, seed)):
        path = out / f"client-{c}" / "train.jsonl"
        text = "".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in part)
        write_atomic_file(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"),
                          overwrite=True)
        paths.append(path)
    return paths
