import json

import pytest

from tiny import tiny_llama


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (chatml template, pad == eos == <|im_end|>)."""
    from loratune.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smol_tokenizer):
    """A model folder: tiny random Llama with the real SmolLM2 tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_llama(vocab=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def data_file(tmp_path):
    """Eight alpaca records ("Repeat the word apple" -> "apple apple apple"): a task a few
    steps learn."""
    rows = [{"instruction": f"Repeat the word {w}", "input": "", "output": f"{w} {w} {w}"}
            for w in ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger"]]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory):
    """Factory: a family's name (tests/families.py) -> its saved model folder, one per session."""
    from families import save_family

    folders = {}

    def get(name: str):
        if name not in folders:
            folders[name] = save_family(name, tmp_path_factory.mktemp(name) / "model")
        return folders[name]

    return get
