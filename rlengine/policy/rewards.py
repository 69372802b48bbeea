"""Per-token rewards ``[B, T]`` for policy optimization, token-aligned with a rollout (see
rlengine.policy.rollout), and what shapes them: the KL penalty (k1, k2, k3 estimators) with a
fixed or adaptive coefficient, whitening, clipping and the EOS penalty.

Sources of reward (METHODS.md sections 3 and 5):

- ``bandit_rewards``: one sequence reward at the response's last token (EOS when generated),
  the classic RLHF reward model's read-out;
- ``token_level_rewards``: the reward model's value at every response token except EOS;
- ``segment_dense_rewards``: entropy segmentation by the reference policy, segment rewards =
  head values at segment ends, the location-aware normalizer, spread over each segment's
  tokens (even / repeat / end) and clamped;
- ``sequence_rewards_at_last_token``: any per-response number (a Python gold reward) at the
  last token.

Everything here is a tensor function; ``RewardModelRewards`` and ``FunctionRewards`` apply them
to a Rollout. Segment work runs through the engine's segment ops (or their eager references
with ``kernels="reference"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from rlengine.policy.rollout import Kernels, Rollout, kernel_ops, last_response_index
from rlengine.reward.model import RewardModel

RewardKind = Literal["bandit", "token", "segment"]
REWARD_KINDS = get_args(RewardKind)
Spread = Literal["even", "repeat", "end"]
KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS = get_args(KLEstimator)
GoldFunction = Callable[[Any, str, bool], float]


# ---- placements -----------------------------------------------------------------------------

def sequence_rewards_at_last_token(scores: torch.Tensor, response_mask: torch.Tensor
                                   ) -> torch.Tensor:
    """``[B, T]``: ``scores[b]`` at row b's last response token, 0 elsewhere (rows without a
    response token get nothing)."""
    if scores.shape != response_mask.shape[:1]:
        raise ValueError(f"scores must be [B={response_mask.shape[0]}], got "
                         f"{tuple(scores.shape)}")
    mask = response_mask.bool()
    dense = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    last = last_response_index(mask)
    dense[rows, last] = torch.where(mask.any(-1), scores.float().to(mask.device), 0.0)
    return dense


def bandit_rewards(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The reward model's value at the last response token (EOS when the response has one),
    placed there: ``([B, T] rewards, [B] scores)``."""
    rows = torch.arange(values.shape[0], device=values.device)
    scores = values[rows, last_response_index(response_mask)].float()
    return sequence_rewards_at_last_token(scores, response_mask), scores


def token_level_rewards(values: torch.Tensor, content_mask: torch.Tensor, *,
                        normalizer: Sequence[float] | None = None, clamp: float | None = 10.0,
                        kernels: Kernels = "engine") -> torch.Tensor:
    """The value at every content token (response without EOS) as its reward: segmentation
    with one token per segment, through the same segment ops as ``segment_dense_rewards``, so
    a normalizer fitted with threshold 0 applies (location k/K of the token) and the clamp
    too."""
    impl = kernel_ops(kernels)
    mask = content_mask.bool()
    segment_ids = torch.where(mask, mask.long().cumsum(-1) - 1, -1)
    counts = mask.sum(-1)
    segment_rewards = impl.segment_reduce(values.float(), segment_ids, counts, reduce="end")
    return impl.segment_rewards_to_dense(segment_rewards, segment_ids, counts, mask,
                                         normalizer=normalizer, spread="end", clamp=clamp)


