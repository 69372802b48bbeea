"""Which comparisons to label next (METHODS.md section 2).

Every strategy ranks a pool of candidate pairs from what the current preference model says
about them: ``z [n, D]``, the difference of the pair's last-layer features phi(e_a) - phi(e_b),
and ``gap [n]``, the predicted reward difference w . z. ``select`` returns the indices of the
``budget`` pairs to label, best first.

D-optimal design scores a pair by how much its Fisher information would grow log det of the
information matrix of the last layer w:

    score_i = p_i (1 - p_i) z_i^T M^{-1} z_i,    M = sum_j p_j (1 - p_j) z_j z_j^T + ridge I,

with p = sigmoid(gap). Plain D-opt sums M over the candidates; past-aware D-opt also over the
pairs labelled so far (their p recomputed with the current model), so pairs in directions that
are already well measured score less. The top-``budget`` scores are taken in one shot. M is
D x D and built in one pass; the scores need one Cholesky factor and a triangular solve per
chunk of candidates, so memory stays O(n D + D^2) (never an n x D x D tensor).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

Strategy = Literal["random", "entropy", "max_difference", "coreset", "dopt", "past_dopt",
                   "greedy_dopt"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
STRATEGY_HELP = {
    "random": "uniformly at random",
    "entropy": "the most uncertain pairs: smallest predicted reward gap |w.z|",
    "max_difference": "the largest predicted reward gap |w.z|",
    "coreset": "k-means (K clusters) on z, then the pairs nearest each centre in turn",
    "dopt": "D-optimal design on the last layer: top p(1-p) z^T M^-1 z over the candidates",
    "past_dopt": "D-optimal design whose M also holds the pairs labelled so far",
    "greedy_dopt": "D-optimal batch built one pair at a time: each pick is added to M (from "
                   "the labelled pairs and ridge) before the next is scored",
}
# Rows of z per triangular solve: bounds the temporary at CHUNK x D float64.
CHUNK = 16384
# The strategies that read the labelled pairs' features (past_z, past_gap).
USES_PAST = ("past_dopt", "greedy_dopt")


def fisher_weights(gap: torch.Tensor) -> torch.Tensor:
    """p (1 - p) with p = sigmoid(gap): the Bernoulli variance, in a form that stays accurate
    (and positive) for large |gap|."""
    p = torch.sigmoid(gap)
    return p * torch.sigmoid(-gap)


def information_matrix(z: torch.Tensor, weights: torch.Tensor, *, chunk: int = CHUNK
                       ) -> torch.Tensor:
    """sum_i weights_i z_i z_i^T in float64, in chunks of rows."""
    dim = z.shape[1]
    out = torch.zeros(dim, dim, dtype=torch.float64, device=z.device)
    for start in range(0, z.shape[0], chunk):
        block = z[start:start + chunk].double()
        out.addmm_(block.T, block * weights[start:start + chunk].double().unsqueeze(1))
    return out


def dopt_scores(z: torch.Tensor, gap: torch.Tensor, *, past_z: torch.Tensor | None = None,
                past_gap: torch.Tensor | None = None, ridge: float = 1e-6,
                chunk: int = CHUNK) -> torch.Tensor:
    """D-optimal scores p_i (1 - p_i) z_i^T M^{-1} z_i of every candidate (float64 [n]).

    M = sum over the candidates (and over ``past_z`` when given: past-aware D-opt) of
    p (1 - p) z z^T, plus ``ridge`` I. Without past pairs and with ridge 0 the scores sum to D
    (the trace of M^{-1} M), when M is invertible. Each score is d/dt log det(M + t w_i z_i
    z_i^T) at t = 0: the growth of the log-determinant per unit of the pair's information.
    """
    z, gap = _check_features(z, gap)
    weights = fisher_weights(gap.double())
    matrix = _past_matrix(z, past_z, past_gap, ridge, chunk=chunk)
    matrix += information_matrix(z, weights, chunk=chunk)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise ValueError("the information matrix is singular: use ridge > 0 (there are fewer "
                         "independent candidate directions than features)")
    scores = torch.empty(z.shape[0], dtype=torch.float64, device=z.device)
    for start in range(0, z.shape[0], chunk):
        block = z[start:start + chunk].double().T                   # [D, c]
        solved = torch.linalg.solve_triangular(factor, block, upper=False)  # L^-1 z
        scores[start:start + chunk] = solved.square().sum(0)        # z^T M^-1 z
    return scores * weights


def _past_matrix(z: torch.Tensor, past_z: torch.Tensor | None, past_gap: torch.Tensor | None,
                 ridge: float, *, chunk: int = CHUNK) -> torch.Tensor:
    """ridge I plus the information of the labelled pairs (when given): where M starts."""
    if (past_z is None) != (past_gap is None):
        raise ValueError("past_z and past_gap go together: give both or neither")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    matrix = ridge * torch.eye(z.shape[1], dtype=torch.float64, device=z.device)
    if past_z is not None:
        past_z, past_gap = _check_features(past_z, past_gap, what="past_z")
        if past_z.shape[1] != z.shape[1]:
            raise ValueError(f"past_z has {past_z.shape[1]} features, z has {z.shape[1]}")
        matrix += information_matrix(past_z, fisher_weights(past_gap.double()), chunk=chunk)
    return matrix


def greedy_dopt_order(z: torch.Tensor, gap: torch.Tensor, budget: int, *,
                      past_z: torch.Tensor | None = None, past_gap: torch.Tensor | None = None,
                      ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [budget], first-pick scores [n]): the batch that greedily maximises
    log det(M_past + ridge I + sum over the batch of p (1 - p) z z^T). Each pick is the
    candidate of largest gain p (1 - p) z^T M^-1 z, then M^-1 is updated by Sherman-Morrison,
    so a direction once covered stops attracting picks (the one-shot top-k of ``dopt`` can
    spend a whole batch on pairs that share one unusual item). O(n D) memory and work per
    pick."""
    z, gap = _check_features(z, gap)
    if ridge <= 0 and past_z is None:
        raise ValueError("greedy_dopt needs ridge > 0 or past pairs (M starts from them)")
    matrix = _past_matrix(z, past_z, past_gap, ridge)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(matrix))
    features = z.double()
    weights = fisher_weights(gap.double())
    solved = features @ inverse                       # rows: M^-1 z_i
    gains = weights * (solved * features).sum(1)
    first_scores = gains.clone()
    order = []
    for _ in range(min(budget, z.shape[0])):
        j = int(gains.argmax())
        order.append(j)
        u = solved[j].clone()                          # M^-1 z_j
        scale = weights[j] / (1 + weights[j] * float(features[j] @ u))
        projection = features @ u                      # z_i^T M^-1 z_j
        solved -= scale * projection[:, None] * u[None, :]
        gains -= weights * scale * projection.square()
        gains[j] = -math.inf   # stays -inf: later updates only subtract
    return torch.tensor(order, dtype=torch.long), first_scores


