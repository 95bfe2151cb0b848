"""The tokenizer part of a GGUF: copied from a source GGUF, or built from tokenizer.json (BPE).

llama.cpp picks its pre-tokenizer regex by the `tokenizer.ggml.pre` name, which tokenizer.json
does not state; a source GGUF carries it, otherwise it must be given (`--tokenizer-pre`).
"""

from __future__ import annotations

import json
from pathlib import Path

KNOWN_PRE = ("default", "llama-bpe", "gpt-2", "smollm", "qwen2", "mistral-bpe", "olmo",
             "starcoder", "falcon", "deepseek-llm", "command-r")


def source_gguf(folder: Path) -> Path | None:
    """The GGUF a cached folder was converted from (its SOURCE note), if it still exists."""
    note = folder / "SOURCE"
    if note.is_file():
        text = note.read_text().strip()
        if text.startswith("converted from "):
            path = Path(text[len("converted from "):])
            if path.is_file():
                return path
    return None


def _copy_fields(writer, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _from_tokenizer_json(writer, folder: Path, pre: str | None) -> None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no tokenizer.json (and no source GGUF) to take the "
                         "tokenizer from")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer model {model.get('type')!r}; GGUF export handles "
                         "BPE tokenizers (or copies a source GGUF's tokenizer)")
    if pre is None:
        raise ValueError(f"{path}: llama.cpp needs the pre-tokenizer name; pass --tokenizer-pre "
                         f"(one of {', '.join(KNOWN_PRE)}, as llama.cpp names them)")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for text, t in added.items():
        vocab[text] = t["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [1] * size  # normal
    for text, i in vocab.items():
        tokens[i] = text
        if text in added:
            types[i] = 3 if added[text].get("special") else 4  # control / user-defined
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _special_ids(writer, folder, vocab)


def _special_ids(writer, folder: Path, vocab: dict[str, int]) -> None:
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    def token_id(key: str):
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if value is not None else None

    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        i = token_id(key)
        if i is not None:
            add(i)
    writer.add_add_bos_token(bool(cfg.get("add_bos_token", False)))
    template = cfg.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if template:
        writer.add_chat_template(template)


def add_tokenizer(writer, folder: Path, source: Path | None = None, pre: str | None = None) -> None:
    source = source or source_gguf(folder)
    if source is not None and pre is None:
        _copy_fields(writer, source)
    else:
        _from_tokenizer_json(writer, folder, pre)
