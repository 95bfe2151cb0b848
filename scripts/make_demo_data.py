#!/usr/bin/env python3
"""Generate the bundled demo task: English and Chinese assistant requests -> command strings.

    "Set an alarm for Monday at 7:30"   / "周一早上7:30叫我起床"     -> alarm(day=mon, time=07:30)
    "Will it rain in Paris on Friday?"  / "巴黎星期五会下雨吗？"     -> weather(city=paris, day=fri)
    "Start a 25 minute timer"           / "设一个25分钟的计时器"     -> timer(minutes=25)
    "Turn the kitchen lights off"       / "把厨房的灯关掉"           -> lights(room=kitchen, state=off)
    "Set the bedroom to 22 degrees"     / "把卧室温度调到22度"       -> thermostat(room=bedroom, temp=22)

The base model cannot know this output convention, but the mapping is regular, so LoRA learns
it in minutes. Slot values are shared across intents (days: alarm and weather; rooms: lights
and thermostat) and every one of them occurs in training. Held-out items are (intent, slots)
combinations whose command never appears in training (for the one-slot timer: minute counts
never seen), so the held-out score measures composition, not recall. Both files are balanced
between English and Chinese.

    python scripts/make_demo_data.py [OUT_DIR]      (default: src/loratune/demo/data)
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

INSTRUCTION = "Convert the request into a command."
SEED = 20261122
LANGS = ("en", "zh")

# Training items per intent (half English, half Chinese) and held-out items per intent and
# language: 1200 training items, 80 held-out items (40 English, 40 Chinese).
TRAIN_PER_INTENT = {"timer": 220, "alarm": 290, "weather": 290, "lights": 100, "thermostat": 300}
HELDOUT_PER_INTENT_LANG = {"timer": 8, "alarm": 9, "weather": 9, "lights": 6, "thermostat": 8}
# How many slot combinations per intent are kept out of training.
HELDOUT_COMBOS = {"timer": 12, "alarm": 20, "weather": 14, "lights": 6, "thermostat": 14}

# value -> (English, Chinese variants...)
DAYS = {"mon": ("Monday", "周一", "星期一"), "tue": ("Tuesday", "周二", "星期二"),
        "wed": ("Wednesday", "周三", "星期三"), "thu": ("Thursday", "周四", "星期四"),
        "fri": ("Friday", "周五", "星期五"), "sat": ("Saturday", "周六", "星期六"),
        "sun": ("Sunday", "周日", "星期天")}
RELATIVE_DAYS = {"today": ("today", "今天"), "tomorrow": ("tomorrow", "明天")}
CITIES = {"paris": ("Paris", "巴黎"), "london": ("London", "伦敦"), "tokyo": ("Tokyo", "东京"),
          "beijing": ("Beijing", "北京"), "shanghai": ("Shanghai", "上海"),
          "berlin": ("Berlin", "柏林"), "madrid": ("Madrid", "马德里"), "rome": ("Rome", "罗马"),
          "sydney": ("Sydney", "悉尼"), "seoul": ("Seoul", "首尔")}
ROOMS = {"kitchen": ("kitchen", "厨房"), "bedroom": ("bedroom", "卧室"),
         "living_room": ("living room", "客厅"), "bathroom": ("bathroom", "浴室"),
         "office": ("office", "书房"), "garage": ("garage", "车库"),
         "hallway": ("hallway", "走廊"), "balcony": ("balcony", "阳台")}
# state -> (English, Chinese verb, Chinese short verb)
STATES = {"on": ("on", "打开", "开"), "off": ("off", "关掉", "关")}
ALARM_TIMES = [f"{h:02d}:{m:02d}" for h in range(5, 12) for m in (0, 15, 30, 45)]
TIMER_MINUTES = range(2, 121)
TEMPS = range(16, 29)

TEMPLATES = {
    "timer": {
        "en": ["Start a {n} minute timer", "Set a timer for {n} minutes",
               "Count down {n} minutes for me", "Timer, {n} minutes please",
               "Give me a {n}-minute timer"],
        "zh": ["设一个{n}分钟的计时器", "倒计时{n}分钟", "帮我计时{n}分钟", "开始{n}分钟倒计时",
               "定时{n}分钟"],
    },
    "alarm": {
        "en": ["Set an alarm for {day} at {time}", "Wake me up at {time} on {day}",
               "Alarm on {day}, {time}", "I need an alarm at {time} next {day}",
               "Please set an alarm at {time} am on {day}"],
        "zh": ["{day}早上{time}叫我起床", "设一个{day}{time}的闹钟", "{day}{time}提醒我起床",
               "帮我定{day}{time}的闹钟", "{day}早上{time}的闹钟"],
    },
    "weather": {
        "en": ["What's the weather in {city} {when}?", "Will it rain in {city} {when}?",
               "{city} weather {when}", "How hot will it be in {city} {when}?",
               "Give me the forecast for {city} {when}"],
        "zh": ["{when}{city}天气怎么样？", "{city}{when}会下雨吗？", "查一下{city}{when}的天气",
               "{when}{city}热不热？", "{city}{when}的天气预报"],
    },
    "lights": {
        "en": ["Turn {state} the {room} lights", "Turn the {room} lights {state}",
               "Switch {state} the light in the {room}", "{room} lights {state}",
               "Please turn the {room} light {state}", "Can you switch the {room} lights {state}?"],
        "zh": ["把{room}的灯{verb}", "{verb}{room}的灯", "{room}灯{short}", "请{verb}{room}的灯",
               "把{room}灯{short}了", "帮我把{room}的灯{verb}"],
    },
    "thermostat": {
        "en": ["Set the {room} to {t} degrees", "Make the {room} {t} degrees",
               "{room} thermostat to {t}", "Heat the {room} to {t} degrees",
               "Change the {room} temperature to {t} degrees"],
        "zh": ["把{room}温度调到{t}度", "{room}调到{t}度", "{room}温度设为{t}度",
               "把{room}设成{t}度", "{room}空调开到{t}度"],
    },
}


def slot_combos() -> dict[str, list[dict]]:
    """Every slot combination per intent, in a fixed order."""
    return {
        "timer": [{"minutes": str(n)} for n in TIMER_MINUTES],
        "alarm": [{"day": d, "time": t} for d in DAYS for t in ALARM_TIMES],
        "weather": [{"city": c, "day": d} for c in CITIES for d in [*RELATIVE_DAYS, *DAYS]],
        "lights": [{"room": r, "state": s} for r in ROOMS for s in STATES],
        "thermostat": [{"room": r, "temp": str(t)} for r in ROOMS for t in TEMPS],
    }


def command(intent: str, slots: dict) -> str:
    return f"{intent}(" + ", ".join(f"{k}={v}" for k, v in slots.items()) + ")"


def _day(value: str, lang: str, rng: random.Random, weather: bool = False) -> str:
    if value in RELATIVE_DAYS:
        return RELATIVE_DAYS[value][0 if lang == "en" else 1]
    if lang == "en":
        return f"on {DAYS[value][0]}" if weather else DAYS[value][0]
    return rng.choice(DAYS[value][1:])


def render(intent: str, slots: dict, lang: str, template: str, rng: random.Random) -> str:
    li = 0 if lang == "en" else 1
    if intent == "timer":
        text = template.format(n=slots["minutes"])
    elif intent == "alarm":
        text = template.format(day=_day(slots["day"], lang, rng), time=slots["time"].lstrip("0"))
    elif intent == "weather":
        text = template.format(city=CITIES[slots["city"]][li],
                               when=_day(slots["day"], lang, rng, weather=True))
    elif intent == "lights":
        state = STATES[slots["state"]]
        text = template.format(room=ROOMS[slots["room"]][li], state=state[0], verb=state[1],
                               short=state[2])
    else:
        text = template.format(room=ROOMS[slots["room"]][li], t=slots["temp"])
    return text[:1].upper() + text[1:]


def split_combos(rng: random.Random) -> tuple[dict, dict]:
    """Hold out HELDOUT_COMBOS[intent] combinations per intent. For multi-slot intents every
    slot value keeps at least two training combinations; for the one-slot timer the held-out
    minute counts lie strictly inside the training range."""
    train, held = {}, {}
    for intent, combos in slot_combos().items():
        order = combos[:]
        rng.shuffle(order)
        counts = Counter((k, v) for c in combos for k, v in c.items())
        lo, hi = min(TIMER_MINUTES), max(TIMER_MINUTES)
        chosen = []
        for c in order:
            if len(chosen) == HELDOUT_COMBOS[intent]:
                break
            if intent == "timer":
                ok = lo < int(c["minutes"]) < hi
            else:
                ok = all(counts[(k, v)] > 2 or (intent == "lights" and counts[(k, v)] > 1)
                         for k, v in c.items())
            if ok:
                chosen.append(c)
                counts.subtract(c.items())
        assert len(chosen) == HELDOUT_COMBOS[intent], intent
        held[intent] = chosen
        train[intent] = [c for c in combos if c not in chosen]
    return train, held


def record(intent: str, slots: dict, lang: str, text: str) -> dict:
    return {"instruction": INSTRUCTION, "input": text, "output": command(intent, slots),
            "lang": lang}


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train_combos, held_combos = split_combos(rng)

    heldout = []
    for intent, combos in held_combos.items():
        for lang in LANGS:
            for slots in rng.sample(combos, HELDOUT_PER_INTENT_LANG[intent]):
                template = rng.choice(TEMPLATES[intent][lang])
                heldout.append(record(intent, slots, lang, render(intent, slots, lang, template,
                                                                  rng)))
    rng.shuffle(heldout)

    train = []
    for intent, combos in train_combos.items():
        for lang in LANGS:
            want, items, seen = TRAIN_PER_INTENT[intent] // 2, [], set()
            # Cover every training combination once (while the quota allows), then sample.
            pool = combos[:]
            rng.shuffle(pool)
            while len(items) < want:
                slots = pool.pop() if pool else rng.choice(combos)
                template = rng.choice(TEMPLATES[intent][lang])
                text = render(intent, slots, lang, template, rng)
                if text not in seen:
                    seen.add(text)
                    items.append(record(intent, slots, lang, text))
            train += items
    rng.shuffle(train)
    return train, heldout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                     .encode("utf-8"))


def main(out_dir: str | Path | None = None) -> None:
    out = Path(out_dir) if out_dir else Path(__file__).resolve().parents[1] / "src/loratune/demo/data"
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = build()
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out items to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
