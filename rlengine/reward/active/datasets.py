"""Item tables for the active-selection loop: the synthetic task (gold rewards) and real
preference pairs (revealed labels)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rlengine.data.types import PreferencePair
from rlengine.reward.active.embeddings import Embedder, cached_embeddings
from rlengine.reward.active.pools import ItemTable, table_from_groups


def synthetic_table(task, embedder: Embedder, *, prompts: int, responses_per_prompt: int,
                    error_rates: tuple[float, float] = (0.0, 0.5), seed: int = 0,
                    cache_dir: str | Path | None = None,
                    log: Callable[[str], None] = print) -> ItemTable:
    """``prompts`` task prompts with ``responses_per_prompt`` noisy-expert responses each (error
    rates uniform in ``error_rates``, so responses range from perfect to poor), embedded by
    ``embedder``, with their gold rewards."""
    rng = random.Random(f"rlengine.active/synthetic/{task.seed}/{seed}")
    groups, gold = [], []
    for prompt in task.prompts(prompts, seed=seed):
        responses = [task.expert_response(prompt, rng.uniform(*error_rates), rng)[0]
                     for _ in range(responses_per_prompt)]
        groups.append((prompt, responses))
        gold.append(task.gold_rewards([prompt] * len(responses), responses))
    flat_prompts = [p for p, rs in groups for _ in rs]
    flat_responses = [r for _, rs in groups for r in rs]
    embeddings = cached_embeddings(embedder, flat_prompts, flat_responses, cache_dir, log=log)
    return table_from_groups(groups, embeddings, gold)


def revealed_pairs_table(pairs: Sequence[PreferencePair], embedder: Embedder, *, seed: int = 0,
                         cache_dir: str | Path | None = None,
                         log: Callable[[str], None] = print) -> ItemTable:
    """Real preference pairs as an item table: each pair is one 'prompt' group of two items in
    a random order, gold 1 for the chosen response and 0 for the rejected one, so the label is
    revealed when the pair is selected."""
    rng = random.Random(f"rlengine.active/revealed/{seed}")
    groups, gold = [], []
    for pair in pairs:
        sides = [(pair.chosen, 1.0), (pair.rejected, 0.0)]
        rng.shuffle(sides)
        groups.append((pair.prompt, [text for text, _ in sides]))
        gold.append([value for _, value in sides])
    flat_prompts = [p for p, rs in groups for _ in rs]
    flat_responses = [r for _, rs in groups for r in rs]
    embeddings = cached_embeddings(embedder, flat_prompts, flat_responses, cache_dir, log=log)
    return table_from_groups(groups, embeddings, gold)


def split_prompts(n_prompts: int, test_share: float, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) prompt indices: a seeded random split."""
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}")
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n_prompts * test_share))
    return order[n_test:].sort().values, order[:n_test].sort().values
