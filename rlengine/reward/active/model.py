"""The active-selection paper's reward model on frozen embeddings (METHODS.md section 2):
f(e) = w . phi(e), phi a small GELU MLP and w a bias-free last layer, fitted by Bradley-Terry on
the labelled pairs, from scratch every round (so the selection never depends on how often a
model has been warm-started)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlengine import ops


@dataclass(frozen=True)
class PreferenceModelConfig:
    """phi's hidden widths (the paper: three GELU layers of 512; none: phi is the identity and
    the model is linear in the standardised embedding) and the full-batch fit (the
    paper: Adam 1e-3, 1000 steps). Inputs are standardised with the embedding pool's mean and
    std, which the fit is given once (embeddings of different models differ in scale by
    orders of magnitude)."""

    hidden: tuple[int, ...] = (512, 512, 512)
    steps: int = 1000
    lr: float = 1e-3
    # An L2 penalty (Adam's weight_decay). Without it the model separates a few hundred labels
    # perfectly and its gaps grow to tens of units: p (1 - p) is then ~0 for almost every pair
    # and the Fisher weights of D-opt carry no information (measured: mean |gap| 19-40 without,
    # ~6 with 1e-2, and better held-out accuracy).
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        if any(int(h) < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


class PreferenceModel(torch.nn.Module):
    """phi: standardise, then len(hidden) Linear + GELU layers (none: the standardised
    embedding itself); w: bias-free Linear(width, 1)."""

    def __init__(self, embedding_dim: int, hidden: Sequence[int], *, mean: torch.Tensor,
                 std: torch.Tensor):
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = embedding_dim
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.GELU()]
            width = h
        self.phi = torch.nn.Sequential(*layers)
        self.w = torch.nn.Linear(width, 1, bias=False)
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clamp(min=1e-6).clone())

    def features(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.phi((embeddings.float() - self.mean) / self.std)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The reward of each embedding, [n]."""
        return self.w(self.features(embeddings)).squeeze(-1)

    @torch.no_grad()
    def pair_features(self, embeddings: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                      *, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [n, width], gap [n]) of pairs given as index tensors into ``embeddings``:
        z = phi(e_first) - phi(e_second), gap = w . z. Features are computed once per item."""
        items, (first, second) = _distinct_items(first, second)
        feats = torch.cat([self.features(embeddings[items[s:s + chunk]])
                           for s in range(0, len(items), chunk)])
        z = feats[first] - feats[second]
        return z, self.w(z).squeeze(-1)


def _distinct_items(*sides: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(the distinct items of index tensors, each tensor as positions into them): pairs share
    items, so features are computed once per item."""
    items, positions = torch.unique(torch.cat(sides), return_inverse=True)
    return items, tuple(positions.split([len(s) for s in sides]))


def fit_preference_model(embeddings: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                         first_preferred: torch.Tensor, config: PreferenceModelConfig, *,
                         seed: int, mean: torch.Tensor | None = None,
                         std: torch.Tensor | None = None) -> PreferenceModel:
    """A fresh PreferenceModel fitted by full-batch Adam on the BT loss of the labelled pairs
    (first[i], second[i]) with labels first_preferred[i] (bool). ``mean``/``std`` standardise
    the inputs (default: over ``embeddings``)."""
    if not len(first) == len(second) == len(first_preferred):
        raise ValueError(f"{len(first)} first items, {len(second)} second items, "
                         f"{len(first_preferred)} labels")
    embeddings = embeddings.float()
    if mean is None:
        mean = embeddings.mean(0)
    if std is None:
        std = embeddings.std(0) if len(embeddings) > 1 else torch.ones_like(mean)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PreferenceModel(embeddings.shape[1], config.hidden, mean=mean, std=std)
    if len(first) == 0:
        return model
    labels = torch.as_tensor(first_preferred, dtype=torch.bool)
    chosen = torch.where(labels, first, second)
    rejected = torch.where(labels, second, first)
    items, (chosen, rejected) = _distinct_items(chosen, rejected)
    inputs = embeddings[items]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    for _ in range(config.steps):
        rewards = model(inputs)
        loss = ops.bt_loss(rewards[chosen], rewards[rejected]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()

