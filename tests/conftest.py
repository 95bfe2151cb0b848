import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (chatml template, pad == eos == <|im_end|>)."""
    from loratune.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")
