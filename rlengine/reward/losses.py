"""The reward-model objectives of Secrets of RLHF II (METHODS.md section 1) besides the BT loss
itself (``rlengine.ops.bt_loss``, with margin and label smoothing): preference strength from
several reward models' votes, MetaRM's difference objective, and the SimCSE and SwAV
contrastive losses on reward-model representations.

Sign convention everywhere: d = r(chosen) - r(rejected).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_strength(score_differences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Strength of each pair by voting: ``score_differences[m, i]`` is model m's
    r(chosen_i) - r(rejected_i); returns (mu, sigma) per pair, the mean over the M models and
    their population standard deviation (METHODS.md: sigma is the population std)."""
    if score_differences.dim() != 2 or score_differences.shape[0] < 1:
        raise ValueError("preference_strength: score_differences must be [M models, n pairs] "
                         f"with M >= 1, got shape {tuple(score_differences.shape)}")
    d = score_differences.double()
    return d.mean(0), d.std(0, correction=0)


def metarm_difference_objective(rewards: torch.Tensor) -> torch.Tensor:
    """MetaRM's difference objective J, to be *maximized* on the meta set (k unlabeled policy
    samples per prompt): J = (2 / k^2) * sum over i < j of sigmoid(|r_i - r_j|), averaged over
    prompts. ``rewards`` is [P prompts, k samples] (or [k] for one prompt)."""
    if rewards.dim() == 1:
        rewards = rewards.unsqueeze(0)
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError("metarm_difference_objective: rewards must be [prompts, k] with k >= 2, "
                         f"got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    gaps = (rewards.unsqueeze(2) - rewards.unsqueeze(1)).abs()
    pairs = torch.triu(torch.ones(k, k, dtype=torch.bool, device=rewards.device), diagonal=1)
    per_prompt = torch.sigmoid(gaps)[:, pairs].sum(1) * (2.0 / k**2)
    return per_prompt.mean()


def simcse_loss(view_a: torch.Tensor, view_b: torch.Tensor, *,
                temperature: float = 0.05) -> torch.Tensor:
    """SimCSE's InfoNCE: row i of view_a and row i of view_b (two dropout views of one input)
    are positives, the other rows of view_b negatives; cosine similarity over temperature."""
    _check_views("simcse_loss", view_a, view_b)
    if temperature <= 0:
        raise ValueError(f"simcse_loss: temperature must be > 0, got {temperature}")
    similarity = F.normalize(view_a.float(), dim=-1) @ F.normalize(view_b.float(), dim=-1).T
    targets = torch.arange(view_a.shape[0], device=view_a.device)
    return F.cross_entropy(similarity / temperature, targets)


@torch.no_grad()
def sinkhorn_codes(scores: torch.Tensor, *, epsilon: float = 0.05,
                   iterations: int = 3) -> torch.Tensor:
    """SwAV's codes: soft assignments [B, K] of B samples to K prototypes from their scores,
    with equal total mass per prototype (Sinkhorn-Knopp, ``iterations`` rounds). Each row sums
    to 1. Computed without gradient, as in SwAV."""
    batch, prototypes = scores.shape
    logits = scores.double() / epsilon
    q = torch.exp(logits - logits.max()).T  # [K, B]; the shift cancels in the normalizations
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    return (q * batch).T.to(scores.dtype)


def swav_loss(view_a: torch.Tensor, view_b: torch.Tensor, prototypes: torch.Tensor, *,
              temperature: float = 0.1, epsilon: float = 0.05,
              iterations: int = 3) -> torch.Tensor:
    """SwAV's swapped prediction: each view's Sinkhorn codes over the (learned) prototypes
    [K, D] are the targets of the other view's softmax over prototype scores / temperature."""
    _check_views("swav_loss", view_a, view_b)
    if prototypes.dim() != 2 or prototypes.shape[1] != view_a.shape[1]:
        raise ValueError(f"swav_loss: prototypes must be [K, {view_a.shape[1]}], got shape "
                         f"{tuple(prototypes.shape)}")
    weights = F.normalize(prototypes.float(), dim=-1)
    scores_a = F.normalize(view_a.float(), dim=-1) @ weights.T
    scores_b = F.normalize(view_b.float(), dim=-1) @ weights.T
    codes_a = sinkhorn_codes(scores_a, epsilon=epsilon, iterations=iterations)
    codes_b = sinkhorn_codes(scores_b, epsilon=epsilon, iterations=iterations)
    log_p_a = F.log_softmax(scores_a / temperature, dim=-1)
    log_p_b = F.log_softmax(scores_b / temperature, dim=-1)
    return -0.5 * ((codes_a * log_p_b).sum(-1) + (codes_b * log_p_a).sum(-1)).mean()


def _check_views(op: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape or a.shape[0] < 1:
        raise ValueError(f"{op}: the two views must be [B, D] tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
