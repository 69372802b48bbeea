"""Plain-PyTorch definitions of every rlengine op: the executable spec.

Each function computes exactly what the kernel of the same name computes (the tests evaluate
these in float64 and compare the kernels' forward and backward with them). They favour being
obviously right over being fast, keep the kernels' conventions (ignored and masked positions
give exactly 0 value and 0 gradient), and are written with differentiable torch ops so that
autograd gives the reference gradients. Results come back in the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# sigma(p) of the location-aware normalizer is floored here so that a fitted line that crosses
# zero at tiny p (very many segments) cannot divide by zero or flip the reward's sign.
SIGMA_FLOOR = 1e-3


# ---- log-probs --------------------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, with_entropy: bool = False):
    """log softmax(logits / temperature)[label] per position (0 where label == ignore_index),
    and optionally the entropy -sum p log p of that distribution (0 where ignored)."""
    ignored = labels == ignore_index
    z = logits / temperature
    # Ignored rows are replaced before the softmax so that nothing there (not even an all -inf
    # row, whose log_softmax is NaN) reaches the result or the gradient.
    z = torch.where(ignored.unsqueeze(-1), torch.zeros((), dtype=z.dtype, device=z.device), z)
    logp = torch.log_softmax(z, dim=-1)
    safe_labels = torch.where(ignored, torch.zeros_like(labels), labels)
    logprobs = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(ignored, torch.zeros_like(logprobs), logprobs)
    if not with_entropy:
        return logprobs
    p = logp.exp()
    # p log p is 0 where p is 0 (a -inf logit); the where sits inside the product so that the
    # gradient does not meet 0 * inf either.
    logp_where_positive = torch.where(p > 0, logp, torch.zeros_like(logp))
    entropy = -(p * logp_where_positive).sum(-1)
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    return logprobs, entropy


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, *, temperature: float = 1.0,
                          ignore_index: int = -100, with_entropy: bool = False):
    """token_logprobs of the logits hidden @ weight.T + bias (which the kernels never form)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                          with_entropy=with_entropy)


# ---- ranking and preference losses -------------------------------------------------------------

def sequence_scores(token_logprobs: torch.Tensor, mask: torch.Tensor, *,
                    length_penalty: float = 1.0) -> torch.Tensor:
    """sum of the masked log-probs of each row / (number of masked positions) ** length_penalty.
    RRHF's p_i with length_penalty = 1; the plain sum with 0; rows with no position give 0."""
    mask = mask.bool()
    total = torch.where(mask, token_logprobs, torch.zeros_like(token_logprobs)).sum(-1)
    length = mask.sum(-1).clamp(min=1).to(token_logprobs.dtype)
    return total / length.pow(length_penalty)


