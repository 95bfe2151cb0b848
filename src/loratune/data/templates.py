"""Named chat templates for tokenizers that ship none.

Jinja strings in the form transformers renders (`tokenizer.apply_chat_template(...,
chat_template=TEMPLATES[name])`); `bos_token` and `eos_token` come from the tokenizer.
Each renders a conversation prefix by prefix (an earlier turn never changes when a later one is
added), which is what answer-only masking in `encode.py` relies on.
"""

from __future__ import annotations

from pathlib import Path

from loratune.data.errors import DataError
from loratune.files import write_atomic_file

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
    # <start_of_turn>user\ncontent<end_of_turn>\n<start_of_turn>model\n  (Gemma 1/2/3: the
    # published turn format, text only; a system message opens the first user turn, as Gemma 3's
    # own template writes it)
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set prefix = messages[0]['content'] + '\n\n' %}{% set msgs = messages[1:] %}"
        "{% else %}{% set prefix = '' %}{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + m['content'] | trim"
        " + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # chatml with tools, in the Hermes layout Qwen2.5 uses: the schemas in the system turn,
    # calls as <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> after the content,
    # each result its own `tool` turn in <tool_response> (one turn per result, not Qwen's
    # grouping, so every prefix stays a prefix). For chatml models whose own template has no
    # tools (SmolLM2); serve and eval read calls back with the hermes parser.
    "chatml_tools": (
        "{% if tools %}{{ '<|im_start|>system\n' }}{% if messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] + '\n\n' }}{% endif %}"
        "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
        "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
        "{{ '\n</tools>\n\nFor each function call, return a json object with function name "
        "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
        "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n' }}"
        "{% elif messages[0]['role'] == 'system' %}"
        "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'system' and loop.first %}"
        "{% elif m['role'] == 'assistant' and m.get('tool_calls') %}{{ '<|im_start|>assistant' }}"
        "{% if m['content'] %}{{ '\n' + m['content'] }}{% endif %}{% for c in m['tool_calls'] %}"
        "{% set f = c['function'] if c['function'] is defined else c %}"
        "{{ '\n<tool_call>\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' + "
        "(f['arguments'] | tojson) + '}\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
        "{% elif m['role'] == 'tool' %}{{ '<|im_start|>tool\n<tool_response>\n' + m['content'] "
        "+ '\n</tool_response><|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    ),
}

# Base models ship no chat template, but a family's instruct models document one: it is the
# default when the tokenizer has that format's turn tokens (Gemma's base checkpoints do).
FAMILY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}
FAMILY_NAMES = {"gemma": "Gemma's turn format <start_of_turn>user ... <end_of_turn>"}


def _own_template(tokenizer) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates (e.g. default + tool_use)
        own = own.get("default")
    return own or None


def default_template(tokenizer) -> tuple[str, str]:
    """(name, one-line note) of the template for a tokenizer without one: its family's
    documented format when every turn token of it is one token here, else plain-text alpaca.
    Decided from the vocabulary alone, so it never waits on (or fails after) a model load."""
    vocab = tokenizer.get_vocab()
    name = next((n for n, tokens in FAMILY_TEMPLATES.items()
                 if all(t in vocab for t in tokens)), "alpaca")
    how = FAMILY_NAMES.get(name, "plain-text alpaca (### Instruction: / ### Response:)")
    return name, (f"the tokenizer has no chat template: using {how} (data.template: {name}; "
                  f"set data.template to one of {', '.join(TEMPLATES)} for another)")


def template_note(tokenizer, name: str | None) -> str | None:
    """What default_template chose, when data.template is unset and the tokenizer has none."""
    if name is not None or _own_template(tokenizer) is not None:
        return None
    return default_template(tokenizer)[1]


def resolve_template(tokenizer, name: str | None) -> str:
    """The template named by `data.template`, else the tokenizer's own, else the default for
    its family (default_template)."""
    if name is not None:
        if name not in TEMPLATES:
            raise DataError(f"unknown chat template '{name}' (data.template); known: "
                            f"{', '.join(TEMPLATES)}")
        return TEMPLATES[name]
    own = _own_template(tokenizer)
    return own if own is not None else TEMPLATES[default_template(tokenizer)[0]]


