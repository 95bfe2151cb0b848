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
