"""The location-aware reward normalizer of segment-level rewards (METHODS.md section 3).

For a response with K segments, segment k (1-based) sits at location p = k/K. Over a fitting
set, the raw segment rewards are grouped by location; the per-location mean and standard
deviation are fitted by Huber regression on log p::

    mu(p) = a_mu log p + b_mu          sigma(p) = a_sigma log p + b_sigma

and dense rewards use (r_k - mu(k/K)) / sigma(k/K). The fit is refit for every reward model and
segmentation threshold; ``rlengine fit-normalizer`` runs it and writes the parameters as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rlengine.data.tokenize import RankedDataset
from rlengine.data.types import RankedExample, Text
from rlengine.files import atomic_write
from rlengine.ops.reference import SIGMA_FLOOR
from rlengine.policy.rewards import segment_rewards
from rlengine.policy.rollout import Kernels, next_token_entropy, sequence_logprobs
from rlengine.reward.model import RewardModel

FORMAT = "rlengine.LocationNormalizer"
# Huber's tuning constant: 95% efficiency at Gaussian residuals (in units of the robust scale)
HUBER_DELTA = 1.345


def huber_line_fit(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None, *,
                   delta: float = HUBER_DELTA, max_iterations: int = 100,
                   tolerance: float = 1e-10) -> tuple[float, float]:
    """Robust straight line ``y ~ slope * x + intercept`` by Huber M-estimation, solved with
    iteratively reweighted least squares. Residuals are measured in units of a robust scale
    (the weighted median absolute residual / 0.6745, re-estimated each iteration); points
    within ``delta`` of the line count fully, points further out with weight ``delta / |u|``,
    so outliers pull linearly, not quadratically. ``weights`` (e.g. how many samples each
    point summarises) multiply the Huber weights. Returns ``(slope, intercept)``."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have equal lengths, got {len(x)} and {len(y)}")
    prior = torch.ones_like(x) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float64).flatten()
    if prior.shape != x.shape or bool((prior < 0).any()):
        raise ValueError("weights must be >= 0, one per point")
    keep = torch.isfinite(x) & torch.isfinite(y) & (prior > 0)
    x, y, prior = x[keep], y[keep], prior[keep]
    if len(x) < 2 or float(x.max() - x.min()) == 0.0:
        raise ValueError(f"a line needs points at 2 or more distinct x, got {len(x)} usable "
                         f"point(s) at {torch.unique(x).numel()} distinct x")
    design = torch.stack([x, torch.ones_like(x)], 1)
    weight = prior.clone()
    coefficients = _weighted_least_squares(design, y, weight)
    for _ in range(max_iterations):
        residual = y - design @ coefficients
        scale = _weighted_median(residual.abs(), prior) / 0.6745
        if scale <= 1e-12 * (1.0 + float(y.abs().max())):
            break  # (nearly) every point on the line: nothing to down-weight
        u = (residual / scale).abs()
        weight = prior * torch.where(u <= delta, 1.0, delta / u)
        updated = _weighted_least_squares(design, y, weight)
        change = float((updated - coefficients).abs().max())
        coefficients = updated
        if change <= tolerance * (1.0 + float(coefficients.abs().max())):
            break
    slope, intercept = coefficients.tolist()
    return slope, intercept


def _weighted_least_squares(design: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
                            ) -> torch.Tensor:
    root = weight.sqrt().unsqueeze(1)
    return torch.linalg.lstsq(design * root, y * root.squeeze(1)).solution


def _weighted_median(values: torch.Tensor, weights: torch.Tensor) -> float:
    order = values.argsort()
    cumulative = weights[order].cumsum(0)
    index = int(torch.searchsorted(cumulative, cumulative[-1] / 2))
    return float(values[order][min(index, len(values) - 1)])


@dataclass
class LocationStatistics:
    """Per-location mean and population std of raw segment rewards: ``locations [L]``,
    ``means``, ``stds``, ``counts``."""

    locations: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    counts: torch.Tensor


def location_statistics(locations: torch.Tensor, rewards: torch.Tensor, *,
                        min_count: int = 2) -> LocationStatistics:
    """Group segment rewards by their location p (locations equal to 1e-9 are one) and keep
    the locations with at least ``min_count`` segments (a std needs 2)."""
    p = torch.as_tensor(locations, dtype=torch.float64).flatten()
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if p.shape != r.shape:
        raise ValueError(f"{len(p)} locations but {len(r)} rewards")
    if len(p) and not bool(((p > 0) & (p <= 1)).all()):
        raise ValueError("locations must be in (0, 1]")
    keys, group = torch.unique(torch.round(p * 1e9), return_inverse=True)
    counts = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, group, torch.ones_like(r))
    sums = torch.zeros_like(counts).index_add_(0, group, r)
    means = sums / counts.clamp(min=1)
    squares = torch.zeros_like(counts).index_add_(0, group, (r - means[group]) ** 2)
    stds = (squares / counts.clamp(min=1)).sqrt()
    kept = counts >= min_count
    return LocationStatistics(keys[kept] / 1e9, means[kept], stds[kept], counts[kept])