@dataclass
class Segments:
    """A segmentation (``ops.entropy_segments``) and the raw segment rewards on it:
    ``segment_ids [B, T]``, ``counts [B]``, ``rewards [B, Kmax]`` (column k: segment k's raw
    reward, the head's value at its last token)."""

    segment_ids: torch.Tensor
    counts: torch.Tensor
    rewards: torch.Tensor

    def locations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p, r)``: the location ``(k + 1) / K`` and raw reward of every segment, flat."""
        k_max = self.rewards.shape[1]
        k = torch.arange(k_max, device=self.counts.device)
        present = k.unsqueeze(0) < self.counts.unsqueeze(1)
        p = (k + 1).unsqueeze(0).double() / self.counts.clamp(min=1).unsqueeze(1).double()
        return p[present], self.rewards[present].double()


def segment_rewards(values: torch.Tensor, next_entropy: torch.Tensor,
                    content_mask: torch.Tensor, *, threshold: float,
                    kernels: Kernels = "engine") -> Segments:
    """Segment the content tokens where the reference policy's next-token entropy
    (``next_entropy``, aligned as ``ops.entropy_segments`` wants: column t predicts token t+1;
    see ``rollout.next_token_entropy``) exceeds ``threshold``, and read each segment's reward
    at its end."""
    impl = kernel_ops(kernels)
    mask = content_mask.bool()
    segment_ids, counts = impl.entropy_segments(next_entropy, mask, threshold=threshold)
    k_max = max(int(counts.max()) if counts.numel() else 0, 1)
    rewards = impl.segment_reduce(values.float(), segment_ids, counts, reduce="end")[:, :k_max]
    return Segments(segment_ids, counts, rewards)


def segment_dense_rewards(values: torch.Tensor, next_entropy: torch.Tensor,
                          content_mask: torch.Tensor, *, threshold: float,
                          normalizer: Sequence[float] | None = None, spread: Spread = "even",
                          clamp: float | None = 10.0, kernels: Kernels = "engine"
                          ) -> tuple[torch.Tensor, Segments]:
    """METHODS.md section 3's dense rewards: ``r~_k = (r_k - mu(k/K)) / sigma(k/K)`` spread
    over segment k's tokens and clamped to ``[-clamp, clamp]``; EOS, prompt and padding get 0.
    Returns ``([B, T] rewards, the segments)``."""
    impl = kernel_ops(kernels)
    segments = segment_rewards(values, next_entropy, content_mask, threshold=threshold,
                               kernels=kernels)
    dense = impl.segment_rewards_to_dense(segments.rewards, segments.segment_ids,
                                          segments.counts, content_mask.bool(),
                                          normalizer=normalizer, spread=spread, clamp=clamp)
    return dense, segments


# ---- KL shaping -----------------------------------------------------------------------------

def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *,
                estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of tokens sampled from pi
    (Schulman's estimators), 0 outside ``mask``. With ``log_ratio = log pi - log pi_ref``:
    k1 = log_ratio (unbiased, can be negative); k2 = log_ratio^2 / 2 (low variance, biased);
    k3 = exp(-log_ratio) - 1 + log_ratio (unbiased and >= 0)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio.square()
    else:
        kl = torch.expm1(-log_ratio) + log_ratio
    return torch.where(mask.bool(), kl, 0.0)


def kl_shaped_rewards(rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, *, beta: float, estimator: KLEstimator = "k1"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``R_t = r_t - beta * KL_t`` at the response tokens (METHODS.md: beta 0.01, k1):
    ``(shaped rewards, per-token KL)``."""
    kl = kl_estimate(logprobs, ref_logprobs, mask, estimator=estimator)
    return torch.where(mask.bool(), rewards.float() - beta * kl, 0.0), kl


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, beta: float):
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): after a batch of ``n_steps`` samples (tokens or sequences, as
    ``horizon`` counts them) with mean KL ``current_kl``, multiply beta by
    ``1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon``: beta grows while the
    policy drifts further than ``target`` and shrinks while it stays closer."""

    def __init__(self, beta: float, target: float, horizon: int):
        if not beta > 0:
            raise ValueError(f"beta must be > 0 for the adaptive controller, got {beta}")
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def make_kl_controller(beta: float, *, target: float | None = None, horizon: int = 10000):
    """Adaptive with a ``target`` KL, else fixed."""
    if target is None:
        return FixedKLController(beta)
    return AdaptiveKLController(beta, target, horizon)


# ---- shaping --------------------------------------------------------------------------------

def whiten_rewards(rewards: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = False,
                   kernels: Kernels = "engine") -> torch.Tensor:
    """Rewards scaled to unit variance over the batch's masked tokens (``ops.masked_whiten``);
    the mean is kept unless ``shift_mean`` (a reward's sign carries meaning)."""
    return kernel_ops(kernels).masked_whiten(rewards.float(), mask.bool(), shift_mean=shift_mean)


def clip_rewards(rewards: torch.Tensor, bound: float | None) -> torch.Tensor:
    """Each reward clamped to ``[-bound, bound]`` (None: unchanged)."""
    if bound is None:
        return rewards
    if not bound > 0:
        raise ValueError(f"reward clip bound must be > 0, got {bound}")
    return rewards.clamp(-bound, bound)


def apply_eos_penalty(rewards: torch.Tensor, response_mask: torch.Tensor,
                      terminated: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract ``penalty`` at the last token of every response that never produced EOS (cut at
    the length limit), so that rambling on is never free."""
    if penalty == 0:
        return rewards
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    out = rewards.clone()
    unterminated = ~terminated.bool().to(rewards.device) & response_mask.bool().any(-1)
    out[rows, last_response_index(response_mask)] -= penalty * unterminated.to(rewards.dtype)
    return out


# ---- reward sources applied to rollouts -----------------------------------------------------

@dataclass
class RolloutRewards:
    """``token_rewards [B, T]`` (before KL shaping) and ``scores [B]``, each response's total
    reward (the sum of its token rewards); ``segments`` for segment rewards."""

    token_rewards: torch.Tensor
    scores: torch.Tensor
    segments: Segments | None = None


class RewardModelRewards:
    """Per-token rewards of a rollout from a RewardModel that shares the policy's tokenizer.

    ``kind``: "bandit" (value at the last token), "token" (value at each content token) or
    "segment" (needs ``next_entropy`` from the reference policy at call time: see
    ``rollout.next_token_entropy``). ``normalizer``: (a_mu, b_mu, a_sigma, b_sigma), e.g.
    ``LocationNormalizer.load(path).parameters`` (segment and token kinds).
    """

    def __init__(self, reward_model: RewardModel, *, kind: RewardKind = "bandit",
                 threshold: float = 1.75, normalizer: Sequence[float] | None = None,
                 spread: Spread = "even", clamp: float | None = 10.0,
                 kernels: Kernels = "engine"):
        if kind not in REWARD_KINDS:
            raise ValueError(f"kind must be one of {REWARD_KINDS}, got {kind!r}")
        if not isinstance(reward_model, RewardModel):
            raise TypeError(f"reward_model must be a RewardModel, got "
                            f"{type(reward_model).__name__}")
        if kind == "bandit" and normalizer is not None:
            raise ValueError("a location normalizer applies to token and segment rewards, not "
                             "to bandit rewards")
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        self.reward_model = reward_model
        self.kind = kind
        self.threshold = threshold
        self.normalizer = None if normalizer is None else tuple(float(x) for x in normalizer)
        self.spread = spread
        self.clamp = clamp
        self.kernels = kernels

    @torch.no_grad()
    def values(self, rollout: Rollout) -> torch.Tensor:
        model = self.reward_model
        was_training = model.training
        model.eval()
        try:
            return model(rollout.input_ids, rollout.attention_mask, rollout.position_ids).values
        finally:
            model.train(was_training)

    def __call__(self, rollout: Rollout, *, next_entropy: torch.Tensor | None = None
                 ) -> RolloutRewards:
        values = self.values(rollout)
        if self.kind == "bandit":
            dense, scores = bandit_rewards(values, rollout.response_mask)
            return RolloutRewards(dense, scores)
        content = rollout.content_mask
        if self.kind == "token":
            dense = token_level_rewards(values, content, normalizer=self.normalizer,
                                        clamp=self.clamp, kernels=self.kernels)
            return RolloutRewards(dense, dense.sum(-1))
        if next_entropy is None:
            raise ValueError("segment rewards need next_entropy: the reference policy's "
                             "next-token entropies on the rollout (rollout.next_token_entropy "
                             "of response_logprobs(reference, rollout, with_entropy=True))")
        dense, segments = segment_dense_rewards(
            values, next_entropy, content, threshold=self.threshold, normalizer=self.normalizer,
            spread=self.spread, clamp=self.clamp, kernels=self.kernels)
        return RolloutRewards(dense, dense.sum(-1), segments)


class FunctionRewards:
    """Per-token rewards from a Python function ``fn(prompt, response, terminated) -> float``
    (e.g. ``SyntheticTask.gold_reward`` through a lambda), placed at the last token."""

    def __init__(self, fn: GoldFunction):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def scores(self, prompts: Sequence[Any], responses: Sequence[str],
               terminated: Sequence[bool]) -> list[float]:
        out = []
        for i, (prompt, response, ended) in enumerate(zip(prompts, responses, terminated)):
            value = float(self.fn(prompt, response, bool(ended)))
            if not math.isfinite(value):
                raise ValueError(f"the reward function returned {value} for row {i} "
                                 f"(prompt {prompt!r}, response {response!r})")
            out.append(value)
        return out

    def __call__(self, rollout: Rollout, *, next_entropy: torch.Tensor | None = None
                 ) -> RolloutRewards:
        scores = torch.tensor(self.scores(rollout.prompts, rollout.responses,
                                          rollout.terminated.tolist()), dtype=torch.float32,
                              device=rollout.input_ids.device)
        return RolloutRewards(sequence_rewards_at_last_token(scores, rollout.response_mask),
                              scores)
