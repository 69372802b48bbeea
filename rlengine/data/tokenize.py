"""Tokenizing examples into prompt + response token ids, truncating them, and collating batches.

Rendering
    Conversations go through the tokenizer's chat template: the prompt rendered with
    ``add_generation_prompt=True`` (what a policy is given to generate from), the response as
    the rest of the rendered conversation (its turns close with the template's end-of-turn
    tokens; no EOS is added). Plain text is the prompt's ids (with a leading BOS if the
    tokenizer itself adds one) followed by the response's ids, plus EOS when ``add_eos`` and the
    tokenizer has one. Either way the sequence is ``prompt_ids + response_ids`` tokenized
    apart: the prompt ids are an exact prefix of the sequence, equal to what generation starts
    from, so log-probs and rewards can be indexed by `response_start`. A chat template whose
    rendered prompt is not a text prefix of the rendered conversation is refused.

Truncation (``max_length`` tokens in all, prompt and one response)
    Nothing is cut while ``len(prompt) + len(longest response) <= max_length``. Otherwise the
    prompt loses tokens from its left (its end, next to the response, stays) down to
    ``max_prompt_length`` tokens or down to what the longest response leaves free, whichever
    is more; then every response is cut from its right (its start stays) to fit. So
    ``max_prompt_length`` is the most of ``max_length`` a long prompt can claim from a long
    response (default ``max_length // 2``; it must be below ``max_length``, so each response
    keeps at least one token). The responses of one example share one cut prompt, so a reward
    model compares them on the same context. A response cut short loses its EOS: its score is
    then read at its last kept token. Prompt-only data keeps the last ``max_length`` tokens.

Demonstrations (SFT) are a prompt and one response, truncated by the same rule. A
demonstration with no prompt (a whole text) and a tokenizer that adds no BOS has its first
token as context: it cannot be predicted from nothing.

Collation pads to the longest sequence of the batch (chosen and rejected to one length, so
they can be concatenated into one forward pass) and returns, per side: ``input_ids``,
``attention_mask`` (0/1, long), ``response_mask`` (bool, true on response tokens) and
``last_index`` (the last real token, where a reward model reads its score)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlengine.data.types import (
    Demonstration,
    PreferencePair,
    PromptExample,
    RankedExample,
    Source,
    Text,
)

__all__ = ["DemonstrationDataset", "PreferenceDataset", "PromptDataset", "RankedDataset",
           "TokenizedDemonstration", "TokenizedPair", "TokenizedPrompt", "TokenizedRanked",
           "TokenizedSequence", "TruncationStats", "collate_demonstrations", "collate_pairs",
           "collate_prompts", "collate_ranked", "pad_token_id", "tokenize_demonstration",
           "tokenize_pair", "tokenize_prompt", "tokenize_ranked"]


@dataclass
class TokenizedSequence:
    """Prompt + one response: ``input_ids[:response_start]`` is the prompt."""

    input_ids: list[int]
    response_start: int
    prompt_tokens_cut: int = 0
    response_tokens_cut: int = 0

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.response_start


@dataclass
class TokenizedPair:
    chosen: TokenizedSequence
    rejected: TokenizedSequence
    margin: float | None = None
    index: int = 0  # position in the list of pairs it was made from
    source: Source | None = None

    @property
    def truncated(self) -> bool:
        return _any_cut([self.chosen, self.rejected])


@dataclass
class TokenizedRanked:
    responses: list[TokenizedSequence]
    scores: list[float]
    index: int = 0
    source: Source | None = None

    @property
    def truncated(self) -> bool:
        return _any_cut(self.responses)


@dataclass
class TokenizedDemonstration:
    sequence: TokenizedSequence
    index: int = 0
    source: Source | None = None

    @property
    def truncated(self) -> bool:
        return _any_cut([self.sequence])


@dataclass
class TokenizedPrompt:
    input_ids: list[int]
    tokens_cut: int = 0
    index: int = 0
    source: Source | None = None

    @property
    def truncated(self) -> bool:
        return self.tokens_cut > 0


def _any_cut(sequences: Sequence[TokenizedSequence]) -> bool:
    return any(s.prompt_tokens_cut or s.response_tokens_cut for s in sequences)


@dataclass(frozen=True)
class TruncationStats:
    """How many examples truncation touched: any cut, prompt cut, some response cut."""

    examples: int
    truncated: int
    prompt_truncated: int
    response_truncated: int

    @classmethod
    def of(cls, items: Sequence[TokenizedPair | TokenizedRanked | TokenizedPrompt
                                | TokenizedDemonstration]) -> TruncationStats:
        prompt_cut = response_cut = truncated = 0
        for item in items:
            if isinstance(item, TokenizedPrompt):
                sequences_prompt_cut, sequences_response_cut = item.tokens_cut > 0, False
            else:
                if isinstance(item, TokenizedPair):
                    sequences = [item.chosen, item.rejected]
                elif isinstance(item, TokenizedDemonstration):
                    sequences = [item.sequence]
                else:
                    sequences = item.responses
                sequences_prompt_cut = any(s.prompt_tokens_cut for s in sequences)
                sequences_response_cut = any(s.response_tokens_cut for s in sequences)
            prompt_cut += sequences_prompt_cut
            response_cut += sequences_response_cut
            truncated += sequences_prompt_cut or sequences_response_cut
        return cls(len(items), truncated, prompt_cut, response_cut)

    def __str__(self) -> str:
        return (f"{self.truncated} of {self.examples} examples truncated "
                f"({self.prompt_truncated} prompts cut, {self.response_truncated} with a "
                "response cut)")


class _Encoder:
    """Turns (prompt, responses) into token ids for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: Any, *, add_eos: bool = True):
        self.tokenizer = tokenizer
        self.eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None \
            else []
        # Plain text keeps the BOS that the tokenizer itself puts before a text (Llama's, ours)
        # but nothing it may put after it: a prompt must not end with an EOS. The empty text
        # shows what it adds without depending on its vocabulary.
        bos = tokenizer.bos_token_id
        added = tokenizer("", add_special_tokens=True)["input_ids"]
        self.leading = [bos] if bos is not None and added[:1] == [bos] else []

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompt: Text | None, responses: Sequence[Text], where: str,
               ) -> tuple[list[int], list[list[int]]]:
        conversational = isinstance(prompt, list) or any(isinstance(r, list) for r in responses)
        if conversational:
            return self._encode_conversation(prompt, responses, where)
        prompt_ids = self.leading + (self.ids(prompt) if prompt is not None else [])
        responses_ids = [self.ids(response) + self.eos for response in responses]
        self._check_responses(responses_ids, where)
        return prompt_ids, responses_ids

    def encode_prompt(self, prompt: Text, where: str) -> list[int]:
        """The prompt alone, exactly as `encode` renders it before a response."""
        if isinstance(prompt, list):
            return self.ids(self.render(list(prompt), where, add_generation_prompt=True))
        return self.leading + self.ids(prompt)

    def _encode_conversation(self, prompt: Text | None, responses: Sequence[Text], where: str):
        def as_messages(text: Text | None, role: str) -> list[dict[str, Any]]:
            if text is None:
                return []
            return [{"role": role, "content": text}] if isinstance(text, str) else list(text)

        prompt_messages = as_messages(prompt, "user")
        prompt_text = self.render(prompt_messages, where, add_generation_prompt=True) \
            if prompt_messages else ""
        responses_ids = []
        for response in responses:
            full_text = self.render(prompt_messages + as_messages(response, "assistant"), where)
            if not full_text.startswith(prompt_text):
                raise ValueError(
                    f"{where}: the chat template does not render the prompt (with "
                    "add_generation_prompt=True) as a prefix of the whole conversation, so the "
                    "response's tokens cannot be told apart from the prompt's; use a template "
                    f"that does.\nprompt: {prompt_text!r}\nwhole:  {full_text!r}")
            responses_ids.append(self.ids(full_text[len(prompt_text):]))
        self._check_responses(responses_ids, where)
        return self.ids(prompt_text), responses_ids

    def render(self, messages: list[dict[str, Any]], where: str, *,
               add_generation_prompt: bool = False) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{where}: conversational data needs a tokenizer with a chat "
                             "template (train_text_tokenizer makes one with a template)")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    @staticmethod
    def _check_responses(responses_ids: list[list[int]], where: str) -> None:
        if any(not ids for ids in responses_ids):
            raise ValueError(f"{where}: a response has no tokens (empty text and no EOS)")


