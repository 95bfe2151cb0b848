"""The tokenizer part of a GGUF: copied from a source GGUF, or built from tokenizer.json.

tokenizer.json holds one of two BPE flavours, written the way llama.cpp's converter writes them:
- byte-level BPE (GPT-2 style: Llama 3, Qwen, SmolLM, Phi-4): `tokenizer.ggml.model = gpt2`,
  tokens, types and merges, plus the pre-tokenizer name, detected from the tokenizer's own
  splitting (gguf_pretokenizer.detect_pre);
- SentencePiece-style BPE (`▁` for spaces, byte fallback: Mistral, Llama 2, Gemma, Phi-3):
  `tokenizer.ggml.model = llama` with a score per token. llama.cpp's SentencePiece tokenizer
  merges the adjacent pair whose joined piece scores highest; tokenizer.json ranks merges
  instead, so a piece scores minus the rank of the first merge that makes it.
Other tokenizer models (Unigram, WordPiece) are refused by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from loratune.data.templates import read_template_file

# gguf.TokenType values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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


def _copy_fields(writer, source: Path, template: str | None = None) -> None:
    """The source GGUF's tokenizer keys; `template` (the folder's own chat template: an adapter's,
    after a merge) replaces the source's templates where it differs from its default one."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    own = fields.get("tokenizer.chat_template")
    if template is not None and (own is None or own.contents() != template):
        fields = {k: f for k, f in fields.items() if not k.startswith("tokenizer.chat_template")}
        writer.add_chat_template(template)
    for key, field in fields.items():
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _components(node: dict | None) -> list[dict]:
    """A normalizer / pre-tokenizer / decoder and, for a Sequence, its parts."""
    if not node:
        return []
    parts = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders")
    return [node] + [c for p in parts or [] for c in _components(p)]


