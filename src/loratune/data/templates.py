"""Named chat templates for tokenizers that ship none.

Jinja strings in the form transformers renders (`tokenizer.apply_chat_template(...,
chat_template=TEMPLATES[name])`); `bos_token` and `eos_token` come from the tokenizer.
Each renders a conversation prefix by prefix (an earlier turn never changes when a later one is
added), which is what answer-only masking in `encode.py` relies on.
"""

from __future__ import annotations

from loratune.data.errors import DataError

TEMPLATES: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n  (Qwen, SmolLM, many others)
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # <s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s>  (Llama 2 chat)
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\n' + messages[0]['content']"
        " + '\n<</SYS>>\n\n' %}{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}"
        "{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
        "(sys if loop.first else '') + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    # ### Instruction:\nuser\n\n### Response:\nanswer</s>\n\n  (Stanford Alpaca, no input block:
    # the input is already part of the user turn)
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    # <|user|>\ncontent</s>\n  (Zephyr)
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


def _own_template(tokenizer) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates (e.g. default + tool_use)
        own = own.get("default")
    return own or None


def resolve_template(tokenizer, name: str | None) -> str:
    """The template named by `data.template`, else the tokenizer's own."""
    if name is not None:
        if name not in TEMPLATES:
            raise DataError(f"unknown chat template '{name}' (data.template); known: "
                            f"{', '.join(TEMPLATES)}")
        return TEMPLATES[name]
    own = _own_template(tokenizer)
    if own is None:
        raise DataError("the tokenizer has no chat template; set data.template to one of: "
                        f"{', '.join(TEMPLATES)}")
    return own
