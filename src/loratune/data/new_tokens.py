"""New tokens (data.add_tokens / data.add_special_tokens): added to the tokenizer before the
data is encoded, the model's embeddings (and an untied output layer) grown to match, each new
row started as the mean of the existing rows or of the rows of a given text's tokens
(data.new_token_init), as Hewitt's "Initializing new word embeddings" advises.

The rows train through `adapter.modules_to_save` (the whole matrices, PEFT's layout for them),
and the adapter folder gets the tokenizer, so PEFT's own flow (tokenizer from the adapter
folder, `base.resize_token_embeddings(len(tokenizer))`, `PeftModel.from_pretrained`) loads it
with the same logits, and `loratune merge` writes the grown matrices with that tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from loratune.config import DataConfig
from loratune.data.errors import DataError

NEW_TOKENS_FILE = "new_tokens.json"  # beside the adapter: the tokens it adds, their ids
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


def wanted(cfg: DataConfig) -> list[str]:
    return [*cfg.add_tokens, *cfg.add_special_tokens]


def add_new_tokens(model, tokenizer, cfg: DataConfig) -> list[int]:
    """Add cfg's tokens to `tokenizer`, grow and initialise `model`'s rows; their ids."""
    if not wanted(cfg):
        return []
    known = [t for t in wanted(cfg) if t in tokenizer.get_vocab()]
    if known:
        raise DataError(f"data.add_tokens/add_special_tokens: {known} already in the tokenizer")
    # the init texts in the old vocabulary: a text may contain a token being added
    init_ids = {tok: _ids_of(tokenizer, tok, text) for tok, text in cfg.new_token_init.items()}
    n_old = len(tokenizer)
    tokenizer.add_tokens(list(cfg.add_tokens))
    tokenizer.add_tokens(list(cfg.add_special_tokens), special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(wanted(cfg))
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for matrix in _matrices(model):
        _init_rows(matrix, dict(zip(wanted(cfg), ids)), init_ids, n_old)
    return ids


def _ids_of(tokenizer, token: str, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"data.new_token_init[{token!r}]: {text!r} has no tokens")
    return ids


def _matrices(model) -> list[torch.Tensor]:
    """The input embedding and, when not tied to it, the output layer's weight."""
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    return [inp] if out is None or out.weight is inp else [inp, out.weight]


@torch.no_grad()
def _init_rows(weight: torch.Tensor, new: dict[str, int], init_ids: dict[str, list[int]],
               n_old: int) -> None:
    mean = weight[:n_old].float().mean(0)
    for token, row in new.items():
        source = weight[init_ids[token]].float().mean(0) if token in init_ids else mean
        weight[row] = source.to(weight.dtype)


def check_trainable(cfg_modules: list[str], model) -> None:
    """New rows must train and be saved: the embedding (and untied output) in modules_to_save."""
    need = [_name_of(model, model.get_input_embeddings())]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        need.append(_name_of(model, out))
    missing = [n for n in need if n not in cfg_modules]
    if missing:
        raise DataError(f"data.add_tokens: the new rows train and are saved through "
                        f"adapter.modules_to_save; add {missing} to it (now {cfg_modules})")


def _name_of(model, module) -> str:
    return next(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is module)


def save_tokenizer(tokenizer, adapter_dir: str | Path, cfg: DataConfig) -> None:
    """The tokenizer with its new tokens into the adapter folder (file by file atomically), and
    NEW_TOKENS_FILE naming them for the consumers that must carry or refuse them."""
    adapter_dir = Path(adapter_dir)
    with tempfile.TemporaryDirectory(dir=adapter_dir, prefix=".tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        record = {"tokens": wanted(cfg), "ids": tokenizer.convert_tokens_to_ids(wanted(cfg)),
                  "special": list(cfg.add_special_tokens), "vocab_size": len(tokenizer)}
        (Path(tmp) / NEW_TOKENS_FILE).write_text(json.dumps(record, indent=1) + "\n")
        for item in Path(tmp).iterdir():
            os.replace(item, adapter_dir / item.name)


def new_tokens_of(folder: str | Path) -> dict | None:
    """An adapter folder's NEW_TOKENS_FILE ({tokens, ids, vocab_size}), or None."""
    path = Path(folder) / NEW_TOKENS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def copy_tokenizer(adapter_dir: str | Path, out: Path) -> None:
    """The adapter folder's tokenizer files over those in `out` (a model folder being written)."""
    for name in TOKENIZER_FILES:
        if (Path(adapter_dir) / name).is_file():
            shutil.copy2(Path(adapter_dir) / name, out / name)


def grow_for_adapter(model, tokenizer, folder: str | Path) -> None:
    """Before an adapter that adds tokens loads: the model's embeddings grown to its vocabulary
    (its saved matrices then fill them) and its tokens added to `tokenizer` with the same ids;
    a tokenizer that gives other ids (another base's) is refused by name."""
    record = new_tokens_of(folder)
    if record is None:
        return
    if tokenizer is not None:
        special = set(record.get("special", []))
        fresh = [t for t in record["tokens"] if t not in tokenizer.get_vocab()]
        tokenizer.add_tokens([t for t in fresh if t not in special])
        tokenizer.add_tokens([t for t in fresh if t in special], special_tokens=True)
        ids = tokenizer.convert_tokens_to_ids(record["tokens"])
        if ids != record["ids"]:
            raise DataError(f"{folder}/{NEW_TOKENS_FILE}: its tokens {record['tokens']} had ids "
                            f"{record['ids']}; this tokenizer gives {ids} (another base's "
                            "tokenizer?): load the tokenizer saved in the adapter folder")
    if model.get_input_embeddings().weight.shape[0] < record["vocab_size"]:
        model.resize_token_embeddings(record["vocab_size"], mean_resizing=False)
