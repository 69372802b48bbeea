"""Loading preference pairs, ranked responses and prompts from files and `datasets` objects.

Accepted sources (see rlengine.data.sources): .jsonl / .jsonl.gz / .ndjson, .json / .json.gz
(a list of rows, ``{"data": [...]}``, or JSON lines under a .json name), .parquet, a folder
written by ``save_to_disk``, a ``datasets.Dataset`` / ``DatasetDict`` (choose with ``split=``
when it has several), or a list of dicts.

Text fields are plain strings or conversations (lists of ``{"role", "content"}`` dicts, other
keys kept for the chat template). How the prompt is found, in order:

1. a prompt field: the responses are what follows it. With conversations, a response that
   repeats the whole prompt conversation at its start has that copy removed;
2. no prompt field, conversations: the prompt is the messages all responses start with
   (TRL's implicit-prompt format); each response must then start with an assistant turn;
3. no prompt field, HH-RLHF transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``): the
   prompt is everything up to and including the last ``"\\n\\nAssistant:"`` all of them
   share, the responses the rest (see rlengine.data.transcripts);
4. otherwise (plain texts with no prompt) a pair keeps ``prompt=None``: the texts are scored
   whole. Ranked and prompt-only rows need a prompt.

An empty (or blank) response string after a prompt is kept: the answer was nothing, as when
a policy stops at once (the synthetic task has such responses, and HH transcripts keep them
too). A prompt, and a text with no prompt before it, must not be empty.

When one field is a conversation and another a plain string, the string is promoted to one
message: a prompt to a user turn, a response to an assistant turn.

A malformed row raises DataFormatError naming the file and the row (files: 1-based line or
row; datasets: 0-based index). With ``on_error="skip"`` such rows are left out instead, and one
SkippedRowsWarning says how many and quotes the first. Errors about the whole source (missing
file, unknown format, a JSON file that is not valid as a whole) always raise."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any, TypeVar

from rlengine.data.sources import DataFormatError, RawRow, iter_rows
from rlengine.data.transcripts import is_hh_transcript, split_conversations, split_hh_transcripts
from rlengine.data.types import (
    Demonstration,
    Message,
    PreferencePair,
    PromptExample,
    RankedExample,
    Text,
)

__all__ = ["DataFormatError", "SkippedRowsWarning", "load_demonstrations", "load_preferences",
           "load_prompts", "load_ranked", "load_samples"]

Example = TypeVar("Example")


class SkippedRowsWarning(UserWarning):
    """Malformed rows were left out (``on_error="skip"``)."""


def load_preferences(source: Any, *, split: str | None = None, prompt_field: str = "prompt",
                     chosen_field: str = "chosen", rejected_field: str = "rejected",
                     margin_field: str = "margin", limit: int | None = None,
                     on_error: str = "raise") -> list[PreferencePair]:
    """Preference pairs ``{prompt?, chosen, rejected, margin?}``; other columns go to
    ``extra``. ``margin`` must be a finite number or absent/null."""
    known = {prompt_field, chosen_field, rejected_field, margin_field}

    def parse(row: _Row) -> PreferencePair:
        prompt = row.optional_text(prompt_field)
        chosen = row.text(chosen_field, response=True)
        rejected = row.text(rejected_field, response=True)
        margin = row.optional_number(margin_field)
        labels = [f"field {chosen_field!r}", f"field {rejected_field!r}"]
        prompt, (chosen, rejected) = row.resolve_prompt(prompt, [chosen, rejected], labels,
                                                        prompt_required=False)
        if prompt is None:
            # no prompt: each text is the whole sequence, and an empty one has nothing to score
            for label, text in zip(labels, (chosen, rejected)):
                if isinstance(text, str) and not text.strip():
                    raise row.error(f"{label} is empty text (and there is no prompt it answers)")
        return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=margin,
                              source=row.raw.source, extra=row.extra(known))

    return _load(source, split, limit, on_error, parse)


def load_ranked(source: Any, *, split: str | None = None, prompt_field: str = "prompt",
                responses_field: str = "responses", scores_field: str = "scores",
                limit: int | None = None, on_error: str = "raise") -> list[RankedExample]:
    """Ranked responses ``{prompt?, responses, scores}`` (RRHF): as many finite scores as
    responses, at least one of each. Without a prompt field the responses must be transcripts
    (HH text or conversations) that the prompt can be split from."""
    known = {prompt_field, responses_field, scores_field}

    def parse(row: _Row) -> RankedExample:
        prompt = row.optional_text(prompt_field)
        responses = row.responses(responses_field)
        scores = row.list_of(scores_field, row.number_value)
        if len(responses) != len(scores):
            raise row.error(f"{len(responses)} responses but {len(scores)} scores "
                            f"(fields {responses_field!r} and {scores_field!r} must have "
                            "equal lengths)")
        labels = [f"field {responses_field!r}, item {i + 1}" for i in range(len(responses))]
        prompt, responses = row.resolve_prompt(prompt, responses, labels, prompt_required=True,
                                               prompt_field=prompt_field)
        return RankedExample(prompt=prompt, responses=responses, scores=scores,
                             source=row.raw.source, extra=row.extra(known))

    return _load(source, split, limit, on_error, parse)


def load_samples(source: Any, *, split: str | None = None, prompt_field: str = "prompt",
                 responses_field: str = "responses", min_responses: int = 2,
                 limit: int | None = None, on_error: str = "raise") -> list[RankedExample]:
    """Unlabeled samples ``{prompt?, responses}``: several responses to one prompt with no
    scores, such as MetaRM's meta set (k samples of the current policy per prompt). Prompts are
    found as in load_ranked; a ``scores`` column, if present, is ignored (kept in ``extra``), so
    a ranked file loads too. Each row needs at least ``min_responses`` responses. The examples'
    ``scores`` are all 0.0: placeholders that carry no ranking."""
    if isinstance(min_responses, bool) or not isinstance(min_responses, int) \
            or min_responses < 1:
        raise ValueError(f"min_responses must be an int >= 1, got {min_responses!r}")
    known = {prompt_field, responses_field}

    def parse(row: _Row) -> RankedExample:
        prompt = row.optional_text(prompt_field)
        responses = row.responses(responses_field)
        if len(responses) < min_responses:
            raise row.error(f"field {responses_field!r} has {len(responses)} response(s); at "
                            f"least {min_responses} are needed")
        labels = [f"field {responses_field!r}, item {i + 1}" for i in range(len(responses))]
        prompt, responses = row.resolve_prompt(prompt, responses, labels, prompt_required=True,
                                               prompt_field=prompt_field)
        return RankedExample(prompt=prompt, responses=responses, scores=[0.0] * len(responses),
                             source=row.raw.source, extra=row.extra(known))

    return _load(source, split, limit, on_error, parse)


def load_prompts(source: Any, *, split: str | None = None, prompt_field: str = "prompt",
                 chosen_field: str = "chosen", rejected_field: str = "rejected",
                 limit: int | None = None, on_error: str = "raise") -> list[PromptExample]:
    """Prompts ``{prompt}`` (a string or a conversation). A row with no prompt field but
    transcripts in ``chosen`` (and ``rejected``), such as an HH-RLHF pair, gives the prompt they
    share. The transcript fields are consumed; other columns go to ``extra``."""
    known = {prompt_field, chosen_field, rejected_field}

    def parse(row: _Row) -> PromptExample:
        prompt = row.optional_text(prompt_field)
        if prompt is None:
            if row.get(chosen_field) is None:
                raise row.error(f"missing field {prompt_field!r} (and no {chosen_field!r} "
                                f"transcript to take the prompt from); {row.fields_present()}")
            transcripts = [row.text(chosen_field)]
            if row.get(rejected_field) is not None:
                transcripts.append(row.text(rejected_field))
            labels = [f"field {chosen_field!r}", f"field {rejected_field!r}"][:len(transcripts)]
            prompt, _ = row.resolve_prompt(None, transcripts, labels, prompt_required=True,
                                           prompt_field=prompt_field)
        return PromptExample(prompt=prompt, source=row.raw.source, extra=row.extra(known))

    return _load(source, split, limit, on_error, parse)


def load_demonstrations(source: Any, *, split: str | None = None, prompt_field: str = "prompt",
                        response_fields: tuple[str, ...] = ("response", "completion"),
                        chosen_field: str = "chosen", rejected_field: str = "rejected",
                        messages_field: str = "messages", text_field: str = "text",
                        limit: int | None = None, on_error: str = "raise",
                        ) -> list[Demonstration]:
    """SFT demonstrations, from the first of these row layouts that fits:

    - ``{prompt?, response}`` or ``{prompt?, completion}`` (TRL's prompt-completion), texts or
      conversations;
    - ``{prompt?, chosen, rejected?}`` preference pairs: the chosen response. The prompt is
      found from both sides as load_preferences finds it, so that on HH-RLHF transcripts an
      SFT policy and a reward model trained on one file see the same prompts;
    - ``{messages}``: one conversation (TRL's conversational format); the prompt is everything
      before its final run of assistant messages;
    - ``{text}``: an HH-RLHF transcript (the prompt ends at its last ``"\\n\\nAssistant:"``)
      or a conversation, split the same way; a plain text is trained whole.

    With no prompt field, an HH transcript or a conversation has its prompt split off; a plain
    response keeps ``prompt=None`` (trained whole). Other columns go to ``extra``."""
    known = {prompt_field, *response_fields, chosen_field, rejected_field, messages_field,
             text_field}

    def parse(row: _Row) -> Demonstration:
        prompt = row.optional_text(prompt_field)
        response_field = next((f for f in response_fields if row.get(f) is not None), None)
        if response_field is not None:
            texts = [row.text(response_field, response=True)]
            labels = [f"field {response_field!r}"]
        elif row.get(chosen_field) is not None:
            texts = [row.text(chosen_field, response=True)]
            labels = [f"field {chosen_field!r}"]
            if row.get(rejected_field) is not None:
                texts.append(row.text(rejected_field, response=True))
                labels.append(f"field {rejected_field!r}")
        elif row.get(messages_field) is not None:
            texts = [row.text(messages_field)]
            labels = [f"field {messages_field!r}"]
            if not isinstance(texts[0], list):
                raise row.error(f"field {messages_field!r} must be a list of messages, got a "
                                "string")
        elif row.get(text_field) is not None:
            texts = [row.text(text_field)]
            labels = [f"field {text_field!r}"]
        else:
            expected = ", ".join(repr(f) for f in (*response_fields, chosen_field,
                                                   messages_field, text_field))
            raise row.error(f"no response to train on: expected one of the fields {expected}; "
                            f"{row.fields_present()}")
        prompt, responses = row.resolve_prompt(prompt, texts, labels, prompt_required=False)
        response = responses[0]
        if prompt is None and isinstance(response, str) and not response.strip():
            raise row.error(f"{labels[0]} is empty text (and there is no prompt it answers)")
        return Demonstration(prompt=prompt, response=response, source=row.raw.source,
                             extra=row.extra(known))

    return _load(source, split, limit, on_error, parse)


def _load(source: Any, split: str | None, limit: int | None, on_error: str,
          parse: Callable[[_Row], Example]) -> list[Example]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    examples: list[Example] = []
    skipped: list[DataFormatError] = []
    if limit == 0:
        return examples
    for item in iter_rows(source, split=split):
        try:
            if isinstance(item, DataFormatError):
                raise item
            examples.append(parse(_Row(item)))
        except DataFormatError as error:
            if on_error == "raise":
                raise
            skipped.append(error)
        if limit is not None and len(examples) >= limit:
            break
    if skipped:
        warnings.warn(f"skipped {len(skipped)} malformed row(s); the first: {skipped[0]}",
                      SkippedRowsWarning, stacklevel=3)
    return examples


class _Row:
    """One raw row being interpreted; every complaint names its file and row."""

    def __init__(self, raw: RawRow):
        self.raw = raw
        if not isinstance(raw.data, Mapping):
            raise self.error(f"expected an object (a mapping of fields), got "
                             f"{type(raw.data).__name__}")
        self.data: Mapping[str, Any] = raw.data

    def error(self, what: str) -> DataFormatError:
        return DataFormatError(self.raw.where, what, self.raw.source)

    def get(self, field: str) -> Any:
        return self.data.get(field)

    def fields_present(self) -> str:
        return f"the row has {', '.join(map(repr, self.data)) or 'no fields'}"

    def extra(self, known: set[str]) -> dict[str, Any]:
        return {key: value for key, value in self.data.items() if key not in known}

    def text(self, field: str, *, response: bool = False) -> Text:
        if self.data.get(field) is None:
            what = "is null" if field in self.data else "is missing"
            raise self.error(f"field {field!r} {what}; {self.fields_present()}")
        return self.text_value(f"field {field!r}", self.data[field], response=response)

    def optional_text(self, field: str) -> Text | None:
        value = self.data.get(field)
        return None if value is None else self.text_value(f"field {field!r}", value)

    def optional_number(self, field: str) -> float | None:
        value = self.data.get(field)
        return None if value is None else self.number_value(f"field {field!r}", value)

    def responses(self, field: str) -> list[Text]:
        """A list of responses (an empty response is allowed, as in pairs)."""
        return self.list_of(field, lambda label, value: self.text_value(label, value,
                                                                          response=True))

    def list_of(self, field: str, parse_item: Callable[[str, Any], Any]) -> list[Any]:
        value = self.data.get(field)
        if value is None:
            what = "is null" if field in self.data else "is missing"
            raise self.error(f"field {field!r} {what}; {self.fields_present()}")
        if not isinstance(value, list):
            raise self.error(f"field {field!r} must be a list, got {type(value).__name__}")
        if not value:
            raise self.error(f"field {field!r} is an empty list")
        return [parse_item(f"field {field!r}, item {i + 1}", item) for i, item in enumerate(value)]

    def text_value(self, label: str, value: Any, *, response: bool = False) -> Text:
        """A string or a message list. ``response``: an empty string is allowed (the caller
        checks that a prompt comes before it)."""
        if isinstance(value, str):
            if not value.strip() and not response:
                raise self.error(f"{label} is empty text")
            return value
        if isinstance(value, list):
            if not value:
                raise self.error(f"{label} is an empty list of messages")
            return [self.message(label, i, item) for i, item in enumerate(value)]
        raise self.error(f"{label} must be a string or a list of messages, "
                         f"got {type(value).__name__}")

    def message(self, label: str, index: int, value: Any) -> Message:
        where = f"{label}, message {index + 1}"
        if not isinstance(value, Mapping):
            raise self.error(f"{where} must be a dict with 'role' and 'content', "
                             f"got {type(value).__name__}")
        for key in ("role", "content"):
            if key not in value:
                raise self.error(f"{where} has no {key!r} key (it has "
                                 f"{', '.join(map(repr, value)) or 'none'})")
            if not isinstance(value[key], str):
                raise self.error(f"{where}: {key!r} must be a string, "
                                 f"got {type(value[key]).__name__}")
        if not value["role"].strip():
            raise self.error(f"{where}: 'role' is empty")
        return dict(value)

    def number_value(self, label: str, value: Any) -> float:
        # bool is an int to Python but never a margin or a score
        if isinstance(value, bool) or not isinstance(value, Real):
            raise self.error(f"{label} must be a number, got {type(value).__name__} {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise self.error(f"{label} must be finite, got {number}")
        return number

    def resolve_prompt(self, prompt: Text | None, responses: list[Text], labels: list[str], *,
                       prompt_required: bool, prompt_field: str = "prompt",
                       ) -> tuple[Any, list[Text]]:
        """(prompt, responses) after the rules of the module docstring."""
        if isinstance(prompt, list) or any(isinstance(response, list) for response in responses):
            return self._resolve_conversation(prompt, responses, labels, prompt_required)
        if prompt is None and any(is_hh_transcript(response) for response in responses):
            hh = [is_hh_transcript(response) for response in responses]
            if not all(hh):
                first_hh = labels[hh.index(True)]
                plain = ", ".join(label for label, is_hh in zip(labels, hh) if not is_hh)
                raise self.error(f"no prompt field, and {first_hh} holds an HH transcript "
                                 f"but {plain} does not")
            try:
                return split_hh_transcripts(responses)
            except ValueError as error:
                raise self.error(str(error)) from None
        if prompt is None and prompt_required:
            raise self.error(f"missing field {prompt_field!r}, and the texts are not HH "
                             f"transcripts or conversations to split it from; "
                             f"{self.fields_present()}")
        return prompt, responses

    def _resolve_conversation(self, prompt: Text | None, responses: list[Text],
                              labels: list[str], prompt_required: bool):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        responses = [[{"role": "assistant", "content": response}]
                     if isinstance(response, str) else response for response in responses]
        if prompt is None:
            try:
                prompt, responses = split_conversations(responses)
            except ValueError as error:
                raise self.error(str(error)) from None
            if not prompt:
                if prompt_required:
                    raise self.error("the conversations share no leading messages, so there "
                                     "is no prompt to split off")
                prompt = None
            return prompt, responses
        stripped = []
        for label, response in zip(labels, responses):
            if response[:len(prompt)] == prompt:
                response = response[len(prompt):]  # the full conversation, prompt included
                if not response:
                    raise self.error(f"{label} is the prompt conversation with no response")
            if response[0]["role"] != "assistant":
                raise self.error(f"{label} must start with an assistant message, "
                                 f"got role {response[0]['role']!r}")
            stripped.append(response)
        return prompt, stripped