# -- the template an adapter was trained with ---------------------------------------------------
# A run with data.template writes the template's text beside adapter_config.json, under the name
# transformers gives a tokenizer's own (and vLLM's --chat-template reads): eval and serve prompt
# the adapter as it was trained, without a flag.
TEMPLATE_FILE = "chat_template.jinja"


def store_template(adapter_dir: str | Path, name: str | None) -> Path | None:
    """Write data.template's text into the adapter folder (nothing when unset: the tokenizer's
    own template, which every consumer already uses)."""
    if name is None:
        return None
    text = TEMPLATES[name]
    out = Path(adapter_dir) / TEMPLATE_FILE
    write_atomic_file(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
    return out


# The bundled templates and the families' own are a few KB (the longest, with tools, ~15 KB); a
# file far past that is no template, and serve reads it at every request.
MAX_TEMPLATE_BYTES = 1 << 20


def _stored(folder: str | Path) -> str | None:
    """The folder's chat_template.jinja (from whoever made the adapter: maybe a download), or a
    DataError naming it when it is huge, not UTF-8 or not Jinja."""
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return None
    text = read_template_file(path, Path(folder))
    problem = _syntax_problem(text)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    return text


def read_template_file(path: Path, folder: Path) -> str:
    """A template file's text, read as `_template_bytes` allows; DataError when not UTF-8."""
    try:
        return _template_bytes(path, folder).decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _template_bytes(path: Path, folder: Path) -> bytes:
    """The file's bytes, read only inside the adapter folder (or, for a Hugging Face cache
    snapshot, its repo's blobs, where the snapshot's links point): a link to /etc or
    /proc/self/environ would otherwise put the server's files into every prompt. At most
    MAX_TEMPLATE_BYTES are read, whatever the size stat gives (/proc says 0)."""
    real, home = path.resolve(), folder.resolve()
    roots = [home, home.parent.parent] if home.parent.name == "snapshots" else [home]
    if not any(real.is_relative_to(root) for root in roots):
        raise DataError(f"{path}: a link out of the adapter folder (to {real}), not followed")
    with open(real, "rb") as f:
        data = f.read(MAX_TEMPLATE_BYTES + 1)
    if len(data) > MAX_TEMPLATE_BYTES:
        raise DataError(f"{path}: more than the {MAX_TEMPLATE_BYTES} bytes a chat template may "
                        "have")
    return data


def _syntax_problem(text: str) -> str | None:
    """Why `text` is no Jinja template, or None. Compiled by transformers' own (cached) function:
    its sandbox and extensions ({% generation %}, {% break %}), the parse rendering will use."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as err:
        return f"line {err.lineno}: not a Jinja template ({err.message})"
    return None


def _named(text: str) -> str:
    return next((f"'{n}'" for n, t in TEMPLATES.items() if t == text), "its own")


def _which(folder: str, text: str | None) -> str:
    return (f"{folder} ({TEMPLATE_FILE}: {_named(text)})" if text else
            f"{folder} (no {TEMPLATE_FILE}: the tokenizer's own)")


def adapters_template(folders) -> tuple[str, str] | None:
    """(text, note) of the chat template the adapter folders were trained with, None when none
    stores one; adapters trained with different templates (or one with the tokenizer's own)
    cannot share one tokenizer: a DataError naming two of them."""
    stored = {str(f): _stored(f) for f in folders}
    if not any(stored.values()):
        return None
    first = next(iter(stored.items()))
    other = next((item for item in stored.items() if item[1] != first[1]), None)
    if other is not None:
        raise DataError(f"adapters {_which(*first)} and {_which(*other)} were trained with "
                        "different chat templates; use them in separate runs")
    text = first[1]
    return text, (f"chat template {_named(text)} from the adapters' {TEMPLATE_FILE} (the "
                  "base is prompted with it too)")