def tokenizer_kind(data: dict, path: Path) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (SentencePiece-style BPE); refuses the rest by name."""
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer model {model.get('type')!r}; GGUF export writes BPE "
                         "tokenizers (byte-level or SentencePiece-style), not this one")
    parts = [c.get("type") for key in ("normalizer", "pre_tokenizer", "decoder")
             for c in _components(data.get(key))]
    if "ByteLevel" in parts:
        return "gpt2"
    metaspace = "Metaspace" in parts or any(
        c.get("type") == "Replace" and c.get("content") == "▁"
        for c in _components(data.get("normalizer")) + _components(data.get("pre_tokenizer")))
    if model.get("byte_fallback") and metaspace:
        return "llama"
    raise ValueError(f"{path}: a BPE tokenizer that is neither byte-level (ByteLevel) nor "
                     "SentencePiece-style (▁ for spaces with byte_fallback); llama.cpp has no "
                     "tokenizer for it")


def _vocab(data: dict, vocab_size: int, path: Path) -> tuple[list[str], dict[str, dict]]:
    """Token texts by id (padded to the model's vocab_size) and the added tokens by text."""
    vocab = dict(data["model"]["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for text, t in added.items():
        vocab[text] = t["id"]
    top = max(vocab.values()) + 1
    if top > vocab_size:
        raise ValueError(f"{path}: token id {top - 1} is outside the model's vocab_size "
                         f"{vocab_size} (config.json)")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for text, i in vocab.items():
        tokens[i] = text
    return tokens, added


def _types(tokens: list[str], data: dict, added: dict[str, dict], byte_pieces: bool) -> list[int]:
    known = set(data["model"]["vocab"]) | set(added)
    unk = data["model"].get("unk_token")
    types = []
    for i, text in enumerate(tokens):
        if text in added and added[text]["id"] == i:
            types.append(CONTROL if added[text].get("special") else USER_DEFINED)
        elif text not in known:
            types.append(UNUSED)  # padding up to vocab_size
        elif byte_pieces and _BYTE_PIECE.fullmatch(text):
            types.append(BYTE)
        elif text == unk:
            types.append(UNKNOWN)
        else:
            types.append(NORMAL)
    return types


def _merges(data: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]


def _write_bpe(writer, data: dict, path: Path, vocab_size: int, pre: str) -> dict[str, int]:
    tokens, added = _vocab(data, vocab_size, path)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(_types(tokens, data, added, byte_pieces=False))
    writer.add_token_merges(_merges(data))
    return {t: i for i, t in enumerate(tokens)}


def _adds_space_prefix(data: dict) -> bool:
    """SentencePiece's "add dummy prefix": a Prepend("▁") normalizer, or a Metaspace
    pre-tokenizer that prepends."""
    for c in _components(data.get("normalizer")):
        if c.get("type") == "Prepend" and c.get("prepend") == "▁":
            return True
    for c in _components(data.get("pre_tokenizer")):
        if c.get("type") == "Metaspace":
            return c.get("prepend_scheme", "always") != "never" and c.get("add_prefix_space",
                                                                          True)
    return False


def _write_sentencepiece(writer, data: dict, path: Path, vocab_size: int) -> dict[str, int]:
    tokens, added = _vocab(data, vocab_size, path)
    types = _types(tokens, data, added, byte_pieces=True)
    rank: dict[str, int] = {}
    for r, merge in enumerate(_merges(data)):
        left, right = merge.split(" ", 1)
        rank.setdefault(left + right, r)
    unreachable = len(rank)
    scores = [-1000.0 if t in (CONTROL, USER_DEFINED, UNUSED) else 0.0 if t in (BYTE, UNKNOWN)
              else -float(rank.get(text, unreachable + i))
              for i, (text, t) in enumerate(zip(tokens, types))]
    # llama.cpp matches user-defined tokens in raw text, where spaces are still spaces
    listed = [text.replace("▁", " ") if t == USER_DEFINED else text
              for text, t in zip(tokens, types)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(listed)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(data))
    return {t: i for i, t in enumerate(tokens)}


def _template_ends(data: dict) -> tuple[str | None, str | None]:
    """The special tokens the post-processor puts before and after a single text."""
    post = data.get("post_processor") or {}
    for c in _components(post) + [p for p in post.get("processors", [])]:
        if c.get("type") == "TemplateProcessing":
            single = c.get("single", [])
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            return first, last
    return None, None


def _special_ids(writer, folder: Path, data: dict, vocab: dict[str, int]) -> None:
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    def token_id(value):
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if value is not None else None

    first, last = _template_ends(data)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        i = token_id(cfg.get(key))
        if i is not None:
            add(i)
    # transformers 5 often leaves add_bos_token out of tokenizer_config.json: the
    # post-processor template says what encode() adds.
    writer.add_add_bos_token(bool(cfg.get("add_bos_token", first is not None)))
    writer.add_add_eos_token(bool(cfg.get("add_eos_token", last is not None)))
    eot = _end_of_turn(folder, token_id(cfg.get("eos_token")))
    if eot is not None:
        writer.add_eot_token_id(eot)
    template = folder_template(folder, cfg)
    named = _named_templates(folder)
    if named and isinstance(template, str):   # llama.cpp reads tokenizer.chat_template.<name>
        template = [{"name": "default", "template": template}, *named]
    if template:
        writer.add_chat_template(template)


def folder_template(folder: Path, cfg: dict | None = None) -> str | list | None:
    """The folder's chat template as transformers 5 reads it: chat_template.jinja first (a
    merge writes the adapter's there), else tokenizer_config.json's `chat_template`."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():   # a downloaded folder's link to /etc would land in the shared GGUF
        return read_template_file(jinja, folder)
    if cfg is None:
        path = folder / "tokenizer_config.json"
        cfg = json.loads(path.read_text()) if path.is_file() else {}
    return cfg.get("chat_template")


def _named_templates(folder: Path) -> list[dict]:
    """transformers' additional_chat_templates/<name>.jinja (a model's tool_use template)."""
    extra = folder / "additional_chat_templates"
    return [{"name": p.stem, "template": read_template_file(p, folder)}
            for p in sorted(extra.glob("*.jinja"))] if extra.is_dir() else []


def _end_of_turn(folder: Path, eos: int | None) -> int | None:
    """The generation config's first stop id other than eos (Gemma's <end_of_turn>, Llama 3's
    <|eot_id|>), which llama.cpp then also stops at."""
    path = folder / "generation_config.json"
    ids = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    ids = ids if isinstance(ids, list) else [ids]
    others = [i for i in ids if i is not None and i != eos]
    return others[0] if others else None


def add_tokenizer(writer, folder: Path, vocab_size: int, source: Path | None = None,
                  pre: str | None = None) -> str:
    """Write the tokenizer keys; returns the tokenizer model written ('gpt2', 'llama', or
    'copied' from a source GGUF)."""
    source = source or source_gguf(folder)
    if source is not None and pre is None:
        own = folder_template(folder)
        _copy_fields(writer, source, own if isinstance(own, str) else None)
        return "copied"
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no tokenizer.json (and no source GGUF) to take the "
                         "tokenizer from")
    data = json.loads(path.read_text(encoding="utf-8"))
    kind = tokenizer_kind(data, path)
    if kind == "gpt2":
        from loratune.export.gguf_pretokenizer import CANDIDATES, detect_pre

        if pre is not None and pre not in CANDIDATES:
            raise ValueError(f"--tokenizer-pre {pre!r}: choose one of {', '.join(CANDIDATES)}")
        vocab = _write_bpe(writer, data, path, vocab_size, pre or detect_pre(path))
    else:
        if pre is not None:
            raise ValueError(f"--tokenizer-pre {pre!r}: {path} is a SentencePiece-style "
                             "tokenizer, which has no pre-tokenizer to choose")
        vocab = _write_sentencepiece(writer, data, path, vocab_size)
    _special_ids(writer, folder, data, vocab)
    return kind
