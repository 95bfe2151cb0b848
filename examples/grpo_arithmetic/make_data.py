"""Writes the GRPO demo's verifiable task: two-number sums and differences, answers checkable
by the numeric reward. Deterministic (seed 0): train.jsonl 400 rows, heldout.jsonl 60 rows of
pairs that never appear in train.

    python examples/grpo_arithmetic/make_data.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def row(a: int, b: int, op: str) -> dict:
    answer = a + b if op == "+" else a - b
    return {"prompt": [{"role": "user", "content": f"What is {a} {op} {b}? Reply with the "
                        "number only."}], "answer": str(answer)}


def main() -> None:
    rng = random.Random(0)
    pairs = sorted({(rng.randint(2, 60), rng.randint(2, 40), rng.choice("+-"))
                    for _ in range(600)})
    rng.shuffle(pairs)
    held, train = pairs[:60], pairs[60:460]
    for name, part in (("train", train), ("heldout", held)):
        text = "".join(json.dumps(row(*p)) + "\n" for p in part)
        (HERE / f"{name}.jsonl").write_text(text)


if __name__ == "__main__":
    main()
