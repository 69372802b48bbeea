"""The active reward modeling loop of METHODS.md section 2, with a simulated annotator.

Per seed, strategy and pool kind, starting from the same random warm-start labels:

    repeat for each round:
        fit a fresh preference model on the labels so far; evaluate it
        draw this round's prompts (new ones each round) and build their candidate pool
        score the pool with the strategy; label the top ``labels_per_round`` pairs
    fit and evaluate once more on all labels

The annotator labels (a, b) as a > b with probability sigmoid(q (r_a - r_b) / std(r)) from the
items' gold rewards (std over all items), or exactly by the larger gold reward when q is None:
the "revealed labels" setting of real preference data, whose gold is 1 for the chosen response
and 0 for the rejected one. A pair's label depends only on the seed and the pair, so every
strategy that picks the same pair sees the same label.

Metrics of each fitted model on held-out prompts: accuracy on their in-prompt pairs against the
gold preference (ties of the model count half; pairs with equal gold are skipped), the mean
within-prompt Spearman correlation of predicted and gold rewards, and the best-of-N gold reward
(the gold reward of each prompt's response with the highest predicted reward; prompts with
three or more responses).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rlengine.reward.active.model import (
    PreferenceModel,
    PreferenceModelConfig,
    fit_preference_model,
)
from rlengine.reward.active.pools import (
    POOL_KINDS,
    ItemTable,
    candidate_pairs,
    within_prompt_groups,
)
from rlengine.reward.active.selection import STRATEGIES, USES_PAST, select


@dataclass(frozen=True)
class ActiveSimConfig:
    strategies: tuple[str, ...] = STRATEGIES
    pools: tuple[str, ...] = ("cross_prompt", "in_prompt")
    seeds: int = 5
    first_seed: int = 0
    rounds: int = 8
    initial_labels: int = 50
    labels_per_round: int = 50
    prompts_per_round: int = 40
    max_pool_pairs: int | None = 20000
    annotator_scale: float | None = 5.0
    ridge: float = 1e-6
    coreset_clusters: int = 10
    model: PreferenceModelConfig = field(default_factory=PreferenceModelConfig)

    def __post_init__(self) -> None:
        for name, allowed in (("strategies", STRATEGIES), ("pools", POOL_KINDS)):
            values = tuple(getattr(self, name))
            bad = [v for v in values if v not in allowed]
            if not values or bad:
                raise ValueError(f"{name} must be one or more of {', '.join(allowed)}; got "
                                 f"{list(values)}")
            object.__setattr__(self, name, values)
        for name in ("seeds", "rounds", "labels_per_round", "prompts_per_round"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.initial_labels < 1:
            raise ValueError(f"initial_labels must be >= 1, got {self.initial_labels}")
        if self.annotator_scale is not None and not self.annotator_scale > 0:
            raise ValueError(f"annotator_scale must be > 0 or none, got {self.annotator_scale}")
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", PreferenceModelConfig(**self.model))

    @property
    def budget(self) -> int:
        return self.initial_labels + self.rounds * self.labels_per_round

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Annotator:
    """Labels pairs from gold rewards: Bernoulli(sigmoid(scale (r_a - r_b) / std)), or the
    exact gold preference (a fair coin on a tie) with scale None. Deterministic in (seed,
    pair)."""

    def __init__(self, gold: torch.Tensor, scale: float | None, seed: int):
        self.gold = gold.double()
        self.scale = scale
        self.std = float(gold.double().std()) if len(gold) > 1 else 1.0
        self.seed = seed

    def __call__(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        gap = self.gold[first] - self.gold[second]
        draws = torch.tensor([random.Random(f"annotator/{self.seed}/{a}/{b}").random()
                              for a, b in zip(first.tolist(), second.tolist())],
                             dtype=torch.float64)
        if self.scale is None:
            return torch.where(gap == 0, draws < 0.5, gap > 0)
        return draws < torch.sigmoid(self.scale * gap / max(self.std, 1e-12))


def evaluate(model: PreferenceModel, table: ItemTable, test_items: torch.Tensor
             ) -> dict[str, float]:
    """accuracy, spearman and best_of_n of a model on held-out items (module docstring)."""
    assert table.gold is not None
    with torch.no_grad():
        predicted = torch.full((len(table),), math.nan, dtype=torch.float64)
        predicted[test_items] = model(table.embeddings[test_items]).double()
    first, second = candidate_pairs(table, test_items, "in_prompt")
    gold_gap = table.gold[first] - table.gold[second]
    keep = gold_gap != 0
    model_gap = predicted[first[keep]] - predicted[second[keep]]
    right = torch.where(model_gap == 0, 0.5, ((model_gap > 0) == (gold_gap[keep] > 0)).double())
    out = {"accuracy": float(right.mean()) if keep.any() else math.nan}
    correlations, best = [], []
    for group in within_prompt_groups(table, test_items):
        if len(group) < 3:
            continue
        best.append(float(table.gold[group[predicted[group].argmax()]]))
        if float(table.gold[group].std()) > 0:
            correlations.append(spearman(predicted[group], table.gold[group]))
    if best:
        out["spearman"] = statistics.fmean(correlations) if correlations else math.nan
        out["best_of_n"] = statistics.fmean(best)
    return out


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation with average ranks for ties (0 when either is constant)."""
    rx, ry = _ranks(x.double()), _ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / denominator if denominator > 0 else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    # ties share the mean of their ranks
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse, minlength=len(values)).to(x.dtype)
    return (sums / counts)[inverse]


