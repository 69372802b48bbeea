"""The reward-model objectives of rlengine.reward.losses against hand computations."""

import itertools
import math

import pytest
import torch

from rlengine.reward import losses


def test_metarm_difference_objective_matches_methods_example():
    # METHODS.md / issue 4: rewards [0.5, 1.5, -0.2, 0.9] give 0.5299.
    value = losses.metarm_difference_objective(torch.tensor([0.5, 1.5, -0.2, 0.9]))
    assert round(float(value), 4) == 0.5299


def test_metarm_difference_objective_by_hand_and_gradient():
    rewards = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    expected = sum(
        2.0 / 36 * sum(1 / (1 + math.exp(-abs(float(r[i] - r[j]))))
                       for i, j in itertools.combinations(range(6), 2))
        for r in rewards.detach()) / 5
    value = losses.metarm_difference_objective(rewards)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    # Ascending J pushes rewards apart: the gradient of the largest reward of a prompt is
    # positive and that of the smallest negative.
    (grad,) = torch.autograd.grad(value, rewards)
    rows = torch.arange(5)
    assert (grad[rows, rewards.argmax(1)] > 0).all()
    assert (grad[rows, rewards.argmin(1)] < 0).all()


def test_preference_strength_is_mean_and_population_std():
    d = torch.randn(7, 30)
    mu, sigma = losses.preference_strength(d)
    torch.testing.assert_close(mu, d.double().mean(0))
    expected = ((d.double() - d.double().mean(0)) ** 2).mean(0).sqrt()
    torch.testing.assert_close(sigma, expected)
    with pytest.raises(ValueError, match=r"\[M models, n pairs\]"):
        losses.preference_strength(torch.randn(30))


def test_simcse_loss_matches_infonce_by_hand():
    a, b = torch.randn(6, 9), torch.randn(6, 9)
    tau = 0.07
    expected = 0.0
    for i in range(6):
        sims = [float(torch.cosine_similarity(a[i], b[j], dim=0)) / tau for j in range(6)]
        expected += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    assert float(losses.simcse_loss(a, b, temperature=tau)) == pytest.approx(expected / 6,
                                                                             rel=1e-4)


def test_simcse_loss_is_small_for_matching_views_and_large_for_swapped():
    a = torch.eye(8, 16) * 3
    assert float(losses.simcse_loss(a, a)) < 1e-6
    assert float(losses.simcse_loss(a, a.roll(1, 0))) > 10


def test_sinkhorn_codes_balance_prototypes():
    # Scores are cosine similarities in SwAV; each sample's code is a distribution (exact after
    # the last normalization) and the prototypes' totals approach B / K as iterations go on.
    scores = torch.rand(64, 8) * 2 - 1
    codes = losses.sinkhorn_codes(scores, iterations=100)
    torch.testing.assert_close(codes.sum(1), torch.ones(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(codes.sum(0), torch.full((8,), 64 / 8), atol=1e-2, rtol=0)
    few = losses.sinkhorn_codes(scores, iterations=3)
    unbalanced = (scores.double() / 0.05).softmax(1)  # the assignment before any balancing
    assert (few.sum(0) - 8).abs().max() < (unbalanced.sum(0) - 8).abs().max()
    assert (codes >= 0).all()


def test_swav_loss_by_hand_and_gradients():
    a = torch.randn(10, 5, requires_grad=True)
    b = torch.randn(10, 5, requires_grad=True)
    prototypes = torch.randn(4, 5, requires_grad=True)
    loss = losses.swav_loss(a, b, prototypes, temperature=0.1)
    w = torch.nn.functional.normalize(prototypes.detach(), dim=-1)
    sa = torch.nn.functional.normalize(a.detach(), dim=-1) @ w.T
    sb = torch.nn.functional.normalize(b.detach(), dim=-1) @ w.T
    qa, qb = losses.sinkhorn_codes(sa), losses.sinkhorn_codes(sb)
    expected = -0.5 * ((qa * torch.log_softmax(sb / 0.1, -1)).sum(-1)
                       + (qb * torch.log_softmax(sa / 0.1, -1)).sum(-1)).mean()
    torch.testing.assert_close(loss.detach(), expected)
    grads = torch.autograd.grad(loss, [a, b, prototypes])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("call, fragment", [
    (lambda: losses.metarm_difference_objective(torch.randn(3, 1)), "k >= 2"),
    (lambda: losses.simcse_loss(torch.randn(3, 4), torch.randn(3, 5)), "one shape"),
    (lambda: losses.simcse_loss(torch.randn(3, 4), torch.randn(3, 4), temperature=0), "> 0"),
    (lambda: losses.swav_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 5)),
     r"prototypes must be \[K, 4\]"),
])
def test_bad_arguments_raise_named_errors(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()
