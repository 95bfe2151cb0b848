"""The served tools adapter through the official openai client: a question, the model's tool
call, the tool run here, its result sent back, the model's final answer.

    loratune train examples/tools.yaml
    loratune serve --adapters runs/tools          # runs/tools/adapter is model "adapter"
    python examples/tools/loop.py "What's the weather in Oslo?"

The server reads the adapter's chat_template.jinja (chatml_tools), so it renders the tools and
parses <tool_call> blocks into `tool_calls` with no flag.
"""

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tools() -> list[dict]:
    """The four tools of the bundled data (make_data.TOOLS), read from its first record."""
    first = json.loads((HERE / "heldout.jsonl").read_text().splitlines()[0])
    names = {t["function"]["name"] for t in first["tools"]}
    for line in (HERE / "train.jsonl").read_text().splitlines():
        record = json.loads(line)
        first["tools"] += [t for t in record["tools"] if t["function"]["name"] not in names]
        names |= {t["function"]["name"] for t in record["tools"]}
    return first["tools"]


def run_tool(name: str, args: dict) -> str:
    """Stand-ins for real services: fixed answers in the shape the training data shows."""
    if name == "get_weather":
        return json.dumps({"city": args.get("city"), "temperature": 12,
                           "unit": args.get("unit", "celsius"), "sky": "cloudy"})
    if name == "convert_currency":
        return json.dumps({"amount": round(float(args.get("amount", 0)) * 0.9, 2),
                           "currency": args.get("to")})
    if name == "set_timer":
        return json.dumps({"ok": True, "minutes": args.get("minutes")})
    return json.dumps([{"name": f"{args.get('name')} Silva", "phone": "+1 555 0100"}])


def loop(client, model: str, question: str, max_tokens: int = 96) -> tuple[list, str]:
    """(the calls the model made, its final answer) for one question."""
    messages = [{"role": "user", "content": question}]
    first = client.chat.completions.create(model=model, messages=messages, tools=tools(),
                                           temperature=0, max_tokens=max_tokens)
    message = first.choices[0].message
    if not message.tool_calls:
        return [], message.content or ""
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        result = run_tool(call.function.name, json.loads(call.function.arguments))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(model=model, messages=messages, tools=tools(),
                                           temperature=0, max_tokens=max_tokens)
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls], \
        final.choices[0].message.content or ""


def main() -> None:
    import openai

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What's the weather in Oslo?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="adapter")
    parser.add_argument("--api-key", default="unused")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    calls, answer = loop(client, args.model, args.question)
    print(f"calls: {calls}\nanswer: {answer}")


if __name__ == "__main__":
    main()