def _squared_distances(x: torch.Tensor, x_norms: torch.Tensor, centres: torch.Tensor
                       ) -> torch.Tensor:
    """[n, k] squared Euclidean distances through one matrix product (torch.cdist takes ~40x
    longer on 100k x 512 points)."""
    out = torch.addmm(x_norms[:, None], x, centres.T, alpha=-2.0)
    return out.add_(centres.square().sum(1)[None, :]).clamp_(min=0)


def kmeans(x: torch.Tensor, k: int, *, iterations: int = 20, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres [k, D], assignment [n]) by Lloyd's algorithm from k-means++ seeding, at most
    ``iterations`` rounds (each is O(n k D); a coreset needs rough clusters, not converged
    ones)."""
    n = x.shape[0]
    k = min(k, n)
    x = x.double()
    norms = x.square().sum(1)
    centres = x[torch.randint(n, (1,), generator=generator)]
    closest = _squared_distances(x, norms, centres).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:   # fewer distinct points than k: stop with what we have
            break
        pick = torch.multinomial(closest / total, 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
        closest = torch.minimum(closest, _squared_distances(x, norms, x[pick]).squeeze(1))
    assignment = _squared_distances(x, norms, centres).argmin(1)
    for _ in range(iterations):
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=len(centres)).unsqueeze(1)
        # an empty cluster keeps its centre
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        new = _squared_distances(x, norms, centres).argmin(1)
        if torch.equal(new, assignment):
            break
        assignment = new
    return centres, assignment


def coreset_order(z: torch.Tensor, budget: int, *, clusters: int = 10,
                  generator: torch.Generator) -> torch.Tensor:
    """``budget`` indices that cover the clusters of z evenly: the nearest unpicked member of
    each cluster's centre in turn (clusters that run out are skipped)."""
    centres, assignment = kmeans(z, clusters, generator=generator)
    z = z.double()
    distance = _squared_distances(z, z.square().sum(1), centres).gather(
        1, assignment[:, None]).squeeze(1)
    queues = []
    for c in range(len(centres)):
        members = (assignment == c).nonzero().squeeze(1)
        queues.append(members[distance[members].argsort()].tolist())
    picked: list[int] = []
    depth = 0
    while len(picked) < budget:
        row = [q[depth] for q in queues if depth < len(q)]
        if not row:
            break
        picked.extend(row[:budget - len(picked)])
        depth += 1
    return torch.tensor(picked, dtype=torch.long)