def _check_lengths(max_length: int | None, max_prompt_length: int | None) -> int | None:
    """The effective max_prompt_length (None when nothing is truncated)."""
    if max_length is None:
        if max_prompt_length is not None:
            raise ValueError("max_prompt_length is the prompt's share of max_length: "
                             "give max_length too")
        return None
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if max_prompt_length is None:
        return max_length // 2
    if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) \
            or not 0 <= max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length must be an int in [0, max_length) = "
                         f"[0, {max_length}), got {max_prompt_length!r}")
    return max_prompt_length


def _truncate(prompt_ids: list[int], responses_ids: list[list[int]], max_length: int | None,
              prompt_share: int | None) -> list[TokenizedSequence]:
    longest = max(len(ids) for ids in responses_ids)
    if max_length is None or len(prompt_ids) + longest <= max_length:
        return [TokenizedSequence(prompt_ids + ids, len(prompt_ids)) for ids in responses_ids]
    keep_prompt = min(len(prompt_ids), max(prompt_share, max_length - longest))
    kept_prompt = prompt_ids[len(prompt_ids) - keep_prompt:]
    keep_response = max_length - keep_prompt
    return [TokenizedSequence(kept_prompt + ids[:keep_response], keep_prompt,
                              prompt_tokens_cut=len(prompt_ids) - keep_prompt,
                              response_tokens_cut=max(0, len(ids) - keep_response))
            for ids in responses_ids]


