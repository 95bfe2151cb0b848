#!/usr/bin/env python3
"""Vision-language SFT step speed and memory: loratune vs TRL's SFTTrainer, same model, same
batch, one run.

The model is the bundled tiny-vlm (Qwen2.5-VL's architecture at a tiny size, fp32; no real
vision-language model installs from a package registry here) or `--model FOLDER` (a local
Qwen2.5-VL folder). LoRA r=16 alpha=32 on the language model's linear layers (the same regex for
both: models/vision.VisionFamily.language_targets), AdamW at 1e-4 without weight decay. The
batch is the first `--batch` conversations of examples/vision/train.jsonl (one 56x56 image
each). loratune encodes them with the family's image encoder and its loop's collator and loss
(answer-only labels); TRL with its own DataCollatorForVisionLanguageModeling over the
transformers processor and SFTTrainer.compute_loss (TRL labels every non-pad token of a vision
batch: same forward and backward, more labelled tokens). A step is the forward, backward and
optimizer step; each side runs in its own process, so its peak RSS is its own.

TRL needs a transformers processor (ProcessorMixin). Qwen2_5_VLProcessor insists on a video
processor, which needs torchvision, not installed here; so the TRL side builds the same
processor class without its video processor (images only; both sides then tokenize and resize
alike). If that fails, the script says why and reports loratune alone.

    python benchmarks/vlm_speed.py            # batch 4, 5 measured steps
    python benchmarks/vlm_speed.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from process_memory import peak_rss_gib, rss_now_gib

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "vision" / "train.jsonl"
LR = 1e-4


@dataclass
class Result:
    name: str
    s_per_step: float
    rows_per_s: float
    peak_rss_gib: float
    rss_after_load_gib: float
    steps: int
    tokens: int          # input tokens of the batch (padded)
    loss: float          # the last step's


def records(n: int):
    from loratune.config import DataConfig
    from loratune.data.dataset import read_image_conversations

    return read_image_conversations(DATA, DataConfig(train=str(DATA)))[:n]


def setup_loratune(model, tok, items):
    from loratune.adapters import add_adapter
    from loratune.config import LoraConfig, TrainConfig
    from loratune.data.packing import collate_images
    from loratune.train.loss import causal_lm_loss
    from loratune.train.optim import build_optimizer

    family = tok.image_encoder.family
    add_adapter(model, LoraConfig(r=16, lora_alpha=32, target_modules=family.language_targets()))
    opt = build_optimizer(model, TrainConfig(lr=LR, weight_decay=0.0))
    examples = [tok.image_encoder(tok, messages, images, max_length=4096)
                for _, messages, images in items]
    batch = collate_images([[e] for e in examples], tok.pad_token_id)
    model.train()

    def step() -> float:
        total, n = causal_lm_loss(model, batch)
        loss = total / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, batch["input_ids"].numel()


def image_only_processor(folder: Path):
    """Qwen2_5_VLProcessor without a video processor (which would need torchvision)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnly(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **_):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    images = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return ImageOnly(images, tok, chat_template=tok.chat_template)


def trl_rows(items):
    """TRL's vision layout: text parts as {"type": "text"}, images in an `images` column."""
    def parts(content):
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        return [p if p["type"] == "image" else {"type": "text", "text": p["text"]}
                for p in content]

    return [{"messages": [dict(m, content=parts(m["content"])) for m in messages],
             "images": images} for _, messages, images in items]


def setup_trl(model, tok, items, folder: Path, tmp: str):
    import datasets
    import peft
    from trl import SFTConfig, SFTTrainer

    processor = image_only_processor(folder)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                          target_modules=tok.image_encoder.family.language_targets())
    model = peft.get_peft_model(model, cfg)
    rows = trl_rows(items)
    dataset = datasets.Dataset.from_list(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, processing_class=processor, train_dataset=dataset,
                             args=SFTConfig(output_dir=tmp, report_to="none", use_cpu=True,
                                            bf16=False, per_device_train_batch_size=len(rows),
                                            max_length=None))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                            weight_decay=0.0)
    model.train()

    def step() -> float:
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, batch["input_ids"].numel()


def run_worker(args) -> Result:
    import tempfile

    from loratune.models import load_model
    from loratune.models.load import resolve_model

    model, tok = load_model(args.model)
    loaded = rss_now_gib()
    items = records(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker == "trl":
            step, tokens = setup_trl(model, tok, items, resolve_model(args.model)[0], tmp)
        else:
            step, tokens = setup_loratune(model, tok, items)
        last = step()  # warm-up, not timed
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            last = step()
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    return Result(args.worker, dt, len(items) / dt, peak_rss_gib(), loaded, args.steps, tokens,
                  last)


def spawn(worker: str, args) -> Result | str:
    """The worker's result, or why it failed (its stderr's last lines)."""
    cmd = [sys.executable, __file__, "--worker", worker, "--batch", str(args.batch), "--steps",
           str(args.steps), "--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return "\n".join(proc.stderr.strip().splitlines()[-6:])
    return Result(**json.loads(proc.stdout.strip().splitlines()[-1]))


def report(results: list[Result]) -> None:
    base = next((r for r in results if r.name == "trl"), results[0])
    print(f"{'config':<10}{'s/step':>9}{'rows/s':>8}{'peak GiB':>10}{'load GiB':>10}"
          f"{'tokens':>8}{'time x':>8}{'RSS x':>7}{'loss':>9}")
    for r in results:
        print(f"{r.name:<10}{r.s_per_step:>9.3f}{r.rows_per_s:>8.2f}{r.peak_rss_gib:>10.3f}"
              f"{r.rss_after_load_gib:>10.3f}{r.tokens:>8}{r.s_per_step / base.s_per_step:>8.2f}"
              f"{r.peak_rss_gib / base.peak_rss_gib:>7.2f}{r.loss:>9.4f}")
    print("time x, RSS x: against TRL (below 1: loratune faster / smaller). loss: the last "
          "step's; the two label different tokens (loratune the answers, TRL every non-pad "
          "token), so losses are not comparable.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny-vlm", help="tiny-vlm or a local Qwen2.5-VL folder")
    p.add_argument("--batch", type=int, default=4, help="conversations per step")
    p.add_argument("--steps", type=int, default=5, help="measured steps after one warm-up")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rows, 1 step")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(asdict(run_worker(args))))
        return
    if args.quick:
        args.batch, args.steps = 2, 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model} "
          f"fp32; LoRA r=16 alpha=32 on the language model; {args.batch} conversations per step")
    results = []
    for worker in ("trl", "loratune"):
        out = spawn(worker, args)
        if isinstance(out, str):
            print(f"{worker}: could not run here:\n{out}")
        else:
            results.append(out)
    if results:
        report(results)


if __name__ == "__main__":
    main()