def rrhf_rank_loss(scores: torch.Tensor, rewards: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """RRHF's ranking loss per query: sum over candidate pairs (i, j), both valid, with
    r_i < r_j of max(0, p_i - p_j). Ties (and NaN rewards) contribute nothing."""
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    valid = valid.bool()
    worse_than = (rewards.unsqueeze(2) < rewards.unsqueeze(1))  # [B, i, j]: r_i < r_j
    counted = worse_than & valid.unsqueeze(2) & valid.unsqueeze(1)
    gap = torch.relu(scores.unsqueeze(2) - scores.unsqueeze(1))  # max(0, p_i - p_j)
    return torch.where(counted, gap, torch.zeros_like(gap)).sum((1, 2))


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, *,
            margin: torch.Tensor | float | None = None,
            label_smoothing: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss per pair with delta = chosen - rejected - margin:
    (1 - a) * softplus(-delta) + a * softplus(delta), a the label smoothing.
    a = 0 gives -log sigmoid(delta); the margin may be negative (adaptive margin)."""
    delta = chosen - rejected
    if margin is not None:
        delta = delta - margin
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    # logaddexp(x, 0) = softplus(x), exact in both tails and with the right gradient at 0.
    return (1 - label_smoothing) * torch.logaddexp(-delta, zero) + \
        label_smoothing * torch.logaddexp(delta, zero)


# ---- advantages and returns ---------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float, last_values: torch.Tensor | None = None):
    """Generalized advantage estimation over the valid (mask = 1) positions of each row.

    Masked positions are skipped, not treated as steps: for a valid t, with t' the next valid
    position of the row,
        delta_t = r_t + gamma * V_t' - V_t,     A_t = delta_t + gamma * lam * A_t'
    and after the last valid position V = last_values (0 if None) and A = 0. Rewards and values
    at masked positions are ignored; A and the returns A + V are 0 there.
    """
    mask = mask.bool()
    batch, steps = rewards.shape
    zeros = torch.zeros(batch, dtype=values.dtype, device=values.device)
    next_value = zeros if last_values is None else last_values.to(values.dtype)
    next_advantage = zeros
    advantages = [zeros] * steps
    for t in reversed(range(steps)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[t] = torch.where(m, advantage, zeros)
        next_value = torch.where(m, values[:, t], next_value)
        next_advantage = torch.where(m, advantage, next_advantage)
    # (with T = 0 there is nothing to stack: the empty input itself, kept in the graph)
    advantages = torch.stack(advantages, dim=1) if steps else values.clone()
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float,
                       last_values: torch.Tensor | None = None) -> torch.Tensor:
    """G_t = r_t + gamma * G_t' over the valid positions (t' the next valid one; after the
    last, G = last_values or 0); 0 at masked positions, whose rewards are ignored."""
    mask = mask.bool()
    batch, steps = rewards.shape
    zeros = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_return = zeros if last_values is None else last_values.to(rewards.dtype)
    returns = [zeros] * steps
    for t in reversed(range(steps)):
        m = mask[:, t]
        g = rewards[:, t] + gamma * next_return
        returns[t] = torch.where(m, g, zeros)
        next_return = torch.where(m, g, next_return)
    return torch.stack(returns, dim=1) if steps else rewards.clone()


# ---- segment rewards ---------------------------------------------------------------------------

def entropy_segments(entropy: torch.Tensor, response_mask: torch.Tensor, *, threshold: float):
    """Entropy-based segmentation (METHODS.md section 3).

    Among the response positions (response_mask = 1) of each row, position t ends a segment iff
    entropy[t] > threshold, and the last response position always ends the last segment.
    Returns (segment_ids [B, T] int64: 0, 1, ... along the response, -1 elsewhere;
    counts [B] int64: the number of segments, 0 for a row with no response position).
    """
    valid = response_mask.bool()
    # The last response position is the one with no response position after it (written with a
    # reversed cumsum rather than an amax of positions, which fails on T = 0).
    at_or_after = valid.flip(-1).long().cumsum(-1).flip(-1)
    is_last = valid & (at_or_after == 1)
    is_end = valid & ((entropy > threshold) | is_last)
    ends_before = torch.cumsum(is_end.long(), -1) - is_end.long()
    segment_ids = torch.where(valid, ends_before, -1)
    return segment_ids, is_end.sum(-1)


def _segment_end_positions(segment_ids: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """[B, T]: position of the last eligible token of segment k at [b, k], -1 if none."""
    positions = torch.arange(segment_ids.shape[-1], device=segment_ids.device)
    positions = positions.expand_as(segment_ids)
    ends = torch.full_like(segment_ids, -1)
    return ends.scatter_reduce(1, segment_ids.clamp(min=0), torch.where(eligible, positions, -1),
                               reduce="amax")


def segment_reduce(values: torch.Tensor, segment_ids: torch.Tensor, counts: torch.Tensor, *,
                   reduce: str = "end_mean") -> torch.Tensor:
    """Reduce per-token values over the segments of entropy_segments.

    reduce = "end_mean": [B], the mean over the row's segments of the value at each segment's
        last token (the segment reward model's sequence score; 0 for a row with no segment).
    reduce = "end" | "sum" | "mean": [B, T], at [b, k] the value at segment k's last token, or
        the sum or mean of its tokens' values; 0 for k >= counts[b].
    """
    valid = segment_ids >= 0
    index = segment_ids.clamp(min=0)
    kept = torch.where(valid, values, torch.zeros_like(values))
    if reduce in ("sum", "mean"):
        total = torch.zeros_like(values).scatter_add(1, index, kept)
        if reduce == "sum":
            return total
        length = torch.zeros_like(values).scatter_add(1, index, valid.to(values.dtype))
        return total / length.clamp(min=1)
    ends = _segment_end_positions(segment_ids, valid)
    has_segment = ends >= 0
    at_end = torch.where(has_segment, values.gather(1, ends.clamp(min=0)), torch.zeros_like(values))
    if reduce == "end":
        return at_end
    if reduce == "end_mean":
        return at_end.sum(-1) / counts.clamp(min=1).to(values.dtype)
    raise ValueError(f"unknown reduce {reduce!r}")


def location_normalizer(location: torch.Tensor, normalizer: Sequence[float]):
    """mu(p) = a_mu log p + b_mu and sigma(p) = max(a_sigma log p + b_sigma, SIGMA_FLOOR)."""
    a_mu, b_mu, a_sigma, b_sigma = normalizer
    log_p = torch.log(location)
    return a_mu * log_p + b_mu, (a_sigma * log_p + b_sigma).clamp(min=SIGMA_FLOOR)


def segment_rewards_to_dense(segment_rewards: torch.Tensor, segment_ids: torch.Tensor,
                             counts: torch.Tensor, mask: torch.Tensor, *,
                             normalizer: Sequence[float] | None = None, spread: str = "even",
                             clamp: float | None = 10.0) -> torch.Tensor:
    """Per-token rewards [B, T] from per-segment rewards [B, Kmax] (METHODS.md section 3).

    A token receives reward iff mask = 1 and segment_ids >= 0. Segment k of a row with K
    segments has location p = (k + 1) / K; with a normalizer its reward becomes
    (r_k - mu(p)) / sigma(p). spread = "even": each receiving token of the segment gets
    r / (its number of receiving tokens); "repeat": each gets r; "end": only the segment's last
    receiving token gets r. Then each token's reward is clamped to [-clamp, clamp].
    """
    receives = mask.bool() & (segment_ids >= 0)
    index = segment_ids.clamp(min=0)
    if segment_rewards.shape[1] == 0:
        # No row has a segment (Kmax = 0): nothing is read, but gather needs a column to index.
        segment_rewards = torch.nn.functional.pad(segment_rewards, (0, 1))
    reward = segment_rewards.gather(1, index)
    if normalizer is not None:
        location = (index + 1).to(reward.dtype) / counts.clamp(min=1).unsqueeze(1).to(reward.dtype)
        mu, sigma = location_normalizer(location, normalizer)
        reward = (reward - mu) / sigma
    if spread == "even":
        length = torch.zeros_like(reward).scatter_add(1, index, receives.to(reward.dtype))
        reward = reward / length.gather(1, index).clamp(min=1)
    elif spread == "end":
        ends = _segment_end_positions(segment_ids, receives)
        positions = torch.arange(segment_ids.shape[-1], device=segment_ids.device)
        receives = receives & (ends.gather(1, index) == positions)
    elif spread != "repeat":
        raise ValueError(f"unknown spread {spread!r}")
    dense = torch.where(receives, reward, torch.zeros_like(reward))
    if clamp is not None:
        dense = dense.clamp(-clamp, clamp)
    return dense


# ---- masked statistics ------------------------------------------------------------------------

def _count(mask: torch.Tensor, dim: int | None, dtype: torch.dtype) -> torch.Tensor:
    return (mask.sum() if dim is None else mask.sum(dim)).to(dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is true (all of x, or along dim); 0 if none."""
    mask = mask.bool()
    kept = torch.where(mask, x, torch.zeros_like(x))
    total = kept.sum() if dim is None else kept.sum(dim)
    return total / _count(mask, dim, x.dtype).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, *,
               unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions (Bessel-corrected if unbiased); 0 when there are
    fewer than two positions (unbiased) or none."""
    mask = mask.bool()
    # Masked-out values are replaced before any arithmetic: an inf there would otherwise turn
    # the (discarded) squares into inf and their zero gradient into 0 * inf = NaN.
    x = torch.where(mask, x, torch.zeros_like(x))
    mean = masked_mean(x, mask, dim)
    centered = x - (mean if dim is None else mean.unsqueeze(dim))
    squares = torch.where(mask, centered * centered, torch.zeros_like(x))
    total = squares.sum() if dim is None else squares.sum(dim)
    count = _count(mask, dim, x.dtype)
    return total / (count - 1 if unbiased else count).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with the mean and variance of all masked positions, plus the
    mean again if not shift_mean; 0 at unmasked positions."""
    mask = mask.bool()
    x = torch.where(mask, x, torch.zeros_like(x))  # see masked_var
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask, unbiased=unbiased) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))