def _where(source: Source | None, index: int) -> str:
    return str(source) if source is not None else f"example {index}"


def tokenize_pair(pair: PreferencePair, tokenizer: Any, *, max_length: int | None = None,
                  max_prompt_length: int | None = None, add_eos: bool = True,
                  index: int = 0) -> TokenizedPair:
    """One preference pair as token ids; truncation as in the module docstring."""
    prompt_share = _check_lengths(max_length, max_prompt_length)
    return _tokenize_pair(pair, _Encoder(tokenizer, add_eos=add_eos), max_length, prompt_share,
                          index)


def tokenize_ranked(example: RankedExample, tokenizer: Any, *, max_length: int | None = None,
                    max_prompt_length: int | None = None, add_eos: bool = True,
                    index: int = 0) -> TokenizedRanked:
    """One prompt with k ranked responses as token ids (one shared, cut prompt)."""
    prompt_share = _check_lengths(max_length, max_prompt_length)
    return _tokenize_ranked(example, _Encoder(tokenizer, add_eos=add_eos), max_length,
                            prompt_share, index)


def tokenize_prompt(example: PromptExample, tokenizer: Any, *, max_length: int | None = None,
                    index: int = 0) -> TokenizedPrompt:
    """A prompt as generation input: rendered exactly as the prompt part of a pair; cut from
    the left to its last `max_length` tokens."""
    _check_prompt_length(max_length)
    return _tokenize_prompt(example, _Encoder(tokenizer), max_length, index)


def _tokenize_pair(pair: PreferencePair, encoder: _Encoder, max_length: int | None,
                   prompt_share: int | None, index: int) -> TokenizedPair:
    prompt_ids, responses_ids = encoder.encode(pair.prompt, [pair.chosen, pair.rejected],
                                               _where(pair.source, index))
    chosen, rejected = _truncate(prompt_ids, responses_ids, max_length, prompt_share)
    return TokenizedPair(chosen, rejected, pair.margin, index, pair.source)


def _tokenize_ranked(example: RankedExample, encoder: _Encoder, max_length: int | None,
                     prompt_share: int | None, index: int) -> TokenizedRanked:
    prompt_ids, responses_ids = encoder.encode(example.prompt, example.responses,
                                               _where(example.source, index))
    sequences = _truncate(prompt_ids, responses_ids, max_length, prompt_share)
    return TokenizedRanked(sequences, list(example.scores), index, example.source)


def tokenize_demonstration(example: Demonstration, tokenizer: Any, *,
                           max_length: int | None = None, max_prompt_length: int | None = None,
                           add_eos: bool = True, index: int = 0) -> TokenizedDemonstration:
    """One demonstration as token ids (the prompt an exact prefix); truncation as for pairs."""
    prompt_share = _check_lengths(max_length, max_prompt_length)
    return _tokenize_demonstration(example, _Encoder(tokenizer, add_eos=add_eos), max_length,
                                   prompt_share, index)


