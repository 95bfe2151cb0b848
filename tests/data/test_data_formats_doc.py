"""docs/data-formats.md: every example record there is read by the code it documents, as the
format its heading names."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from loratune.data.formats import detect_format, to_messages
from loratune.data.preference_pairs import pair_messages, unpaired_messages

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "data-formats.md"
SAMPLES = ROOT / "src" / "loratune" / "eval" / "samples"


def examples() -> dict[str, tuple[str, str]]:
    """heading -> (code block language, the block's text) for every '### heading' + block."""
    found = re.findall(r"^### (.+?)\n.*?^```(\w+)\n(.*?)^```", DOC.read_text(), re.M | re.S)
    return {head.strip(): (lang, text.strip()) for head, lang, text in found}


EXAMPLES = examples()


def record(heading: str) -> dict:
    lang, text = EXAMPLES[heading]
    assert lang == "json" and "\n" not in text  # one JSONL line
    return json.loads(text)


def test_every_format_has_an_example():
    assert set(EXAMPLES) == {
        "alpaca", "messages", "sharegpt", "preference pair, explicit prompt",
        "preference pair, message lists", "preference pair, implicit prompt", "unpaired (KTO)",
        "mc (MMLU layout: a CSV file per subject, no header)", "perplexity",
        "code (HumanEval JSONL)"}


@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt"])
def test_sft_examples_are_their_format(fmt):
    rec = record(fmt)
    assert detect_format(rec) == fmt
    messages = to_messages(rec)
    assert messages[-1]["role"] == "assistant" and messages[-2]["role"] == "user"


def test_alpaca_example_becomes_what_the_doc_says():
    roles = [(m["role"], m["content"]) for m in to_messages(record("alpaca"))]
    assert roles == [
        ("system", "You turn requests into commands."),
        ("user", "Lights on in the kitchen"), ("assistant", "lights(room=kitchen, state=on)"),
        ("user", "Convert the request into a command.\n\nSet a timer for 25 minutes"),
        ("assistant", "timer(minutes=25)")]


@pytest.mark.parametrize("heading", ["preference pair, explicit prompt",
                                     "preference pair, message lists",
                                     "preference pair, implicit prompt"])
def test_pair_examples_give_two_answers_to_one_prompt(heading):
    chosen, rejected = pair_messages(record(heading), heading)
    assert chosen[:-1] == rejected[:-1] and chosen[-1] != rejected[-1]
    assert chosen[-1]["role"] == "assistant"


def test_kto_example():
    conv, desirable = unpaired_messages(record("unpaired (KTO)"), "kto")
    assert desirable is True and conv[-1]["role"] == "assistant"


def test_eval_examples_read_as_their_task(tmp_path):
    from loratune.eval.tasks import perplexity
    from loratune.eval.tasks.mc import read_questions

    lang, row = EXAMPLES["mc (MMLU layout: a CSV file per subject, no header)"]
    path = tmp_path / "facts_test.csv"
    path.write_text(row + "\n")
    (q,) = read_questions(path)
    assert lang == "csv" and q.answer == 2 and q.options[2] == "Paris"
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record("perplexity")) + "\n")
    data = perplexity.read(SimpleNamespace(data=str(path), limit=None))
    assert data.items[0][1].startswith("The river starts")
    first = json.loads((SAMPLES / "humaneval.jsonl").read_text().splitlines()[0])
    assert record("code (HumanEval JSONL)") == first  # the sample the code task's tests run
