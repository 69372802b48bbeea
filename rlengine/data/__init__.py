"""Data: loading preference, ranked and prompt-only data, and tokenizing it."""

from rlengine.data.types import PreferencePair, PromptExample, RankedExample, Source

__all__ = ["PreferencePair", "PromptExample", "RankedExample", "Source"]
