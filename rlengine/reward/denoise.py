"""The strength-aware remedies of Secrets of RLHF II (METHODS.md section 1) as a preparation of
the training pairs: flip the lowest-strength pairs, drop some, and give every pair its BT margin
and label-smoothing value. The loss itself is ``rlengine.ops.bt_loss``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlengine.data.types import PreferencePair
from rlengine.reward.config import RewardTrainerConfig


@dataclass
class PreparedPairs:
    """The pairs to train on, and per pair (float32 [n]) its margin and smoothing. ``flipped``
    marks pairs whose chosen and rejected were swapped; ``origin[i]`` is the position of pair i
    in the input."""

    pairs: list[PreferencePair]
    margin: torch.Tensor | None
    smoothing: torch.Tensor
    flipped: torch.Tensor
    origin: list[int]
    strength: torch.Tensor | None

    def summary(self) -> dict[str, float]:
        out = {"pairs": len(self.pairs), "flipped": int(self.flipped.sum()),
               "smoothed": int((self.smoothing > 0).sum())}
        if self.strength is not None and len(self.pairs):
            out["strength_negative_share"] = float((self.strength < 0).float().mean())
        return out


def strength_of(pairs: Sequence[PreferencePair], key: str, *,
                needed_by: str = "the strength options") -> torch.Tensor:
    """Each pair's strength mu from ``pair.extra[key]``, float64 [n]; a clear error for the
    first pair without one, naming ``needed_by`` (the options that asked for it)."""
    values = []
    for i, pair in enumerate(pairs):
        value = pair.extra.get(key)
        if value is None or isinstance(value, bool) or not _finite_number(value):
            where = pair.source or f"pair {i}"
            raise ValueError(
                f"{where}: no finite preference strength in column {key!r} (got {value!r}); "
                f"{needed_by} need(s) it: compute it with `rlengine strength`, or set "
                f"strength_key to the column that holds it")
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float64)


def _finite_number(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _lowest(strength: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the round(fraction * n) lowest strengths (ties broken by position)."""
    count = int(round(fraction * len(strength)))
    order = torch.sort(strength, stable=True).indices
    return order[:count]


def swapped(pair: PreferencePair) -> PreferencePair:
    """The pair with chosen and rejected swapped. Its margin column, a claim about how much
    better the old chosen was, is negated like its strength."""
    margin = None if pair.margin is None else -pair.margin
    return PreferencePair(pair.prompt, pair.rejected, pair.chosen, margin, pair.source,
                          {**pair.extra, "flipped_by_strength": True})


def prepare_pairs(pairs: Sequence[PreferencePair], config: RewardTrainerConfig) -> PreparedPairs:
    """Apply flip_lowest, then drop_lowest, then derive margins and smoothing (see the
    options' help in RewardTrainerConfig)."""
    pairs = list(pairs)
    n = len(pairs)
    strength = None
    if config.uses_strength:
        strength = strength_of(pairs, config.strength_key,
                               needed_by=", ".join(config.strength_options()))
    flipped = torch.zeros(n, dtype=torch.bool)
    if strength is not None and config.flip_lowest > 0:
        lowest = _lowest(strength, config.flip_lowest)
        flipped[lowest] = True
        strength = torch.where(flipped, -strength, strength)
        pairs = [swapped(p) if f else p for p, f in zip(pairs, flipped.tolist())]
    origin = list(range(n))
    if strength is not None and config.drop_lowest > 0:
        dropped = set(_lowest(strength, config.drop_lowest).tolist())
        origin = [i for i in origin if i not in dropped]
        pairs = [pairs[i] for i in origin]
        strength = strength[origin]
        flipped = flipped[origin]

    margin = None
    if config.margin == "column":
        margin = torch.tensor([0.0 if p.margin is None else float(p.margin) for p in pairs],
                              dtype=torch.float32)
    elif config.margin == "strength":
        margin = strength.float()
    if margin is not None:
        margin = margin * config.margin_scale
    if config.label_smoothing > 0 and config.smoothing_on == "negative_strength":
        smoothing = torch.where(strength < 0, config.label_smoothing, 0.0).float()
    else:
        smoothing = torch.full((len(pairs),), config.label_smoothing, dtype=torch.float32)
    return PreparedPairs(pairs, margin, smoothing, flipped, origin, strength)
