"""Writes the tool-calling demo's data: conversations with four tools of typed arguments
(get_weather: city + unit enum, convert_currency: amount number + from/to codes, set_timer:
minutes integer + optional label, search_contacts: name + optional limit integer), in OpenAI's
messages layout with a top-level `tools` list naming the tools a conversation calls and one
other. Kinds of conversation: one call -> result ->
answer; two calls in parallel -> both results -> answer; a question no tool answers (answered in
words); a call loop followed by "thanks" (no call in context). Deterministic (seed 0):
train.jsonl 320 conversations, heldout.jsonl 40 whose argument values (cities, amounts,
currency pairs, minutes, labels, names) never appear in train.

    python examples/tools/make_data.py
"""

import json
import random
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


TOOLS = [
    _fn("get_weather", "Current weather in a city",
        {"city": {"type": "string"},
         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    _fn("convert_currency", "Convert money between currencies (ISO codes)",
        {"amount": {"type": "number"},
         "from": {"type": "string"}, "to": {"type": "string"}},
        ["amount", "from", "to"]),
    _fn("set_timer", "Start a countdown timer",
        {"minutes": {"type": "integer"}, "label": {"type": "string"}}, ["minutes"]),
    _fn("search_contacts", "Find people in the address book",
        {"name": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}}, ["name"]),
]

# Argument values, split so held-out conversations use values training never shows.
CITIES = ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Oslo", "Dublin",
          "Athens", "Warsaw", "Zurich", "Tokyo", "Seoul", "Lima", "Quito", "Cairo", "Nairobi",
          "Boston", "Denver", "Toronto", "Sydney", "Perth", "Manila", "Hanoi", "Delhi",
          "Chicago", "Austin", "Helsinki", "Budapest"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK", "NOK", "INR"]
NAMES = ["Maria", "Chen", "Ahmed", "Olga", "Pedro", "Aiko", "Liam", "Fatima", "Noah", "Ingrid",
         "Kofi", "Sofia", "Mateo", "Priya", "Lucas", "Yuki", "Omar", "Elena", "Ravi", "Hana"]
LABELS = ["pasta", "tea", "laundry", "eggs", "rice", "bread", "workout", "nap", "pizza",
          "meeting", "oven", "coffee"]
CHAT = [
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in "
     "his field."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Say hello in Spanish.", "Hola!"),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("Give me a word that rhymes with cat.", "Hat rhymes with cat."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Name a fruit that is yellow.", "A banana is yellow."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Can you spell the word 'tool'?", "T-O-O-L."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
]
THANKS = [("Thanks!", "You're welcome!"), ("Great, thank you.", "Glad I could help."),
          ("Perfect, thanks a lot.", "Any time!")]
RATES = {c: r for c, r in zip(CURRENCIES, [1.0, 0.92, 0.79, 151.0, 0.9, 1.37, 1.52, 10.6,
                                           10.8, 83.3])}


class Values:
    """One side of the split: the argument values its conversations draw from."""

    def __init__(self, rng: random.Random, held: bool):
        pick = (lambda xs: xs[: len(xs) // 4]) if held else (lambda xs: xs[len(xs) // 4:])
        self.rng, self.cities, self.names, self.labels = rng, pick(CITIES), pick(NAMES), \
            pick(LABELS)
        pairs = [(a, b) for a in CURRENCIES for b in CURRENCIES if a != b]
        random.Random(1).shuffle(pairs)
        self.pairs = pick(pairs)
        # amounts and minutes: held-out ones are odd, training's even (never the same value)
        self.amounts = [a for a in range(5, 1000, 5) if (a // 5) % 2 == held]
        self.minutes = [m for m in range(1, 91) if m % 2 == held]


def _call(name: str, args: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": args}}


def weather(v: Values, units=(None, "celsius", "fahrenheit")) -> tuple[str, dict, str, str]:
    city = v.rng.choice(v.cities)
    unit = v.rng.choice(units)
    temp = v.rng.randint(-5, 35) if unit != "fahrenheit" else v.rng.randint(25, 95)
    sky = v.rng.choice(["sunny", "cloudy", "raining", "windy"])
    ask = v.rng.choice([f"What's the weather in {city}", f"How is the weather in {city}",
                        f"Is it cold in {city} right now"])
    ask += f" in {unit}?" if unit else "?"
    args = {"city": city, **({"unit": unit} if unit else {})}
    sign = "°F" if unit == "fahrenheit" else "°C"
    result = {"city": city, "temperature": temp, "unit": unit or "celsius", "sky": sky}
    return ask, _call("get_weather", args), json.dumps(result), f"{temp}{sign} and {sky} in {city}"


def convert(v: Values) -> tuple[str, dict, str, str]:
    amount, (src, dst) = v.rng.choice(v.amounts), v.rng.choice(v.pairs)
    ask = v.rng.choice([f"Convert {amount} {src} to {dst}.", f"How much is {amount} {src} in "
                        f"{dst}?", f"What are {amount} {src} worth in {dst}?"])
    value = round(amount / RATES[src] * RATES[dst], 2)
    result = {"amount": value, "currency": dst}
    return ask, _call("convert_currency", {"amount": amount, "from": src, "to": dst}), \
        json.dumps(result), f"{amount} {src} is {value} {dst}"


def timer(v: Values) -> tuple[str, dict, str, str]:
    minutes, label = v.rng.choice(v.minutes), v.rng.choice([None, v.rng.choice(v.labels)])
    ask = v.rng.choice([f"Set a timer for {minutes} minutes", f"Start a {minutes} minute timer"])
    ask += f" for the {label}." if label else "."
    args = {"minutes": minutes, **({"label": label} if label else {})}
    done = f"a {minutes} minute timer" + (f" for the {label}" if label else "") + " is running"
    return ask, _call("set_timer", args), json.dumps({"ok": True, "minutes": minutes}), done


def contacts(v: Values) -> tuple[str, dict, str, str]:
    name, limit = v.rng.choice(v.names), v.rng.choice([None, None, 2, 3, 5])
    ask = (f"Show me up to {limit} contacts named {name}." if limit else
           v.rng.choice([f"Find {name} in my contacts.", f"What is {name}'s phone number?"]))
    phone = f"+1 555 {v.rng.randint(1000, 9999)}"
    args = {"name": name, **({"limit": limit} if limit else {})}
    result = [{"name": f"{name} {v.rng.choice(['Silva', 'Lee', 'Novak', 'Ito'])}",
               "phone": phone}]
    return ask, _call("search_contacts", args), json.dumps(result), \
        f"{result[0]['name']}: {phone}"


ASKS = (weather, convert, timer, contacts)


def single(v: Values) -> list[dict]:
    ask, call, result, fact = v.rng.choice(ASKS)(v)
    return [{"role": "user", "content": ask},
            {"role": "assistant", "content": "", "tool_calls": [dict(call, id="c1")]},
            {"role": "tool", "tool_call_id": "c1", "content": result},
            {"role": "assistant", "content": fact[0].upper() + fact[1:] + "."}]


def parallel(v: Values) -> list[dict]:
    """Two calls of one tool in one turn (weather in two cities, two conversions)."""
    kind = v.rng.choice([partial(weather, units=(None,)), convert])
    first = second = kind(v)
    while second[1] == first[1]:
        second = kind(v)
    if kind is convert:
        ask = f"{first[0]} Also {second[0][0].lower() + second[0][1:]}"
    else:
        a, b = (s[1]["function"]["arguments"]["city"] for s in (first, second))
        ask = f"What's the weather in {a} and in {b}?"
    calls = [dict(first[1], id="c1"), dict(second[1], id="c2")]
    return [{"role": "user", "content": ask},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "content": first[2]},
            {"role": "tool", "tool_call_id": "c2", "content": second[2]},
            {"role": "assistant", "content": f"{first[3][0].upper() + first[3][1:]}; "
                                             f"{second[3]}."}]


def no_call(v: Values) -> list[dict]:
    ask, answer = v.rng.choice(CHAT)
    return [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]


def thanks(v: Values) -> list[dict]:
    ask, answer = v.rng.choice(THANKS)
    return single(v) + [{"role": "user", "content": ask},
                        {"role": "assistant", "content": answer}]


def declared(messages: list[dict], rng: random.Random) -> list[dict]:
    """The tools a conversation declares: those it calls and one other, in a random order (a
    model must read the list, and CPU training stays short: all four make a 440-token prompt)."""
    used = {c["function"]["name"] for m in messages for c in m.get("tool_calls", [])}
    others = [t for t in TOOLS if t["function"]["name"] not in used]
    tools = [t for t in TOOLS if t["function"]["name"] in used] + rng.sample(others,
                                                                            2 - len(used) or 1)
    rng.shuffle(tools)
    return tools


def conversations(n: int, held: bool, rng: random.Random) -> list[dict]:
    v = Values(rng, held)
    kinds = [single] * 5 + [parallel] * 2 + [no_call] * 2 + [thanks]
    out = []
    for _ in range(n):
        messages = rng.choice(kinds)(v)
        out.append({"tools": declared(messages, rng), "messages": messages})
    return out


def write(out: Path) -> None:
    rng = random.Random(0)
    for name, n, held in (("train", 320, False), ("heldout", 40, True)):
        text = "".join(json.dumps(r) + "\n" for r in conversations(n, held, rng))
        (out / f"{name}.jsonl").write_text(text)


if __name__ == "__main__":
    write(HERE)
