"""Reading raw rows (one dict per example) from wherever the data lives: JSON lines, JSON,
parquet, a folder written by `datasets`' save_to_disk, a `datasets` object or a list of dicts.

Every row comes with its `Source` and a human-readable location ("data.jsonl, line 3"), so
that whatever goes wrong with it later can name the file and the row. Files count rows from 1
(lines for JSON lines, elements for JSON, rows for parquet), as an editor does; `datasets`
objects and lists count from 0, as their own indexing does."""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlengine.data.types import Source

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
JSON_SUFFIXES = (".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)


class DataFormatError(ValueError):
    """A row (or a whole file) that is not in a format the loaders accept. The message names
    the file and the row; `where` and `what` hold the two parts separately."""

    def __init__(self, where: str, what: str, source: Source | None = None):
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what
        self.source = source


class MissingDataError(DataFormatError, FileNotFoundError):
    """A data file or folder that does not exist: a DataFormatError (the commands report it in
    one line, like any other bad data) that is also the FileNotFoundError callers expect."""

    def __init__(self, path: Path):
        DataFormatError.__init__(self, str(path), "no such data file or folder")
        self.filename = str(path)

    def __str__(self) -> str:  # OSError's own would print "[Errno None] None"
        return f"{self.where}: {self.what}"


@dataclass(frozen=True)
class RawRow:
    """One row as read, before it is interpreted as an example."""

    source: Source
    where: str
    data: Any


def iter_rows(source: Any, *, split: str | None = None) -> Iterator[RawRow | DataFormatError]:
    """Yield the rows of `source`; a row that cannot even be read (invalid JSON on one line)
    is yielded as its DataFormatError so that the caller decides whether to raise or skip it.
    Errors about the whole source (a missing file, an unknown format) are raised at once."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            yield from _iter_dataset(_load_from_disk(path), str(path), split)
            return
        if not path.exists():
            raise MissingDataError(path)
        if split is not None:
            raise ValueError(f"split={split!r} applies to datasets and save_to_disk folders, "
                             f"not to the file {path}")
        name = path.name.lower()
        if name.endswith(JSONL_SUFFIXES):
            yield from _iter_json_lines(path)
        elif name.endswith(JSON_SUFFIXES):
            yield from _iter_json(path)
        elif name.endswith(PARQUET_SUFFIXES):
            yield from _iter_parquet(path)
        else:
            raise DataFormatError(
                str(path), f"unknown data format; expected one of "
                f"{', '.join(JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES)} "
                "or a folder written by datasets' save_to_disk")
        return
    if _is_datasets_object(source):
        yield from _iter_dataset(source, _dataset_name(source), split)
        return
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        if split is not None:
            raise ValueError(f"split={split!r} applies to datasets, not to a list of rows")
        for index, row in enumerate(source):
            yield RawRow(Source("rows", index), f"rows[{index}]", row)
        return
    raise TypeError(
        "source must be a path (.jsonl, .jsonl.gz, .json, .json.gz, .parquet, or a save_to_disk "
        f"folder), a datasets.Dataset / DatasetDict, or a list of dicts; got {type(source)!r}")


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_json_lines(path: Path) -> Iterator[RawRow | DataFormatError]:
    line_number = 0
    try:
        with _open_text(path) as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue  # blank lines (a trailing newline, say) are not rows
                where = f"{path}, line {line_number}"
                try:
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as error:
                    yield DataFormatError(
                        where, f"invalid JSON: {error.msg} (column {error.colno})",
                        Source(str(path), line_number))
                    continue
                yield RawRow(Source(str(path), line_number), where, row)
    except (UnicodeDecodeError, OSError, EOFError) as error:
        # a corrupt or truncated .gz, or bytes that are not UTF-8: the file cannot be read on
        raise DataFormatError(f"{path}, line {line_number + 1}",
                              f"unreadable ({type(error).__name__}: {error})") from error


def _iter_json(path: Path) -> Iterator[RawRow | DataFormatError]:
    try:
        with _open_text(path) as file:
            text = file.read()
    except (UnicodeDecodeError, OSError, EOFError) as error:
        raise DataFormatError(str(path), f"unreadable ({type(error).__name__}: {error})") from error
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        # `Dataset.to_json` writes JSON lines under a .json name: one object, then more data
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _iter_json_lines(path)
            return
        raise DataFormatError(f"{path}, line {error.lineno}",
                              f"invalid JSON: {error.msg} (column {error.colno})") from error
    if isinstance(document, Mapping) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DataFormatError(str(path), "expected a JSON list of rows or an object "
                                         f'{{"data": [...]}}, got {type(document).__name__}')
    for row_number, row in enumerate(document, start=1):
        yield RawRow(Source(str(path), row_number), f"{path}, row {row_number}", row)


def _iter_parquet(path: Path) -> Iterator[RawRow | DataFormatError]:
    import pyarrow
    import pyarrow.parquet

    try:
        file = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataFormatError(str(path), f"not a readable parquet file: {error}") from error
    row_number = 0
    # in batches, so that `limit` on a large file reads only what it needs
    for batch in file.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_number += 1
            yield RawRow(Source(str(path), row_number), f"{path}, row {row_number}",
                         _drop_arrow_nulls(row))


def _is_dataset_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_from_disk(path: Path):
    import datasets

    if not _is_dataset_folder(path):
        raise ValueError(f"{path} is a folder but not one written by datasets' save_to_disk "
                         "(no state.json or dataset_dict.json in it)")
    return datasets.load_from_disk(str(path))


def _is_datasets_object(source: Any) -> bool:
    # Only an imported `datasets` can have made the object; checking sys.modules keeps plain
    # file loading from paying the second or so that importing datasets costs.
    datasets = sys.modules.get("datasets")
    if datasets is None:
        return False
    kinds = (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset,
             datasets.IterableDatasetDict)
    return isinstance(source, kinds)


def _dataset_name(dataset: Any) -> str:
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None) if info is not None else None
    return f"Dataset({name})" if name else "Dataset"


def _iter_dataset(dataset: Any, name: str, split: str | None) -> Iterator[RawRow]:
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(dataset.keys())
        if split is None:
            if len(splits) != 1:
                raise ValueError(f"{name} has splits {splits}: pass split= to choose one")
            split = splits[0]
        if split not in dataset:
            raise ValueError(f"{name} has no split {split!r}; its splits are {splits}")
        dataset = dataset[split]
        name = f"{name}[{split}]"
    elif split is not None:
        raise ValueError(f"split={split!r} given, but {name} is a single split, not a DatasetDict")
    for index, row in enumerate(dataset):
        yield RawRow(Source(name, index), f"{name}, index {index}", _drop_arrow_nulls(row))


def _drop_arrow_nulls(value: Any) -> Any:
    """Arrow stores a list of message dicts as a list of structs with the union of all keys, so
    a message read back carries None for every key it never had (``"name": None``). Dropping
    None values inside messages gives back the dicts that were written; top-level None values
    stay (a None margin means "no margin")."""
    if isinstance(value, dict):
        return {key: _drop_nulls_in_messages(item) for key, item in value.items()}
    return value


def _drop_nulls_in_messages(value: Any) -> Any:
    if isinstance(value, list):
        return [_drop_nulls_in_messages(item) for item in value]
    if isinstance(value, dict):
        return {key: _drop_nulls_in_messages(item) for key, item in value.items()
                if item is not None}
    return value
