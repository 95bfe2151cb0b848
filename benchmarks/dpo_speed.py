#!/usr/bin/env python3
"""DPO step speed and memory: loratune vs TRL's DPOTrainer, same model, same batch, one run.

SmolLM2-135M-Instruct in fp32, LoRA r=16 alpha=32 on every linear layer, beta 0.1, AdamW. The
batch is the first `--batch` pairs of the bundled demo pairs, tokenized once by loratune and
handed to TRL's own collator as ids, so both score the same tokens. A step is the policy
forward on chosen + rejected rows, the reference forward, backward and the optimizer step; the
reference is the same model with the adapter disabled in both (TRL: PEFT's `disable_adapter`),
so its memory is inside each process's peak RSS. `loratune+cached` reads reference log-probs
computed once before the steps (train.preference.reference: cached), the cost of computing them
reported apart. Each configuration runs in its own process, so its peak RSS is its own.

    python benchmarks/dpo_speed.py            # batch 8 pairs, 5 measured steps
    python benchmarks/dpo_speed.py --quick    # smoke run

Prints s/step (median), pairs/s, peak RSS and RSS after loading, ratios against TRL, and the
last step's loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from process_memory import peak_rss_gib, rss_now_gib, worker_result

MODEL = "smollm2-135m-instruct"
BETA = 0.1
LR = 1e-4


@dataclass
class Result:
    name: str
    s_per_step: float
    pairs_per_s: float
    peak_rss_gib: float
    rss_after_load_gib: float
    steps: int
    loss: float  # the last step's loss (close across configurations, see main())
    setup_s: float = 0.0  # one-off work before the steps (the cached reference)


def pairs(tok, n: int):
    from loratune.config import DataConfig
    from loratune.data.bundled import bundled_path
    from loratune.data.preference_pairs import build_preference_examples

    examples, _ = build_preference_examples(bundled_path("demo-pairs"), tok,
                                            DataConfig(max_length=256), "pairs")
    return examples[:n]


def setup_loratune(model, tok, examples, cached: bool):
    from loratune.adapters import add_adapter
    from loratune.config import LoraConfig, TrainConfig
    from loratune.data.preference_pairs import collate_pairs
    from loratune.train.optim import build_optimizer
    from loratune.train.preference_loss import PreferenceLoss, Reference
    from loratune.train.reference_cache import attach_reference, compute_reference

    add_adapter(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    cfg = TrainConfig(objective="dpo", lr=LR, preference={"beta": BETA})
    objective = PreferenceLoss(cfg, Reference())
    opt = build_optimizer(model, cfg)
    setup_s = 0.0
    if cached:
        t0 = time.perf_counter()
        attach_reference(examples, compute_reference(model, Reference(), examples,
                                                     tok.pad_token_id, len(examples),
                                                     torch.device("cpu")))
        setup_s = time.perf_counter() - t0
    batch = collate_pairs(examples, tok.pad_token_id)
    model.train()

    def step() -> float:
        total, n = objective(model, batch)
        loss = total / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, setup_s


def setup_trl(model, tok, examples, tmp: str):
    import datasets
    import peft
    from trl import DPOConfig, DPOTrainer

    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    dummy = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, processing_class=tok, train_dataset=dummy,
                             args=DPOConfig(output_dir=tmp, report_to="none", use_cpu=True,
                                            bf16=False, beta=BETA, loss_type=["sigmoid"],
                                            per_device_train_batch_size=len(examples)))
    inputs = trainer.data_collator([{"prompt_ids": e.prompt, "chosen_ids": e.chosen,
                                     "rejected_ids": e.rejected} for e in examples])
    # as loratune's AdamW: no weight decay (torch's default is 0.01)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                            weight_decay=0.0)
    model.train()

    def step() -> float:
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, 0.0


def run_worker(args) -> Result:
    import tempfile

    from loratune.models import load_model

    model, tok = load_model(MODEL)
    loaded = rss_now_gib()
    examples = pairs(tok, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker == "trl":
            step, setup_s = setup_trl(model, tok, examples, tmp)
        else:
            step, setup_s = setup_loratune(model, tok, examples, args.worker.endswith("cached"))
        last = step()  # warm-up, not timed
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            last = step()
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    return Result(args.worker, dt, len(examples) / dt, peak_rss_gib(), loaded, args.steps,
                  last, setup_s)


def spawn(worker: str, args) -> Result:
    cmd = [sys.executable, __file__, "--worker", worker, "--batch", str(args.batch), "--steps",
           str(args.steps)]
    return Result(**worker_result(cmd, worker))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    p.add_argument("--steps", type=int, default=5, help="measured steps after one warm-up")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 pairs, 1 step")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(asdict(run_worker(args))))
        return
    if args.quick:
        args.batch, args.steps = 2, 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {MODEL} fp32; "
          f"LoRA r=16 alpha=32 all-linear; DPO beta {BETA}; {args.batch} pairs per step")
    results = [spawn(w, args) for w in ("trl", "loratune", "loratune+cached")]
    base = results[0]
    print(f"{'config':<18}{'s/step':>9}{'pairs/s':>9}{'peak GiB':>10}{'load GiB':>10}"
          f"{'time x':>8}{'RSS x':>7}{'loss':>10}{'setup s':>9}")
    for r in results:
        print(f"{r.name:<18}{r.s_per_step:>9.3f}{r.pairs_per_s:>9.2f}{r.peak_rss_gib:>10.2f}"
              f"{r.rss_after_load_gib:>10.2f}{r.s_per_step / base.s_per_step:>8.2f}"
              f"{r.peak_rss_gib / base.peak_rss_gib:>7.2f}{r.loss:>10.5f}{r.setup_s:>9.2f}")
    print("time x, RSS x: against TRL (below 1: loratune faster / smaller). loss: the last "
          "step's; each side draws its own random LoRA A (B = 0: the first loss is log 2 in "
          "both), so later losses are close, not equal (tests/train/test_preference_trl.py "
          "checks equality on shared weights).")


if __name__ == "__main__":
    main()
