#!/usr/bin/env python3
"""Multiple-choice scoring speed: the KV cache reused (loratune) against one forward per option.

On the embedded SmolLM2-135M-Instruct (or --model), the bundled MMLU-layout sample
(eval/samples/mc, 14 questions, 4 options) scored with `--shots` solved examples per subject:
(a) `eval.loglik.score_items` as `eval --task mc` runs it: the subject's header and shots once,
    then groups of questions (batch-size / 4 at a time) on copies of that cache, and all their
    options together on the questions' caches;
(b) the same items as context + option rows, batched, no cache (what a harness without cache
    reuse does: the shots and question are recomputed for every option).
Both give the same log-likelihoods (checked here to 1e-3); the figure is items/s of each.

    python benchmarks/eval_mc.py             # 3 shots, 3 repeats
    python benchmarks/eval_mc.py --quick     # 1 shot, 1 repeat
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.shots, args.repeat = 1, 1
    torch.set_num_threads(max(1, torch.get_num_threads()))

    import loratune.eval
    from loratune.config.commands import EvalCommandConfig
    from loratune.eval.tasks import mc
    from loratune.models import load_model

    samples = Path(loratune.eval.__file__).parent / "samples" / "mc"
    cfg = EvalCommandConfig(task="mc", data=str(samples / "test"), dev=str(samples / "dev"),
                            shots=args.shots, batch_size=args.batch_size)
    model, tok = load_model(args.model)
    data = mc.read(cfg)
    n = len(data.items)
    figures, rows = {}, {}
    original = mc.score_items
    for label, reuse in [("cached (loratune)", True), ("one forward per option", False)]:
        mc.score_items = lambda *a, **kw: original(*a, **{**kw, "reuse_cache": reuse})
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = mc.score(model, tok, data, cfg)
            times.append(time.perf_counter() - start)
        figures[label] = n / min(times)
        acc = result.metrics["acc"]
        rows[label] = [x for r in result.rows for x in r["logprobs"]]
    mc.score_items = original
    a, b = rows.values()
    gap = max(abs(x - y) for x, y in zip(a, b))
    print(f"model {args.model}, {n} questions x 4 options, {args.shots} shots, "
          f"{torch.get_num_threads()} threads, best of {args.repeat}; acc {acc:.1%}")
    for label, ips in figures.items():
        print(f"  {label:24s} {ips:7.2f} items/s")
    cached, plain = figures.values()
    print(f"  cached / plain: {cached / plain:.2f}x; max |log-likelihood difference| {gap:.2e}")
    assert gap < 1e-3, "the two paths disagree"


if __name__ == "__main__":
    main()
