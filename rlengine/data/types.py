"""The examples every data source (files, datasets, the built-in synthetic task) produces, and
the trainers consume. Text fields are either plain strings or conversational message lists
(``[{"role": ..., "content": ...}, ...]``) that the tokenizer's chat template renders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

Message = dict[str, str]
Text = Union[str, list[Message]]


@dataclass(frozen=True)
class Source:
    """Where an example came from, for error messages and provenance: a file and its 1-based
    row (line for jsonl), or a dataset name and its 0-based index."""

    name: str
    row: int

    def __str__(self) -> str:
        return f"{self.name}:{self.row}"


@dataclass
class PreferencePair:
    """One comparison: ``chosen`` was preferred to ``rejected`` as answers to ``prompt``.

    ``prompt`` is None when the texts are full transcripts that carry it themselves (split off by
    the loader where it can, see rlengine.data). ``margin`` is the optional margin column of the
    BT loss. ``extra`` keeps any other columns (e.g. strength mu/sigma written by
    `rlengine strength`, or the synthetic task's gold rewards and flip flags)."""

    prompt: Text | None
    chosen: Text
    rejected: Text
    margin: float | None = None
    source: Source | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RankedExample:
    """RRHF's unit: k responses to one prompt with a score each (higher is better)."""

    prompt: Text
    responses: list[Text]
    scores: list[float]
    source: Source | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptExample:
    """A prompt alone: the input of PPO rollouts and of MetaRM's policy samples."""

    prompt: Text
    source: Source | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Demonstration:
    """An SFT example: a response to imitate after ``prompt``. ``prompt`` is None when the
    response is a whole text with no prompt (language modeling on all of it but its first
    token). ``extra`` keeps any other columns."""

    prompt: Text | None
    response: Text
    source: Source | None = None
    extra: dict[str, Any] = field(default_factory=dict)