def select(strategy: Strategy, budget: int, *, z: torch.Tensor, gap: torch.Tensor,
           past_z: torch.Tensor | None = None, past_gap: torch.Tensor | None = None,
           ridge: float = 1e-6, clusters: int = 10, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [min(budget, n)], scores [n]): the candidates to label, best first, and every
    candidate's score under the strategy (higher is better; random: a random key)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    z, gap = _check_features(z, gap)
    n = z.shape[0]
    budget = min(budget, n)
    generator = torch.Generator().manual_seed(seed)
    if strategy == "random":
        scores = torch.rand(n, generator=generator, dtype=torch.float64)
    elif strategy == "entropy":
        scores = -gap.double().abs()
    elif strategy == "max_difference":
        scores = gap.double().abs()
    elif strategy == "greedy_dopt":
        order, scores = greedy_dopt_order(z, gap, budget, past_z=past_z, past_gap=past_gap,
                                          ridge=ridge)
        return order, scores.cpu()
    elif strategy == "coreset":
        order = coreset_order(z.cpu(), budget, clusters=clusters, generator=generator)
        scores = torch.zeros(n, dtype=torch.float64)
        scores[order] = torch.arange(len(order), 0, -1, dtype=torch.float64)
        return order, scores
    else:
        past = (past_z, past_gap) if strategy in USES_PAST else (None, None)
        scores = dopt_scores(z, gap, past_z=past[0], past_gap=past[1], ridge=ridge).cpu()
    # ties broken at random, so a strategy that cannot tell pairs apart acts like random
    shuffle = torch.randperm(n, generator=generator)
    order = shuffle[torch.argsort(-scores[shuffle], stable=True)]
    return order[:budget], scores


def _check_features(z: object, gap: object, what: str = "z") -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
        raise ValueError(f"{what} must be a 2-D float tensor [n, D]")
    if not isinstance(gap, torch.Tensor) or gap.shape != (z.shape[0],):
        raise ValueError(f"the gaps of {what} must be a tensor [n] = [{z.shape[0]}]")
    if not torch.isfinite(z).all() or not torch.isfinite(gap).all():
        raise ValueError(f"{what} and its gaps must be finite")
    return z, gap