def _tokenize_demonstration(example: Demonstration, encoder: _Encoder, max_length: int | None,
                            prompt_share: int | None, index: int) -> TokenizedDemonstration:
    where = _where(example.source, index)
    prompt_ids, responses_ids = encoder.encode(example.prompt, [example.response], where)
    (sequence,) = _truncate(prompt_ids, responses_ids, max_length, prompt_share)
    if sequence.response_start == 0:
        # no prompt and no BOS: the first token is context, never a label
        if len(sequence.input_ids) < 2:
            raise ValueError(f"{where}: a text with no prompt needs at least 2 tokens (the "
                             "first is only context), got 1")
        sequence.response_start = 1
    return TokenizedDemonstration(sequence, index, example.source)


def _check_prompt_length(max_length: int | None) -> None:
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")


def _tokenize_prompt(example: PromptExample, encoder: _Encoder, max_length: int | None,
                     index: int) -> TokenizedPrompt:
    ids = encoder.encode_prompt(example.prompt, _where(example.source, index))
    cut = 0 if max_length is None else max(0, len(ids) - max_length)
    return TokenizedPrompt(ids[cut:], cut, index, example.source)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out, so any id serves)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")


def _pad(sequences: Sequence[TokenizedSequence], pad_id: int, padding_side: str,
         ) -> dict[str, torch.Tensor]:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not sequences:
        raise ValueError("cannot collate an empty batch")
    length = max(len(s.input_ids) for s in sequences)
    count = len(sequences)
    input_ids = torch.full((count, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((count, length), dtype=torch.long)
    response_mask = torch.zeros((count, length), dtype=torch.bool)
    last_index = torch.empty(count, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        size = len(sequence.input_ids)
        offset = length - size if padding_side == "left" else 0
        input_ids[row, offset:offset + size] = torch.tensor(sequence.input_ids, dtype=torch.long)
        attention_mask[row, offset:offset + size] = 1
        response_mask[row, offset + sequence.response_start:offset + size] = True
        last_index[row] = offset + size - 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "response_mask": response_mask, "last_index": last_index}


def collate_pairs(batch: Sequence[TokenizedPair], pad_token_id: int,
                  padding_side: str = "right") -> dict[str, torch.Tensor]:
    """A batch of pairs: ``chosen_*`` and ``rejected_*`` (input_ids, attention_mask,
    response_mask, last_index), all [B, L] with one L; ``margin`` (float32, NaN where the pair
    has none), ``has_margin`` (bool) and ``index`` (each pair's position in its dataset)."""
    padded = _pad([p.chosen for p in batch] + [p.rejected for p in batch], pad_token_id,
                  padding_side)
    size = len(batch)
    out = {}
    for key, tensor in padded.items():
        out[f"chosen_{key}"] = tensor[:size]
        out[f"rejected_{key}"] = tensor[size:]
    out["margin"] = torch.tensor([math.nan if p.margin is None else p.margin for p in batch],
                                 dtype=torch.float32)
    out["has_margin"] = torch.tensor([p.margin is not None for p in batch], dtype=torch.bool)
    out["index"] = torch.tensor([p.index for p in batch], dtype=torch.long)
    return out


def collate_ranked(batch: Sequence[TokenizedRanked], pad_token_id: int,
                   padding_side: str = "right") -> dict[str, torch.Tensor]:
    """A batch of ranked examples, their responses flattened to N = sum of k rows:
    ``input_ids``, ``attention_mask``, ``response_mask``, ``last_index`` ([N, L] / [N]),
    ``scores`` [N] (float32), ``query_index`` [N] (the example, 0..B-1, each row answers),
    ``num_responses`` [B] and ``index`` [B] (each example's position in its dataset)."""
    sequences = [s for example in batch for s in example.responses]
    out = _pad(sequences, pad_token_id, padding_side)
    out["scores"] = torch.tensor([score for example in batch for score in example.scores],
                                 dtype=torch.float32)
    counts = [len(example.responses) for example in batch]
    out["query_index"] = torch.repeat_interleave(torch.arange(len(batch)),
                                                 torch.tensor(counts, dtype=torch.long))
    out["num_responses"] = torch.tensor(counts, dtype=torch.long)
    out["index"] = torch.tensor([example.index for example in batch], dtype=torch.long)
    return out


def collate_demonstrations(batch: Sequence[TokenizedDemonstration], pad_token_id: int,
                           padding_side: str = "right") -> dict[str, torch.Tensor]:
    """A batch of demonstrations: ``input_ids``, ``attention_mask``, ``response_mask`` (the
    tokens the SFT loss is on: the response, EOS included), ``last_index`` [B, L] / [B] and
    ``index`` [B] (each example's position in its dataset)."""
    out = _pad([d.sequence for d in batch], pad_token_id, padding_side)
    out["index"] = torch.tensor([d.index for d in batch], dtype=torch.long)
    return out


def collate_prompts(batch: Sequence[TokenizedPrompt], pad_token_id: int,
                    padding_side: str = "left") -> dict[str, torch.Tensor]:
    """A batch of prompts for generation, left-padded by default so that every prompt ends at
    the last column: ``input_ids``, ``attention_mask`` [B, L] and ``index`` [B]."""
    sequences = [TokenizedSequence(p.input_ids, len(p.input_ids)) for p in batch]
    padded = _pad(sequences, pad_token_id, padding_side)
    return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
            "index": torch.tensor([p.index for p in batch], dtype=torch.long)}


class _TokenizedDataset(torch.utils.data.Dataset):
    """Examples tokenized once, up front; ``truncation`` says how many were cut; ``collate``
    is the DataLoader's collate_fn."""

    def __init__(self, items: list[Any], pad_id: int, padding_side: str):
        self.items = items
        self.pad_token_id = pad_id
        self.padding_side = padding_side
        self.truncation = TruncationStats.of(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


class PreferenceDataset(_TokenizedDataset):
    def __init__(self, pairs: Sequence[PreferencePair], tokenizer: Any, *,
                 max_length: int | None = None, max_prompt_length: int | None = None,
                 add_eos: bool = True, padding_side: str = "right"):
        prompt_share = _check_lengths(max_length, max_prompt_length)
        encoder = _Encoder(tokenizer, add_eos=add_eos)
        items = [_tokenize_pair(pair, encoder, max_length, prompt_share, i)
                 for i, pair in enumerate(pairs)]
        super().__init__(items, pad_token_id(tokenizer), padding_side)

    def collate(self, batch: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        return collate_pairs(batch, self.pad_token_id, self.padding_side)


class RankedDataset(_TokenizedDataset):
    def __init__(self, examples: Sequence[RankedExample], tokenizer: Any, *,
                 max_length: int | None = None, max_prompt_length: int | None = None,
                 add_eos: bool = True, padding_side: str = "right"):
        prompt_share = _check_lengths(max_length, max_prompt_length)
        encoder = _Encoder(tokenizer, add_eos=add_eos)
        items = [_tokenize_ranked(example, encoder, max_length, prompt_share, i)
                 for i, example in enumerate(examples)]
        super().__init__(items, pad_token_id(tokenizer), padding_side)

    def collate(self, batch: Sequence[TokenizedRanked]) -> dict[str, torch.Tensor]:
        return collate_ranked(batch, self.pad_token_id, self.padding_side)


class PromptDataset(_TokenizedDataset):
    def __init__(self, examples: Sequence[PromptExample], tokenizer: Any, *,
                 max_length: int | None = None, padding_side: str = "left"):
        _check_prompt_length(max_length)
        encoder = _Encoder(tokenizer)
        items = [_tokenize_prompt(example, encoder, max_length, i)
                 for i, example in enumerate(examples)]
        super().__init__(items, pad_token_id(tokenizer), padding_side)

    def collate(self, batch: Sequence[TokenizedPrompt]) -> dict[str, torch.Tensor]:
        return collate_prompts(batch, self.pad_token_id, self.padding_side)


class DemonstrationDataset(_TokenizedDataset):
    def __init__(self, examples: Sequence[Demonstration], tokenizer: Any, *,
                 max_length: int | None = None, max_prompt_length: int | None = None,
                 add_eos: bool = True, padding_side: str = "right"):
        prompt_share = _check_lengths(max_length, max_prompt_length)
        encoder = _Encoder(tokenizer, add_eos=add_eos)
        items = [_tokenize_demonstration(example, encoder, max_length, prompt_share, i)
                 for i, example in enumerate(examples)]
        super().__init__(items, pad_token_id(tokenizer), padding_side)

    def collate(self, batch: Sequence[TokenizedDemonstration]) -> dict[str, torch.Tensor]:
        return collate_demonstrations(batch, self.pad_token_id, self.padding_side)
