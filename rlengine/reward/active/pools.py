"""Items and candidate pools for active reward modeling.

An *item* is one response to one prompt; the items of a run live in one ``ItemTable`` with
their prompt index, their embedding and, where known, their gold reward. A candidate pair is
two item indices (first, second). Pools (METHODS.md section 2):

- in-prompt: every pair of two responses to the same prompt (what annotators usually see);
- cross-prompt: every pair of two items from the pooled responses of several prompts, same
  prompt or not (the paper found it markedly more label-efficient: it compares more different
  reward levels and spreads the Fisher information over more directions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from rlengine.data.types import Text

PoolKind = Literal["cross_prompt", "in_prompt"]
POOL_KINDS: tuple[str, ...] = get_args(PoolKind)


@dataclass
class ItemTable:
    """Items (prompt, response) with their prompt's index, embedding and optional gold reward."""

    prompts: list[Text]
    responses: list[Text]
    prompt_index: torch.Tensor          # [N] long: items of one prompt share it
    embeddings: torch.Tensor            # [N, H] float32
    gold: torch.Tensor | None = None    # [N] float64

    def __post_init__(self) -> None:
        n = len(self.responses)
        if len(self.prompts) != n or self.prompt_index.shape != (n,) or \
                self.embeddings.shape[0] != n:
            raise ValueError(f"an item table needs one prompt, prompt index and embedding per "
                             f"response: {len(self.prompts)} prompts, "
                             f"{tuple(self.prompt_index.shape)} indices, "
                             f"{tuple(self.embeddings.shape)} embeddings, {n} responses")
        if self.gold is not None and self.gold.shape != (n,):
            raise ValueError(f"gold must have one reward per item, got {tuple(self.gold.shape)}")

    def __len__(self) -> int:
        return len(self.responses)

    def text_ids(self) -> torch.Tensor:
        """[N] long: equal for items with the same prompt and response text (such a pair is
        not a comparison), distinct otherwise."""
        if getattr(self, "_text_ids", None) is None:
            seen: dict[str, int] = {}
            keys = [repr((p, r)) for p, r in zip(self.prompts, self.responses)]
            self._text_ids = torch.tensor([seen.setdefault(k, len(seen)) for k in keys],
                                          dtype=torch.long)
        return self._text_ids

    def items_of(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """The items whose prompt index is in ``prompt_ids``, in table order."""
        return torch.isin(self.prompt_index, prompt_ids).nonzero().squeeze(1)


def candidate_pairs(table: ItemTable, items: torch.Tensor, kind: PoolKind, *,
                    max_pairs: int | None = None, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) item indices of the pool over ``items``: all unordered pairs (first
    listed before second in ``items``) for cross_prompt, those of one prompt for in_prompt,
    without pairs of two identical (prompt, response) texts; a uniform sample of
    ``max_pairs`` of them when there are more."""
    if kind not in POOL_KINDS:
        raise ValueError(f"unknown pool {kind!r}; choose one of {', '.join(POOL_KINDS)}")
    items = torch.as_tensor(items, dtype=torch.long)
    left, right = torch.triu_indices(len(items), len(items), offset=1)
    first, second = items[left], items[right]
    text = table.text_ids()
    keep = text[first] != text[second]   # a response against a copy of itself tells nothing
    if kind == "in_prompt":
        keep &= table.prompt_index[first] == table.prompt_index[second]
    first, second = first[keep], second[keep]
    if max_pairs is not None and len(first) > max_pairs:
        keep = torch.randperm(len(first), generator=generator)[:max_pairs].sort().values
        first, second = first[keep], second[keep]
    return first, second


def within_prompt_groups(table: ItemTable, items: torch.Tensor) -> list[torch.Tensor]:
    """The items grouped by prompt (groups of two or more items), in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for item in torch.as_tensor(items).tolist():
        groups.setdefault(int(table.prompt_index[item]), []).append(item)
    return [torch.tensor(g) for g in groups.values() if len(g) >= 2]


def table_from_groups(groups: Sequence[tuple[Text, Sequence[Text]]], embeddings: torch.Tensor,
                      gold: Sequence[Sequence[float]] | None = None) -> ItemTable:
    """An ItemTable from (prompt, responses) groups, embeddings in the same flattened order."""
    prompts, responses, index, rewards = [], [], [], []
    for g, (prompt, group) in enumerate(groups):
        for r, response in enumerate(group):
            prompts.append(prompt)
            responses.append(response)
            index.append(g)
            if gold is not None:
                rewards.append(float(gold[g][r]))
    return ItemTable(prompts, responses, torch.tensor(index, dtype=torch.long), embeddings,
                     torch.tensor(rewards, dtype=torch.float64) if gold is not None else None)
