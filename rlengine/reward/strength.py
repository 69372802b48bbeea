"""Preference strength by voting (METHODS.md section 1): M reward models that differ only by
seed (initial head and data order) score every training pair; mu is the mean of their score
differences and sigma the population std. The scores are in-sample: the voters saw the pairs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rlengine.data.types import PreferencePair
from rlengine.reward.config import RewardTrainerConfig
from rlengine.reward.losses import preference_strength
from rlengine.reward.model import RewardModel

MU_COLUMN = "strength_mu"
SIGMA_COLUMN = "strength_sigma"


@dataclass
class StrengthResult:
    """``differences[m, i]`` = voter m's r(chosen_i) - r(rejected_i) (float64 [M, n]);
    ``mu`` and ``sigma`` [n]; ``seeds[m]`` the seed voter m trained with; ``metrics[m]``
    voter m's final evaluation on the validation sets (RewardTrainResult.metrics)."""

    differences: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    seeds: list[int]
    metrics: list[dict[str, dict[str, float]]] = field(default_factory=list)

    def columns(self, index: int) -> dict[str, float]:
        """The columns `rlengine strength` writes for pair ``index``."""
        out = {MU_COLUMN: float(self.mu[index]), SIGMA_COLUMN: float(self.sigma[index])}
        for m in range(len(self.seeds)):
            out[f"strength_d{m}"] = float(self.differences[m, index])
        return out

    def annotate(self, pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
        """Copies of ``pairs`` with the strength columns added to ``extra``."""
        if len(pairs) != self.mu.numel():
            raise ValueError(f"{len(pairs)} pairs for a strength result over {self.mu.numel()}")
        return [dataclasses.replace(p, extra={**p.extra, **self.columns(i)})
                for i, p in enumerate(pairs)]


def vote(make_model: Callable[[int], RewardModel], tokenizer, pairs: Sequence[PreferencePair],
         config: RewardTrainerConfig, *, voters: int = 10,
         on_voter: Callable[[int, torch.Tensor], None] | None = None,
         **trainer_kwargs) -> StrengthResult:
    """Train ``voters`` reward models on ``pairs`` with ``config`` (seeds config.seed,
    config.seed + 1, ...; ``make_model(m)`` builds voter m's fresh model) and compute each
    pair's strength. Strength options in ``config`` are not allowed (the votes define
    strength). With ``config.output_dir`` set, voter m writes to ``output_dir/voter-m`` (so an
    interrupted vote resumes voter by voter). ``on_voter(m, d_m)`` sees each voter's
    differences as they come."""
    # Import here: the trainer imports this package's modules.
    from rlengine.reward.trainer import RewardTrainer

    if voters < 1:
        raise ValueError(f"voters must be >= 1, got {voters}")
    if config.uses_strength:
        raise ValueError(f"the voters must train on the plain labels: turn off the strength "
                         f"options ({', '.join(config.strength_options())}) for `strength`")
    differences, seeds, metrics = [], [], []
    for m in range(voters):
        seed = config.seed + m
        output_dir = None if config.output_dir is None else f"{config.output_dir}/voter-{m}"
        voter_config = dataclasses.replace(config, seed=seed, output_dir=output_dir,
                                           save_model=False)
        trainer = RewardTrainer(make_model(m), tokenizer, pairs, voter_config, **trainer_kwargs)
        metrics.append(trainer.train().metrics)
        chosen, rejected = trainer.score_dataset(trainer.train_data)
        d = (chosen.double() - rejected.double())
        differences.append(d)
        seeds.append(seed)
        if on_voter is not None:
            on_voter(m, d)
    stacked = torch.stack(differences)
    mu, sigma = preference_strength(stacked)
    return StrengthResult(stacked, mu, sigma, seeds, metrics)


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting half
    (Mann-Whitney U from average ranks: O(n log n), for data sets of any size)."""
    scores = scores.double()
    positives = int(positive.sum())
    negatives = len(scores) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = torch.argsort(scores, stable=True)
    ordered = scores[order]
    ranks = torch.empty_like(scores)
    # tied scores share the average of their 1-based ranks
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True,
                                                  return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    u = float(ranks[positive].sum()) - positives * (positives + 1) / 2
    return u / (positives * negatives)
