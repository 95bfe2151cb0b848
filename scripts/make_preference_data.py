#!/usr/bin/env python3
"""Generate the bundled preference pairs of the demo task (`data.train: demo-pairs`).

The SFT demo (scripts/make_demo_data.py) teaches five commands; it never shows a request that
has none, so the SFT model forces one onto anything ("Book a flight to Paris on Friday" ->
weather(city=paris, day=fri)). The pairs teach the preference SFT left out:

- out of scope (half): chosen `unsupported()`, rejected the nearest command of the five
  ("Play music in the kitchen": lights(room=kitchen, state=on)); requests about flights,
  music, calls, food, messages, doors, volume... in English and Chinese;
- in scope (half, so DPO keeps what SFT taught): chosen the right command, rejected a near
  miss (a neighbouring day, a temperature off by one, lights switched the wrong way...).

Held-out pairs use request phrasings training never shows (out of scope) and the SFT held-out
items, whose slot combinations training never shows (in scope).

    python scripts/make_preference_data.py [OUT_DIR]      (default: src/loratune/demo/data)
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

SEED = 20261127
N_TRAIN = 600  # 300 in scope (from the SFT training items), 300 out of scope
N_HELD = 80  # 40 in scope (from the SFT held-out items), 40 out of scope
INSTRUCTION = "Convert the request into a command."
UNSUPPORTED = "unsupported()"
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


# Requests without a command: (English phrasings, Chinese phrasings, the command an SFT model
# forces onto them). The last phrasing of each language is held out.
OUT_OF_SCOPE = [
    (["Book a flight to {City} {day}", "I need a plane ticket to {City} {day}",
      "Find me flights to {City} {day}"],
     ["订一张{day_zh}去{city_zh}的机票", "帮我买{day_zh}飞{city_zh}的机票", "查一下{day_zh}去{city_zh}的航班"],
     "weather(city={city}, day={d})"),
    (["Play some music in the {room}", "Put on jazz in the {room}", "Start my playlist in the {room}"],
     ["在{room_zh}放点音乐", "{room_zh}里放首歌", "在{room_zh}播放我的歌单"],
     "lights(room={room_id}, state=on)"),
    (["Call mom at {time}", "Phone the dentist at {time}", "Ring my brother at {time}"],
     ["{time}给妈妈打电话", "{time}打电话给牙医", "{time}给我哥哥打个电话"],
     "alarm(day=mon, time={time_id})"),
    (["Order a pizza for {n} people", "Get takeout for {n} people", "Order lunch for {n} people"],
     ["点{n}个人的披萨", "订{n}人份的外卖", "帮我点{n}个人的午饭"],
     "timer(minutes={n})"),
    (["Lock the {room} door", "Close the {room} window", "Open the {room} blinds"],
     ["把{room_zh}的门锁上", "关上{room_zh}的窗户", "拉开{room_zh}的窗帘"],
     "lights(room={room_id}, state=off)"),
    (["Turn the volume up to {t}", "Set the TV volume to {t}", "Make the speaker louder, level {t}"],
     ["把音量调到{t}", "电视音量调到{t}", "音箱开大到{t}"],
     "thermostat(room=living_room, temp={t})"),
    (["Send a message to Tom {day}", "Email the report to Anna {day}", "Text Li Wei {day}"],
     ["{day_zh}给Tom发个消息", "{day_zh}把报告发给Anna", "{day_zh}给李伟发短信"],
     "weather(city=london, day={d})"),
]
CITY_NAMES = {"paris": ("Paris", "巴黎"), "london": ("London", "伦敦"), "tokyo": ("Tokyo", "东京"),
              "beijing": ("Beijing", "北京"), "berlin": ("Berlin", "柏林"), "rome": ("Rome", "罗马")}
ROOM_NAMES = {"kitchen": ("kitchen", "厨房"), "bedroom": ("bedroom", "卧室"),
              "living_room": ("living room", "客厅"), "office": ("office", "书房"),
              "garage": ("garage", "车库")}
DAY_NAMES = {"mon": ("on Monday", "周一"), "fri": ("on Friday", "周五"),
             "sat": ("on Saturday", "星期六"), "tomorrow": ("tomorrow", "明天")}


def out_of_scope(rng: random.Random, held_out: bool) -> dict:
    """One request without a command: chosen unsupported(), rejected the forced command."""
    en, zh, forced = rng.choice(OUT_OF_SCOPE)
    lang = rng.choice(["en", "zh"])
    phrasings = en if lang == "en" else zh
    template = phrasings[-1] if held_out else rng.choice(phrasings[:-1])
    city, d, room = rng.choice(list(CITY_NAMES)), rng.choice(list(DAY_NAMES)), \
        rng.choice(list(ROOM_NAMES))
    time_id = f"{rng.randint(6, 11):02d}:{rng.choice([0, 15, 30, 45]):02d}"
    values = {"City": CITY_NAMES[city][0], "city_zh": CITY_NAMES[city][1], "city": city,
              "day": DAY_NAMES[d][0], "day_zh": DAY_NAMES[d][1], "d": d,
              "room": ROOM_NAMES[room][0], "room_zh": ROOM_NAMES[room][1], "room_id": room,
              "time": time_id.lstrip("0"), "time_id": time_id, "n": rng.randint(2, 9),
              "t": rng.randint(16, 28)}
    request = template.format(**values)
    return {"prompt": f"{INSTRUCTION}\n\n{request}", "chosen": UNSUPPORTED,
            "rejected": forced.format(**values), "lang": lang}


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
    in_scope = [x for lang in by_lang for x in rng.sample(by_lang[lang], N_TRAIN // 4)]
    train = [pair(x, rng) for x in in_scope] + [out_of_scope(rng, False)
                                                for _ in range(N_TRAIN // 2)]
    held = [pair(x, rng) for x in held_items[: N_HELD // 2]] + [out_of_scope(rng, True)
                                                               for _ in range(N_HELD // 2)]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


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
