"""Named chat templates for tokenizers that ship none (Jinja, as transformers renders them)."""

from __future__ import annotations

TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\n' + messages[0]['content']"
        " + '\n<</SYS>>\n\n' %}{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}"
        "{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
        "(sys if loop.first else '') + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


def resolve_template(tokenizer, name: str | None) -> str:
    """The named template, else the tokenizer's own; a clear error if neither exists."""
    from loratune.data.formats import DataError

    if name is not None:
        if name not in TEMPLATES:
            raise DataError(f"unknown chat template '{name}'; known: {', '.join(TEMPLATES)}")
        return TEMPLATES[name]
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        raise DataError("the tokenizer has no chat template; set data.template to one of: "
                        + ", ".join(TEMPLATES))
    return own
