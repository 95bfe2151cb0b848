"""Mixtures: `data.train` as a list of sources, each with a sampling weight or a number of
epochs, and `data.eval` as a list scored source by source.

A mixture is drawn once per run from `train.seed` (so a resumed run, which rebuilds it from the
same seed, sees the same examples in the same order as the run it continues):
- weights: as many draws as all sources hold examples; each draw picks a source with probability
  weight / sum of weights (as `datasets.interleave_datasets`' probabilities), then that source's
  next example in a seeded order, reshuffled each time the source runs out;
- epochs: each source `epochs` times over (a fraction: a seeded share of a further pass).
The counts realised per source are what the run logs (metrics.jsonl and run_summary.json), since
sampling by weight gives shares near, not equal to, the weights.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import fields

from loratune.config import DataConfig, DataSource
from loratune.data.dataset import DataStats, build_examples

# What data.train / data.eval name: one path (or glob, folder, Hub id) or a list of sources.
DataSpec = str | list[DataSource]


def is_mixture(spec: DataSpec | None) -> bool:
    return isinstance(spec, list)


def as_sources(spec: DataSpec) -> list[DataSource]:
    """The sources of `spec`: a plain path is one source."""
    return spec if is_mixture(spec) else [DataSource(path=spec)]


def _cycled(n_items: int, n_draws: int, rng: random.Random) -> list[int]:
    """`n_draws` indices into n_items: whole seeded passes, then a seeded part of one more."""
    order: list[int] = []
    while len(order) < n_draws:
        one_pass = list(range(n_items))
        rng.shuffle(one_pass)
        order.extend(one_pass)
    return order[:n_draws]


def draw_counts(sizes: Sequence[int], sources: Sequence[DataSource],
                rng: random.Random) -> list[int]:
    """Examples taken from each source: sampled by weight, or epochs x its size."""
    if sources[0].weight is not None:
        picks = rng.choices(range(len(sources)), weights=[s.weight for s in sources],
                            k=sum(sizes))
        return [picks.count(i) for i in range(len(sources))]
    return [round((s.epochs or 1.0) * n) for s, n in zip(sources, sizes)]


def mix(per_source: Sequence[Sequence], sources: Sequence[DataSource],
        seed: int) -> tuple[list, list[int]]:
    """(the mixture's items, how many came from each source), seeded by `seed`."""
    rng = random.Random(f"mixture-{seed}")
    counts = draw_counts([len(items) for items in per_source], sources, rng)
    taken = [[items[i] for i in _cycled(len(items), n, rng)]
             for items, n in zip(per_source, counts)]
    if sources[0].weight is None:
        return [x for part in taken for x in part], counts
    # interleave in draw order, so the mixture reads as sampled (the epoch shuffles it anyway)
    turn = [i for i, n in enumerate(counts) for _ in range(n)]
    rng.shuffle(turn)
    nexts = [iter(part) for part in taken]
    return [next(nexts[i]) for i in turn], counts


def read_sources(spec: DataSpec, seed: int, read: Callable[[str], list],
                 size_of: Callable[[object], int] = len) -> tuple[list, dict | None]:
    """The items `read(path)` gives for `spec`: one path's, or (for a list of sources) the
    mixture drawn from every source's, with its record (else None); `size_of`: an item's
    tokens, for the record's token shares."""
    if not is_mixture(spec):
        return read(spec), None
    per_source = [read(s.path) for s in spec]
    items, counts = mix(per_source, spec, seed)
    return items, mixture_record(spec, per_source, counts, seed, size_of)


def mixture_record(sources: Sequence[DataSource], per_source: Sequence[Sequence],
                   counts: Sequence[int], seed: int,
                   size_of: Callable[[object], int] = len) -> dict:
    """What the run logs: per source its examples available and taken, the share of examples
    and of tokens realised, and the weight (normalised) or epochs asked for."""
    total = sum(counts) or 1
    total_weight = sum(s.weight or 0.0 for s in sources)
    tokens = [n * _mean(items, size_of) for items, n in zip(per_source, counts)]
    all_tokens = sum(tokens) or 1.0
    out = {}
    for s, items, n, tok in zip(sources, per_source, counts, tokens):
        asked = ({"weight": round(s.weight / total_weight, 6)} if s.weight is not None
                 else {"epochs": s.epochs or 1.0})
        out[s.label] = {"path": s.path, **asked, "available": len(items), "examples": n,
                        "share": round(n / total, 6), "token_share": round(tok / all_tokens, 6)}
    return {"seed": seed, "sources": out}


def _mean(items: Sequence, size_of: Callable[[object], int]) -> float:
    return sum(size_of(x) for x in items) / len(items) if items else 0.0


def merged_stats(parts: Sequence[DataStats]) -> DataStats:
    """One DataStats for several sources: counts added, formats and reasons joined."""
    out = DataStats()
    for part in parts:
        for f in fields(DataStats):
            mine, theirs = getattr(out, f.name), getattr(part, f.name)
            if isinstance(theirs, int):
                setattr(out, f.name, mine + theirs)
            elif isinstance(theirs, dict):
                for key, n in theirs.items():
                    mine[key] = mine.get(key, 0) + n
    formats = sorted({p.format for p in parts})
    out.format = formats[0] if len(formats) == 1 else f"mixed: {', '.join(formats)}"
    out.template_note = parts[0].template_note
    return out


def build_mixture(sources: Sequence[DataSource], tokenizer, cfg: DataConfig,
                  seed: int) -> tuple[list, DataStats, dict]:
    """(the mixture's examples, counts over its sources, the record of its realised shares)."""
    built = [build_examples(s.path, tokenizer, cfg) for s in sources]
    per_source = [examples for examples, _ in built]
    examples, counts = mix(per_source, sources, seed)
    stats = merged_stats([stats for _, stats in built])
    stats.n_examples = len(examples)
    return examples, stats, mixture_record(sources, per_source, counts, seed)


def build_held_out(sources: Sequence[DataSource], tokenizer, cfg: DataConfig) -> dict[str, list]:
    """Each held-out source's examples, under its name."""
    return {s.label: build_examples(s.path, tokenizer, cfg)[0] for s in sources}


def mixture_line(record: dict) -> str:
    """e.g. 'mixture (seed 0): code 702 examples = 70.2% (weight 0.7; 81.0% of tokens), ...'."""
    parts = []
    for label, s in record["sources"].items():
        asked = f"weight {s['weight']}" if "weight" in s else f"epochs {s['epochs']}"
        parts.append(f"{label} {s['examples']} examples = {s['share']:.1%} ({asked}; "
                     f"{s['token_share']:.1%} of tokens)")
    return f"mixture (seed {record['seed']}): " + ", ".join(parts)
