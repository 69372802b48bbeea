"""gae and discounted_returns against the ways the anchors compute advantages and returns.

Baselines (written here the way those projects write them, not imported):
  python_loop:       TRL's / OpenRLHF's loop over time: every position is a step, the value
                     after the last one is 0, no mask inside the loop (they mask rewards and
                     values beforehand). The speed anchor of the target; with holes in the mask
                     its results differ from ours by design.
  verl_masked_loop:  veRL's multi-turn loop: the next value and the running advantage are
                     carried over masked positions with mask arithmetic. It computes exactly our
                     semantics (checked against rlengine before timing).
  torch_vectorized:  no loop over time: with k_t the number of valid positions up to t and
                     c = gamma * lam, A_t = (sum over valid s >= t of c^k_s delta_s) / c^k_t, a
                     reverse cumsum in float64, the next valid value found by a reverse cummin.
                     Exact in float64 as long as c^(valid positions in a row) stays inside the
                     float64 range (c = 0.95: up to ~13000 positions); outside it raises, and
                     that case is skipped. Checked against rlengine before timing. It runs a
                     dozen multi-threaded ATen ops, so it suffers most from busy cores.
GAE runs under no_grad in PPO, so the timed cases are forward only; one forward+backward case
compares with the reference's autograd for information.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import backward_of, run

from rlengine import ops
from rlengine.ops import reference

GAMMA, LAM = 1.0, 0.95  # the segment-reward paper's PPO settings


def multi_turn_mask(batch: int, steps: int) -> torch.Tensor:
    """Responses of random length (right padding) with two masked tool outputs each."""
    mask = torch.zeros(batch, steps, dtype=torch.bool)
    lengths = torch.randint(steps // 2, steps + 1, (batch,))
    for b, length in enumerate(lengths.tolist()):
        mask[b, :length] = True
        for _ in range(2):
            start = int(torch.randint(0, max(1, length - steps // 16), ()))
            mask[b, start:start + int(torch.randint(1, steps // 16 + 1, ()))] = False
    return mask


# ---- baselines ----------------------------------------------------------------------------------

def python_loop_gae(rewards, values, mask, gamma, lam):
    steps = rewards.shape[1]
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(steps)):
        nextvalues = values[:, t + 1] if t < steps - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def verl_masked_loop_gae(rewards, values, mask, gamma, lam):
    m = mask.to(values.dtype)
    nextvalues = 0
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages * m, (advantages + values) * m


def torch_vectorized_gae(rewards, values, mask, gamma, lam):
    batch, steps = rewards.shape
    c = gamma * lam
    valid = mask.bool()
    r = rewards.double()
    v = values.double() if values is not None else torch.zeros_like(r)
    count = torch.cumsum(valid, 1)
    if c == 0.0 or float(count[:, -1].max()) * -math.log(c) > 700.0:
        raise ValueError("torch_vectorized: c^k leaves the float64 range for these rows")
    positions = torch.arange(steps).expand(batch, steps)
    first_valid_from = torch.where(valid, positions, steps).flip(1).cummin(1).values.flip(1)
    next_valid = torch.cat([first_valid_from[:, 1:], torch.full((batch, 1), steps)], 1)
    next_value = torch.cat([v, torch.zeros(batch, 1, dtype=v.dtype)], 1).gather(1, next_valid)
    delta = torch.where(valid, r + gamma * next_value - v, 0.0)
    weight = torch.exp(count.double() * math.log(c))  # c^k_t
    tail = (weight * delta).flip(1).cumsum(1).flip(1)
    advantages = torch.where(valid, tail / weight, 0.0)
    if values is None:
        return advantages.float()
    return advantages.float(), torch.where(valid, advantages + v, 0.0).float()


def python_loop_returns(rewards, mask, gamma):
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    cumulative = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        cumulative = rewards[:, t] + gamma * cumulative
        returns[:, t] = cumulative
    return returns


def verl_masked_loop_returns(rewards, mask, gamma):
    m = mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    cumulative = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        cumulative = m[:, t] * (rewards[:, t] + gamma * cumulative) + (1 - m[:, t]) * cumulative
        returns[:, t] = cumulative * m[:, t]
    return returns


GAE_IMPLEMENTATIONS = {
    "rlengine": lambda r, v, m, gamma, lam: ops.gae(r, v, m, gamma=gamma, lam=lam),
    "python_loop": python_loop_gae,
    "verl_masked_loop": verl_masked_loop_gae,
    "torch_vectorized": torch_vectorized_gae,
}
RETURNS_IMPLEMENTATIONS = {
    "rlengine": lambda r, m, g: ops.discounted_returns(r, m, gamma=g),
    "python_loop": python_loop_returns,
    "verl_masked_loop": verl_masked_loop_returns,
    "torch_vectorized": lambda r, m, g: torch_vectorized_gae(r, None, m, g, 1.0),
}
# Baselines that compute exactly our semantics, checked against rlengine before timing.
SAME_SEMANTICS = ("verl_masked_loop", "torch_vectorized")


def _inputs(batch, steps):
    return torch.randn(batch, steps), torch.randn(batch, steps), multi_turn_mask(batch, steps)


def _check_agrees(impl, fn, expected_fn):
    if impl not in SAME_SEMANTICS:
        return
    try:
        got = fn()
    except ValueError as error:
        pytest.skip(str(error))
    expected = expected_fn()
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("impl", GAE_IMPLEMENTATIONS)
@pytest.mark.parametrize("batch, steps, rounds", [(64, 2048, 5), (512, 8192, 2), (1, 16384, 1)])
def bench_gae(benchmark, impl, batch, steps, rounds):
    rewards, values, mask = _inputs(batch, steps)
    fn = GAE_IMPLEMENTATIONS[impl]
    _check_agrees(impl, lambda: fn(rewards, values, mask, GAMMA, LAM),
                  lambda: ops.gae(rewards, values, mask, gamma=GAMMA, lam=LAM))
    benchmark.group = f"gae B={batch} T={steps} fp32"
    loop = impl != "rlengine"
    run(benchmark, lambda: fn(rewards, values, mask, GAMMA, LAM),
        rounds=rounds if loop else 20, warmup_rounds=0 if loop and rounds == 1 else 1,
        batch=batch, steps=steps)


@pytest.mark.parametrize("impl", RETURNS_IMPLEMENTATIONS)
def bench_discounted_returns(benchmark, impl):
    batch, steps = 64, 2048
    rewards, _, mask = _inputs(batch, steps)
    fn = RETURNS_IMPLEMENTATIONS[impl]
    _check_agrees(impl, lambda: fn(rewards, mask, GAMMA),
                  lambda: ops.discounted_returns(rewards, mask, gamma=GAMMA))
    benchmark.group = f"discounted_returns B={batch} T={steps} fp32"
    run(benchmark, lambda: fn(rewards, mask, GAMMA), rounds=5 if impl != "rlengine" else 20,
        batch=batch, steps=steps)


@pytest.mark.parametrize("impl", ["rlengine", "reference"])
def bench_gae_forward_backward(benchmark, impl):
    batch, steps = 64, 2048
    rewards, values, mask = _inputs(batch, steps)
    rewards.requires_grad_()
    values.requires_grad_()
    fn = ops.gae if impl == "rlengine" else reference.gae
    benchmark.group = f"gae forward+backward B={batch} T={steps} fp32"
    step = backward_of(lambda: fn(rewards, values, mask, gamma=GAMMA, lam=LAM),
                       [rewards, values])
    slow = impl != "rlengine"
    run(benchmark, step, rounds=2 if slow else 20, warmup_rounds=0 if slow else 1, batch=batch,
        steps=steps)
