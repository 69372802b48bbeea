"""gae and discounted_returns against the Python loops over time of the anchor trainers.

Baselines (written here the way those projects write them, not imported):
  python_loop:      TRL / OpenRLHF: for t in reversed(range(T)) over [B] slices, the next value
                    taken from t + 1 (0 at the end), advantages stacked, returns = A + V.
  verl_masked_loop: veRL's multi-turn loop: the same, but the next value and the running
                    advantage are carried across masked positions with mask arithmetic, which
                    is exactly the rule the rlengine kernel implements.
"""

from __future__ import annotations

import pytest
import torch
from harness import backward_of, run

from rlengine import ops
from rlengine.ops import reference

GAMMA, LAM = 1.0, 0.95


def python_loop_gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    steps = rewards.shape[1]
    lastgaelam = 0.0
    reversed_advantages = []
    for t in reversed(range(steps)):
        next_values = values[:, t + 1] if t < steps - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_advantages.append(lastgaelam)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def verl_masked_loop_gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    mask = mask.to(values.dtype)
    next_values = torch.zeros_like(values[:, 0])
    lastgaelam = torch.zeros_like(values[:, 0])
    reversed_advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        candidate = delta + gamma * lam * lastgaelam
        next_values = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_values
        lastgaelam = candidate * mask[:, t] + (1 - mask[:, t]) * lastgaelam
        reversed_advantages.append(lastgaelam)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages * mask, (advantages + values) * mask


def python_loop_returns(rewards, mask, gamma=GAMMA):
    running = torch.zeros_like(rewards[:, 0])
    reversed_returns = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        reversed_returns.append(running)
    return torch.stack(reversed_returns[::-1], dim=1)


GAE_IMPLEMENTATIONS = {
    "rlengine": lambda r, v, m: ops.gae(r, v, m, gamma=GAMMA, lam=LAM),
    "python_loop": python_loop_gae,
    "verl_masked_loop": verl_masked_loop_gae,
}


def _inputs(batch, steps, requires_grad=False):
    rewards = torch.randn(batch, steps, requires_grad=requires_grad)
    values = torch.randn(batch, steps, requires_grad=requires_grad)
    # Responses of random lengths: each row's steps are a prefix of random length.
    lengths = torch.randint(steps // 2, steps + 1, (batch, 1))
    mask = torch.arange(steps) < lengths
    return rewards, values, mask


@pytest.mark.parametrize("impl", GAE_IMPLEMENTATIONS)
@pytest.mark.parametrize("batch, steps", [(64, 2048), (512, 8192)])
def bench_gae(benchmark, impl, batch, steps):
    rewards, values, mask = _inputs(batch, steps)
    fn = GAE_IMPLEMENTATIONS[impl]
    benchmark.group = f"gae B={batch} T={steps} fp32"
    rounds = 20 if impl == "rlengine" else 3
    run(benchmark, lambda: fn(rewards, values, mask), rounds=rounds)


@pytest.mark.parametrize("impl", ["rlengine", "python_loop"])
def bench_discounted_returns(benchmark, impl):
    rewards, _, mask = _inputs(64, 2048)
    fn = (lambda: ops.discounted_returns(rewards, mask, gamma=GAMMA)) if impl == "rlengine" \
        else (lambda: python_loop_returns(rewards, mask))
    benchmark.group = "discounted_returns B=64 T=2048 fp32"
    run(benchmark, fn, rounds=20 if impl == "rlengine" else 3)


@pytest.mark.parametrize("impl", ["rlengine", "reference_autograd"])
def bench_gae_forward_backward(benchmark, impl):
    rewards, values, mask = _inputs(64, 2048, requires_grad=True)
    fn = ops.gae if impl == "rlengine" else reference.gae
    step = backward_of(lambda: fn(rewards, values, mask, gamma=GAMMA, lam=LAM),
                       [rewards, values])
    benchmark.group = "forward+backward gae B=64 T=2048 fp32"
    run(benchmark, step, rounds=10 if impl == "rlengine" else 3)