def reference_values(table: ItemTable, test_items: torch.Tensor) -> dict[str, float]:
    """The best-of-N gold reward of an oracle and of a random pick, for the plots."""
    assert table.gold is not None
    groups = [g for g in within_prompt_groups(table, test_items) if len(g) >= 3]
    if not groups:
        return {}
    return {"best_of_n_oracle": statistics.fmean(float(table.gold[g].max()) for g in groups),
            "best_of_n_random": statistics.fmean(float(table.gold[g].mean()) for g in groups)}


def run_one(table: ItemTable, train_prompts: torch.Tensor, test_items: torch.Tensor,
            config: ActiveSimConfig, *, strategy: str, pool: str, seed: int
            ) -> list[dict[str, float]]:
    """One learning curve: the metrics after each fit, with the number of labels used."""
    assert table.gold is not None
    annotator = Annotator(table.gold, config.annotator_scale, seed)
    mean, std = table.embeddings.mean(0), table.embeddings.std(0)
    # this seed's prompt order, shared by every strategy and pool
    order = train_prompts[torch.randperm(len(train_prompts),
                                         generator=torch.Generator().manual_seed(seed))]
    cursor = 0

    def next_pool(tag: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal cursor
        prompts = order[torch.arange(cursor, cursor + config.prompts_per_round) % len(order)]
        cursor += config.prompts_per_round
        generator = torch.Generator().manual_seed(seed * 7919 + tag)
        return candidate_pairs(table, table.items_of(prompts), pool,
                               max_pairs=config.max_pool_pairs, generator=generator)

    # Warm start: random pairs of the first prompts, the same for every strategy.
    first, second = next_pool(0)
    start = torch.randperm(len(first), generator=torch.Generator().manual_seed(seed))
    start = start[:config.initial_labels]
    labelled_first, labelled_second = first[start], second[start]
    labels = annotator(labelled_first, labelled_second)
    curve = []
    for round_index in range(config.rounds + 1):
        model = fit_preference_model(table.embeddings, labelled_first, labelled_second, labels,
                                     config.model, seed=seed * 1000 + round_index, mean=mean,
                                     std=std)
        curve.append({"labels": len(labels), **evaluate(model, table, test_items)})
        if round_index == config.rounds:
            break
        first, second = next_pool(round_index + 1)
        z, gap = model.pair_features(table.embeddings, first, second)
        past = (model.pair_features(table.embeddings, labelled_first, labelled_second)
                if strategy in USES_PAST else (None, None))
        picked, _ = select(strategy, config.labels_per_round, z=z, gap=gap, past_z=past[0],
                           past_gap=past[1], ridge=config.ridge,
                           clusters=config.coreset_clusters, seed=seed * 1000 + round_index)
        labelled_first = torch.cat([labelled_first, first[picked]])
        labelled_second = torch.cat([labelled_second, second[picked]])
        labels = torch.cat([labels, annotator(first[picked], second[picked])])
    return curve


def simulate(table: ItemTable, train_prompts: torch.Tensor, test_prompts: torch.Tensor,
             config: ActiveSimConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every (pool, strategy, seed) curve, their mean +- std per labelled count, reference
    values and the label ratio of D-opt against random; a JSON-ready dict."""
    if table.gold is None:
        raise ValueError("the simulation needs gold rewards (or revealed labels) for every item")
    test_items = table.items_of(test_prompts)
    curves: dict[str, dict[str, list[list[dict[str, float]]]]] = {}
    began = time.perf_counter()
    for pool in config.pools:
        curves[pool] = {}
        for strategy in config.strategies:
            runs = []
            for seed in range(config.first_seed, config.first_seed + config.seeds):
                runs.append(run_one(table, train_prompts, test_items, config,
                                    strategy=strategy, pool=pool, seed=seed))
                final = runs[-1][-1]
                log(f"{pool:12s} {strategy:15s} seed {seed}: accuracy {final['accuracy']:.3f} "
                    f"with {final['labels']} labels ({time.perf_counter() - began:.0f} s)")
            curves[pool][strategy] = runs
    summary = {pool: {strategy: summarize_runs(runs) for strategy, runs in by.items()}
               for pool, by in curves.items()}
    return {"config": config.to_dict(), "curves": curves, "summary": summary,
            "reference": reference_values(table, test_items),
            "label_ratio": {pool: label_ratios(by) for pool, by in summary.items()},
            "seconds": time.perf_counter() - began}


def summarize_runs(runs: Sequence[Sequence[dict[str, float]]]) -> list[dict[str, float]]:
    """Per curve point: labels, and mean and population std over seeds of every metric."""
    out = []
    for points in zip(*runs):
        row: dict[str, float] = {"labels": points[0]["labels"]}
        for key in points[0]:
            if key == "labels":
                continue
            values = [p[key] for p in points if not math.isnan(p.get(key, math.nan))]
            if values:
                row[key] = statistics.fmean(values)
                row[f"{key}_std"] = statistics.pstdev(values)
        out.append(row)
    return out


def labels_to_reach(curve: Sequence[dict[str, float]], target: float,
                    metric: str = "accuracy") -> float | None:
    """The labels at which a mean curve first reaches ``target`` (linear between points), or
    None if it never does."""
    previous = None
    for point in curve:
        value = point.get(metric, math.nan)
        if value >= target:
            if previous is None or previous[1] >= target:
                return float(point["labels"])
            (x0, y0), x1 = previous, point["labels"]
            return x0 + (target - y0) / (value - y0) * (x1 - x0)
        previous = (point["labels"], value)
    return None


def label_ratios(summary: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """For every strategy: the share of the budget it needs to reach the held-out accuracy that
    random selection reaches with the whole budget (None: never within the budget)."""
    if "random" not in summary:
        return {}
    target = summary["random"][-1]["accuracy"]
    budget = summary["random"][-1]["labels"]
    ratios: dict[str, Any] = {"target_accuracy": target, "budget": budget}
    for strategy, curve in summary.items():
        needed = labels_to_reach(curve, target)
        ratios[strategy] = None if needed is None else needed / budget
    return ratios
