"""Records as people keep them: data files, globs of them, Hugging Face `datasets` folders and
Hub ids, with dataset columns renamed to ours (`data.columns`) and a record filter
(`data.filter`: data/record_filter.py).

What a `data.train` / `data.eval` string names, in this order:
- a glob (`shards/*.parquet`): every matching file, in path order;
- a folder written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict: `data.split`);
- an `.arrow` file (as `datasets` writes them);
- any other existing path, or a name with a file suffix: our own readers (formats.py), which
  give line numbers;
- otherwise a Hub id (`owner/name`), loaded through `datasets` when online or from its local
  cache (HF_DATASETS_OFFLINE=1 never touches the network).

Every record comes with where it is, for errors: `file.jsonl:12`, `ds (split test)[3]`.
`datasets` memory-maps Arrow data, so a record is read only when it is asked for.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from loratune.config import DataConfig
from loratune.data.errors import DataError
from loratune.data.formats import iter_indexed, locate
from loratune.data.record_filter import load_filter

GLOB_CHARS = re.compile(r"[*?\[]")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # save_to_disk: DatasetDict, Dataset


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading Hugging Face datasets (save_to_disk folders, .arrow files, Hub "
                        "ids) needs the `datasets` package: pip install 'datasets>=3'") from None
    return datasets


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS)


def is_dataset_source(spec: str) -> bool:
    """Whether `spec` needs this module rather than a plain file reader: a glob, a saved
    dataset, an .arrow file or a Hub id."""
    path = Path(spec)
    if is_glob(spec) or is_saved_dataset(path) or path.suffix.lower() == ".arrow":
        return True
    return _is_hub_id(spec)


def _is_hub_id(spec: str) -> bool:
    """owner/name, where no such path exists here and `owner` is no local folder (then a
    missing file is what was meant, and our readers say so)."""
    path = Path(spec)
    return (HUB_ID.fullmatch(spec) is not None and not path.suffix and not path.exists()
            and not path.parent.is_dir())


def _pick_split(loaded, name: str, split: str):
    """The split of a DatasetDict (a plain Dataset has only one)."""
    if not hasattr(loaded, "keys"):
        return loaded, name
    if split not in loaded:
        raise DataError(f"{name}: no split '{split}' (data.split / data.eval_split); its splits: "
                        f"{', '.join(loaded)}")
    return loaded[split], f"{name} (split {split})"


def _open_dataset(spec: str, split: str):
    """(datasets.Dataset, its name for errors) of a saved folder, an .arrow file or a Hub id."""
    datasets = _datasets()
    path = Path(spec)
    if is_saved_dataset(path):
        return _pick_split(datasets.load_from_disk(str(path)), spec, split)
    if path.suffix.lower() == ".arrow":
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        try:
            return datasets.Dataset.from_file(str(path)), spec
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(f"{path}: not an Arrow stream file as `datasets` writes them "
                            f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return _open_hub(spec, split)


def _open_hub(spec: str, split: str):
    datasets = _datasets()
    try:
        return datasets.load_dataset(spec, split=split), f"{spec} (split {split})"
    except Exception as err:  # noqa: BLE001 - network, cache and name errors all end here
        offline = datasets.config.HF_HUB_OFFLINE
        why = ("offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and not in the local cache"
               if offline else f"{type(err).__name__}: {str(err).splitlines()[0]}")
        raise DataError(f"{spec}: not a local file or folder, and the Hugging Face Hub dataset "
                        f"'{spec}' split '{split}' could not be loaded: {why}") from None


def _dataset_records(spec: str, split: str, columns: dict[str, str]):
    dataset, name = _open_dataset(spec, split)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(f"{name}: no column {', '.join(map(repr, missing))} (data.columns); "
                        f"its columns: {', '.join(dataset.column_names)}")
    if len(dataset) == 0:
        raise DataError(f"{name}: the dataset is empty (no records)")
    for index, record in enumerate(dataset):
        yield f"{name}[{index}]", record


def is_glob(spec: str) -> bool:
    return GLOB_CHARS.search(spec) is not None


def glob_files(spec: str) -> list[str]:
    """The files a pattern matches, in path order (`**` spans folders)."""
    files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files:
        raise DataError(f"{spec}: no files match this pattern")
    return files


def _glob_records(spec: str, cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    for file in glob_files(spec):
        yield from _raw_records(file, cfg)


def _raw_records(spec: str, cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    if is_glob(spec):
        yield from _glob_records(spec, cfg)
    elif is_dataset_source(spec):
        yield from _dataset_records(spec, cfg.split, cfg.columns)
    else:
        for index, record in iter_indexed(spec):
            yield locate(spec, index), record


def _renamed(record: dict, columns: dict[str, str], where: str, check: bool) -> dict:
    """The record with its columns renamed to ours; `check`: say so when one is absent."""
    if check:
        missing = [c for c in columns if c not in record]
        if missing:
            raise DataError(f"{where}: no column {', '.join(map(repr, missing))} (data.columns); "
                            f"its columns: {', '.join(record)}")
    out = {k: v for k, v in record.items() if k not in columns}
    out.update({ours: record[theirs] for theirs, ours in columns.items() if theirs in record})
    return out


def _kept(keep: Callable[[dict], bool], record: dict, where: str, ref: str) -> bool:
    try:
        verdict = keep(record)
    except DataError as err:  # an expression's error: which record it met
        raise DataError(f"{where}: {err}") from None
    if not isinstance(verdict, bool):
        raise DataError(f"{where}: data.filter {ref} returned {type(verdict).__name__}; "
                        "expected True (keep) or False (leave out)")
    return verdict


def iter_records(spec: str, cfg: DataConfig,
                 left_out: dict[str, int] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, record) of every record `spec` names, columns renamed by data.columns, those
    data.filter refuses left out (counted in `left_out` under a note saying why)."""
    keep = load_filter(cfg.filter) if cfg.filter else None
    note = f"left out by data.filter {cfg.filter}"
    for n, (where, record) in enumerate(_raw_records(spec, cfg)):
        if cfg.columns:
            record = _renamed(record, cfg.columns, where, check=n == 0)
        if keep is not None and not _kept(keep, record, where, cfg.filter):
            if left_out is not None:
                left_out[note] = left_out.get(note, 0) + 1
            continue
        yield where, record


def held_out_config(cfg: DataConfig) -> DataConfig:
    """The data settings for reading data.eval: its split is data.eval_split."""
    return cfg.model_copy(update={"split": cfg.eval_split})