@dataclass
class LocationNormalizer:
    """mu(p) = a_mu log p + b_mu, sigma(p) = a_sigma log p + b_sigma (floored at
    ``reference.SIGMA_FLOOR``, as the dense-reward op floors it), with what it was fitted for:
    the segmentation ``threshold``, the reward ``model`` (a path or name) and ``n`` segments."""

    a_mu: float
    b_mu: float
    a_sigma: float
    b_sigma: float
    threshold: float | None = None
    model: str | None = None
    n: int = 0

    @property
    def parameters(self) -> tuple[float, float, float, float]:
        """``(a_mu, b_mu, a_sigma, b_sigma)``: the ``normalizer`` argument of
        ``ops.segment_rewards_to_dense``."""
        return (self.a_mu, self.b_mu, self.a_sigma, self.b_sigma)

    def mu(self, p: float | torch.Tensor):
        return self.a_mu * _log(p) + self.b_mu

    def sigma(self, p: float | torch.Tensor):
        value = self.a_sigma * _log(p) + self.b_sigma
        return value.clamp(min=SIGMA_FLOOR) if isinstance(value, torch.Tensor) \
            else max(value, SIGMA_FLOOR)

    @classmethod
    def fit(cls, locations: torch.Tensor, rewards: torch.Tensor, *, min_count: int = 2,
            delta: float = HUBER_DELTA, threshold: float | None = None,
            model: str | None = None) -> LocationNormalizer:
        """Fit both lines on the per-location statistics (``location_statistics``), each
        location weighted by its number of segments."""
        stats = location_statistics(locations, rewards, min_count=min_count)
        if len(stats.locations) < 2:
            raise ValueError(f"fitting needs segments at 2 or more locations with >= "
                             f"{min_count} segments each, got {len(stats.locations)} (responses "
                             "with different segment counts give different locations: use more "
                             "or more varied responses, or a lower threshold)")
        log_p = stats.locations.log()
        a_mu, b_mu = huber_line_fit(log_p, stats.means, stats.counts, delta=delta)
        a_sigma, b_sigma = huber_line_fit(log_p, stats.stds, stats.counts, delta=delta)
        return cls(a_mu, b_mu, a_sigma, b_sigma, threshold, model,
                   int(torch.as_tensor(rewards).numel()))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        return atomic_write(path, lambda temporary: temporary.write_text(text))

    @classmethod
    def load(cls, path: str | Path) -> LocationNormalizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"normalizer file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
        if not isinstance(data, dict) or data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"{path}: not a location normalizer (format "
                             f"{data.get('format') if isinstance(data, dict) else None!r})")
        missing = [k for k in ("a_mu", "b_mu", "a_sigma", "b_sigma") if k not in data]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
        values = {}
        for key in ("a_mu", "b_mu", "a_sigma", "b_sigma"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{path}: {key} must be a finite number, got {value!r}")
            values[key] = float(value)
        return cls(**values, threshold=data.get("threshold"), model=data.get("model"),
                   n=int(data.get("n", 0)))


def _log(p):
    return p.log() if isinstance(p, torch.Tensor) else math.log(p)


@torch.no_grad()
def collect_segment_rewards(reward_model: RewardModel, entropy_model: torch.nn.Module,
                            tokenizer: Any, texts: Sequence[tuple[Text, Text]], *,
                            threshold: float, batch_size: int = 32,
                            max_length: int | None = None, kernels: Kernels = "engine",
                            device: str | torch.device | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw segment rewards of ``(prompt, response)`` texts and their locations: each response
    is segmented by ``entropy_model``'s next-token entropies (threshold ``threshold``; EOS is
    left out, as PPO's segment rewards leave it out) and each segment's reward is
    ``reward_model``'s value at its end. Returns ``(locations p [N], rewards [N])`` (float64)
    over all segments of all responses."""
    device = torch.device(device) if device is not None else \
        next(reward_model.parameters()).device
    examples = [RankedExample(prompt, [response], [0.0]) for prompt, response in texts]
    data = RankedDataset(examples, tokenizer, max_length=max_length)
    modes = (reward_model.training, entropy_model.training)
    reward_model.eval()
    entropy_model.eval()
    locations, rewards = [], []
    try:
        for start in range(0, len(data), batch_size):
            batch = data.collate([data[i] for i in range(start, min(start + batch_size,
                                                                      len(data)))])
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            response = batch["response_mask"].to(device)
            rows = torch.arange(len(ids), device=device)
            last = batch["last_index"].to(device)
            content = response.clone()
            if tokenizer.eos_token_id is not None:
                content[rows, last] &= ids[rows, last] != tokenizer.eos_token_id
            _, entropy = sequence_logprobs(entropy_model, ids, mask, response,
                                           with_entropy=True, kernels=kernels)
            values = reward_model(ids, mask).values
            segments = segment_rewards(values, next_token_entropy(entropy), content,
                                       threshold=threshold, kernels=kernels)
            p, r = segments.locations()
            locations.append(p.cpu())
            rewards.append(r.cpu())
    finally:
        reward_model.train(modes[0])
        entropy_model.train(modes[1])
    return torch.cat(locations), torch.cat(rewards)
