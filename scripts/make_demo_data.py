#!/usr/bin/env python3
"""Generate the bundled demo task: English and Chinese assistant requests -> command strings.

The base model cannot know this output convention, but the mapping is regular, so LoRA learns
it in minutes. Held-out items use (intent, slot) combinations whose command never appears in
training, so the score measures generalization, not recall.

    python scripts/make_demo_data.py [OUT_DIR]      (default: src/loratune/demo/data)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

INSTRUCTION = "Convert the request into a command."
SEED = 20261122
N_TRAIN = 1200
N_HELDOUT_PER_INTENT_LANG = 10

DAYS = {"mon": ("Monday", "周一"), "tue": ("Tuesday", "周二"), "wed": ("Wednesday", "周三"),
        "thu": ("Thursday", "周四"), "fri": ("Friday", "周五"), "sat": ("Saturday", "周六"),
        "sun": ("Sunday", "周日")}
CITIES = {"paris": ("Paris", "巴黎"), "london": ("London", "伦敦"), "tokyo": ("Tokyo", "东京"),
          "beijing": ("Beijing", "北京"), "shanghai": ("Shanghai", "上海"),
          "berlin": ("Berlin", "柏林"), "madrid": ("Madrid", "马德里"), "rome": ("Rome", "罗马"),
          "sydney": ("Sydney", "悉尼"), "seoul": ("Seoul", "首尔")}
WHEN = {"today": ("today", "今天"), "tomorrow": ("tomorrow", "明天")}
ROOMS = {"kitchen": ("kitchen", "厨房"), "bedroom": ("bedroom", "卧室"),
         "living_room": ("living room", "客厅"), "bathroom": ("bathroom", "浴室"),
         "office": ("office", "书房"), "garage": ("garage", "车库")}
STATES = {"on": ("on", "打开", "开"), "off": ("off", "关掉", "关")}

TEMPLATES = {
    "timer": {
        "en": ["Start a {n} minute timer", "Set a timer for {n} minutes",
               "Count down {n} minutes for me", "Timer, {n} minutes please"],
        "zh": ["设一个{n}分钟的计时器", "倒计时{n}分钟", "帮我计时{n}分钟", "开始{n}分钟倒计时"],
    },
    "alarm": {
        "en": ["Set an alarm for {day} at {time}", "Wake me up at {time} on {day}",
               "Alarm on {day}, {time}", "I need an alarm at {time} next {day}"],
        "zh": ["{day}早上{time}叫我起床", "设一个{day}{time}的闹钟", "{day}{time}提醒我起床",
               "帮我定{day}{time}的闹钟"],
    },
    "weather": {
        "en": ["What's the weather in {city} {when}?", "Will it rain in {city} {when}?",
               "{city} weather {when}", "How hot is it in {city} {when}?"],
        "zh": ["{when}{city}天气怎么样？", "{city}{when}会下雨吗？", "查一下{city}{when}的天气",
               "{when}{city}热不热？"],
    },
    "lights": {
        "en": ["Turn {state} the {room} lights", "Switch the lights in the {room} {state}",
               "{room} lights {state}", "Please turn the {room} light {state}"],
        "zh": ["把{room}的灯{verb}", "{verb}{room}的灯", "{room}灯{short}", "请{verb}{room}的灯"],
    },
}


def slot_combos() -> dict[str, list[dict]]:
    times = [f"{h:02d}:{m:02d}" for h in range(5, 12) for m in (0, 15, 30, 45)]
    return {
        "timer": [{"minutes": n} for n in range(1, 121)],
        "alarm": [{"day": d, "time": t} for d in DAYS for t in times],
        "weather": [{"city": c, "day": w} for c in CITIES for w in WHEN],
        "lights": [{"room": r, "state": s} for r in ROOMS for s in STATES],
    }


def command(intent: str, slots: dict) -> str:
    return f"{intent}(" + ", ".join(f"{k}={v}" for k, v in slots.items()) + ")"


def render(intent: str, slots: dict, lang: str, rng: random.Random) -> str:
    li = 0 if lang == "en" else 1
    template = rng.choice(TEMPLATES[intent][lang])
    if intent == "timer":
        return template.format(n=slots["minutes"])
    if intent == "alarm":
        time = slots["time"].lstrip("0") if lang == "en" else slots["time"]
        return template.format(day=DAYS[slots["day"]][li], time=time)
    if intent == "weather":
        return template.format(city=CITIES[slots["city"]][li], when=WHEN[slots["day"]][li])
    state = STATES[slots["state"]]
    return template.format(room=ROOMS[slots["room"]][li], state=state[0], verb=state[1],
                           short=state[2])


def split_combos(rng: random.Random) -> tuple[dict, dict]:
    """Hold out some combinations per intent, keeping every categorical value in training."""
    train, held = {}, {}
    for intent, combos in slot_combos().items():
        combos = combos[:]
        rng.shuffle(combos)
        k = max(4, len(combos) // 10)
        held[intent], train[intent] = combos[:k], combos[k:]
    return train, held


def record(intent: str, slots: dict, lang: str, rng: random.Random) -> dict:
    return {"instruction": INSTRUCTION, "input": render(intent, slots, lang, rng),
            "output": command(intent, slots), "lang": lang}


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train_combos, held_combos = split_combos(rng)
    heldout = []
    for intent, combos in held_combos.items():
        for lang in ("en", "zh"):
            picks = rng.sample(combos, min(N_HELDOUT_PER_INTENT_LANG, len(combos)))
            heldout += [record(intent, s, lang, rng) for s in picks]
    rng.shuffle(heldout)
    train, seen = [], set()
    intents = list(train_combos)
    while len(train) < N_TRAIN:
        intent = rng.choice(intents)
        item = record(intent, rng.choice(train_combos[intent]), rng.choice(("en", "zh")), rng)
        if item["input"] not in seen:
            seen.add(item["input"])
            train.append(item)
    return train, heldout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def main(out_dir: str | Path | None = None) -> None:
    out = Path(out_dir) if out_dir else Path(__file__).resolve().parents[1] / "src/loratune/demo/data"
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = build()
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out items to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
