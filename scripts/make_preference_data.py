#!/usr/bin/env python3
"""Generate the bundled preference pairs of the demo task (`data.train: demo-pairs`).

Each SFT demo item (scripts/make_demo_data.py) becomes a pair with the same prompt: the right
command is chosen, a near miss is rejected — the kind of slip a model that learned the format
still makes: a neighbouring day, a time or a temperature off by a little, a timer with its
digits swapped, lights switched the wrong way, another room or city.

    "Turn the kitchen lights off"  chosen: lights(room=kitchen, state=off)
                                   rejected: lights(room=kitchen, state=on)

Training pairs come from the SFT training items, held-out pairs from the SFT held-out items
(slot combinations training never shows), so held-out preference accuracy measures whether the
model tells right from nearly right on requests it has not seen.

    python scripts/make_preference_data.py [OUT_DIR]      (default: src/loratune/demo/data)
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

SEED = 20261127
N_TRAIN = 600  # pairs drawn from the 1200 SFT training items (half English, half Chinese)
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
CITIES = ["paris", "london", "tokyo", "beijing", "shanghai", "berlin", "madrid", "rome",
          "sydney", "seoul"]
ROOMS = ["kitchen", "bedroom", "living_room", "bathroom", "office", "garage", "hallway",
         "balcony"]


def parse(command: str) -> tuple[str, dict[str, str]]:
    m = re.fullmatch(r"(\w+)\((.*)\)", command)
    slots = dict(part.split("=", 1) for part in m.group(2).split(", "))
    return m.group(1), slots


def unparse(intent: str, slots: dict[str, str]) -> str:
    return f"{intent}(" + ", ".join(f"{k}={v}" for k, v in slots.items()) + ")"


def _neighbour(values: list[str], value: str, rng: random.Random) -> str:
    i = values.index(value) if value in values else 0
    return values[(i + rng.choice([-1, 1])) % len(values)]


def _shift_time(value: str, rng: random.Random) -> str:
    h, m = map(int, value.split(":"))
    minutes = h * 60 + m + rng.choice([-60, -15, 15, 60])
    return f"{minutes // 60 % 24:02d}:{minutes % 60:02d}"


def near_miss(command: str, rng: random.Random) -> str:
    """The command with one slot slightly wrong."""
    intent, slots = parse(command)
    wrong = dict(slots)
    key = rng.choice(list(slots))
    value = slots[key]
    if key == "day":
        wrong[key] = _neighbour(DAYS, value, rng) if value in DAYS else \
            rng.choice(["today", "tomorrow"] if value not in ("today", "tomorrow") else DAYS)
        if wrong[key] == value:
            wrong[key] = "tomorrow" if value == "today" else "today"
    elif key == "time":
        wrong[key] = _shift_time(value, rng)
    elif key == "minutes":
        swapped = value[::-1].lstrip("0")
        wrong[key] = swapped if swapped and swapped != value else str(int(value) + rng.choice(
            [-5, -1, 1, 5]))
    elif key == "temp":
        wrong[key] = str(int(value) + rng.choice([-2, -1, 1, 2]))
    elif key == "state":
        wrong[key] = "off" if value == "on" else "on"
    elif key == "room":
        wrong[key] = rng.choice([r for r in ROOMS if r != value])
    elif key == "city":
        wrong[key] = rng.choice([c for c in CITIES if c != value])
    out = unparse(intent, wrong)
    assert out != command, command
    return out


def pair(item: dict, rng: random.Random) -> dict:
    prompt = f"{item['instruction']}\n\n{item['input']}"  # as the alpaca format renders it
    return {"prompt": prompt, "chosen": item["output"], "rejected": near_miss(item["output"], rng),
            "lang": item["lang"]}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                     .encode("utf-8"))


def build(sft_dir: Path, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train_items = read_jsonl(sft_dir / "train.jsonl")
    held_items = read_jsonl(sft_dir / "heldout.jsonl")
    by_lang = {lang: [x for x in train_items if x["lang"] == lang] for lang in ("en", "zh")}
    chosen = [x for lang in by_lang for x in rng.sample(by_lang[lang], N_TRAIN // 2)]
    rng.shuffle(chosen)
    return [pair(x, rng) for x in chosen], [pair(x, rng) for x in held_items]


def main(out_dir: str | Path | None = None) -> None:
    default = Path(__file__).resolve().parents[1] / "src/loratune/demo/data"
    out = Path(out_dir) if out_dir else default
    out.mkdir(parents=True, exist_ok=True)
    train, held = build(default)
    write_jsonl(out / "pairs_train.jsonl", train)
    write_jsonl(out / "pairs_heldout.jsonl", held)
    print(f"wrote {len(train)} training and {len(held)} held-out pairs to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
