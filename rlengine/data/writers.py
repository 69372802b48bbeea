"""Writing preference pairs back to disk, in the format rlengine.data.load_preferences reads.

    write_preferences(pairs, "out/pairs.jsonl")       # or .jsonl.gz / .ndjson

One JSON object per line: ``{"prompt"?, "chosen", "rejected", "margin"?, **extra}``. A prompt
or margin that is None is left out (the loader reads a missing field as None); texts are
written as they are, plain strings or conversational message lists; every ``extra`` column is
kept. Pairs as the loaders return them read back equal (prompt, texts, margin and extra; the
``source`` becomes the new file and line). The file is written to a temporary name next to it
and renamed into place, so a reader never sees half a file and an interrupted write leaves any
previous file untouched."""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Iterable, Mapping
from numbers import Real
from pathlib import Path
from typing import Any

from rlengine.data.types import PreferencePair
from rlengine.files import atomic_write

__all__ = ["write_preferences"]

_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
_FIELDS = ("prompt", "chosen", "rejected", "margin")


def write_preferences(pairs: Iterable[PreferencePair], path: str | os.PathLike) -> Path:
    """Write ``pairs`` to ``path`` (.jsonl, .jsonl.gz or .ndjson; parent folders are created)
    and return it. Extra values must be JSON values (numpy and torch scalars are converted);
    non-finite numbers are refused, since strict JSON readers reject them. Raises ValueError
    naming the pair and column that cannot be written."""
    path = Path(path)
    if not path.name.lower().endswith(_SUFFIXES):
        raise ValueError(f"{path}: write_preferences writes JSON lines; the name must end with "
                         f"{', '.join(_SUFFIXES)}")

    def write(temporary: Path) -> None:
        # "xb" rather than mkstemp, so the file gets the usual umask permissions
        with open(temporary, "xb") as raw:
            # mtime=0 and no stored name: the same pairs give the same bytes
            stream = (gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
                      if path.name.lower().endswith(".gz") else raw)
            for index, pair in enumerate(pairs):
                stream.write(_line(pair, index))
            if stream is not raw:
                stream.close()  # writes the gzip trailer; raw stays open

    return atomic_write(path, write)


def _line(pair: PreferencePair, index: int) -> bytes:
    if not isinstance(pair, PreferencePair):
        raise ValueError(f"pair {index}: expected a PreferencePair, got {type(pair).__name__}")
    where = f"pair {index}" + (f" ({pair.source})" if pair.source is not None else "")
    row: dict[str, Any] = {}
    if pair.prompt is not None:
        row["prompt"] = pair.prompt
    row["chosen"] = pair.chosen
    row["rejected"] = pair.rejected
    if pair.margin is not None:
        row["margin"] = pair.margin
    for key, value in pair.extra.items():
        if key in _FIELDS:
            raise ValueError(f"{where}: extra column {key!r} would overwrite the pair's own "
                             f"{key!r} field")
        if not isinstance(key, str):
            raise ValueError(f"{where}: extra column name {key!r} is not a string")
        row[key] = value
    for key, value in row.items():
        _check_value(value, f"{where}, column {key!r}")
    try:
        text = json.dumps(row, ensure_ascii=False, allow_nan=False, default=_plain)
        return (text + "\n").encode("utf-8")
    except (TypeError, ValueError) as error:  # UnicodeEncodeError (lone surrogates) included
        raise ValueError(f"{where}: cannot be written as JSON ({error})") from None


def _check_value(value: Any, where: str) -> None:
    """Non-finite floats anywhere in a column (json.dumps's own error does not say where)."""
    if isinstance(value, Real) and not isinstance(value, (bool, int)):
        if not math.isfinite(float(value)):
            raise ValueError(f"{where} is {value}: not a finite number (strict JSON has none)")
    elif isinstance(value, Mapping):
        for item in value.values():
            _check_value(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_value(item, where)


def _plain(value: Any) -> Any:
    """numpy / torch scalars (anything with .item() and no length) as Python numbers."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return item()
    raise TypeError(f"{type(value).__name__} {value!r} is not a JSON value")
