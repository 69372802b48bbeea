"""masked_mean / masked_var / masked_whiten against the way the anchors write them.

Baselines (written here the way those projects write them, not imported):
  trl:      TRL's / veRL's / OpenRLHF's eager formulation: multiply by the mask and divide sums,
            (values * mask).sum() / mask.sum(); the variance as the masked mean of the squared
            deviations times the Bessel factor n / (n - 1); whitening as
            (values - mean) * rsqrt(var + eps). Each step materializes a [B, T] temporary.
            These raise (empty mask, unbiased) or give NaN/inf on edge cases that rlengine
            defines: here they are only timed, on a regular mask.
  compiled: the same functions through torch.compile (inductor), which fuses the element-wise
            steps into a few loops.
"""

from __future__ import annotations

import functools

import pytest
import torch
from harness import backward_of, run

from rlengine import ops

BATCH, STEPS = 512, 2048
EPS = 1e-8


def trl_masked_mean(values, mask, dim=None):
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def trl_masked_var(values, mask, unbiased=True):
    mean = trl_masked_mean(values, mask)
    var = trl_masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        var = var * (count / (count - 1))
    return var


def trl_masked_whiten(values, mask, shift_mean=True):
    mean = trl_masked_mean(values, mask)
    var = trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + EPS)
    return whitened if shift_mean else whitened + mean


@functools.cache
def _compile(fn):
    return torch.compile(fn, dynamic=False)


IMPLEMENTATIONS = {
    "rlengine": {
        "mean": ops.masked_mean,
        "var": ops.masked_var,
        "whiten": lambda v, m: ops.masked_whiten(v, m, eps=EPS),
    },
    "trl": {"mean": trl_masked_mean, "var": trl_masked_var, "whiten": trl_masked_whiten},
    "compiled": {
        "mean": lambda v, m, dim=None: _compile(trl_masked_mean)(v, m, dim),
        "var": lambda v, m: _compile(trl_masked_var)(v, m),
        "whiten": lambda v, m: _compile(trl_masked_whiten)(v, m),
    },
}


def _inputs(requires_grad=False):
    values = (torch.randn(BATCH, STEPS) * 3 + 1).requires_grad_(requires_grad)
    # Right-padded responses of random lengths, as PPO's response masks are.
    lengths = torch.randint(STEPS // 8, STEPS + 1, (BATCH, 1))
    mask = torch.arange(STEPS) < lengths
    return values, mask


def _measure(benchmark, fn, values):
    run(benchmark, fn, rounds=20, shape=list(values.shape), values_mb=values.nbytes / 2**20)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dim", [None, -1], ids=["all", "per_row"])
def bench_masked_mean(benchmark, impl, dim):
    values, mask = _inputs()
    fn = IMPLEMENTATIONS[impl]["mean"]
    benchmark.group = f"masked_mean forward dim={dim} [{BATCH}, {STEPS}] fp32"
    _measure(benchmark, lambda: fn(values, mask, dim), values)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def bench_masked_var(benchmark, impl):
    values, mask = _inputs()
    fn = IMPLEMENTATIONS[impl]["var"]
    benchmark.group = f"masked_var forward [{BATCH}, {STEPS}] fp32"
    _measure(benchmark, lambda: fn(values, mask), values)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def bench_masked_whiten(benchmark, impl):
    values, mask = _inputs()
    fn = IMPLEMENTATIONS[impl]["whiten"]
    benchmark.group = f"masked_whiten forward [{BATCH}, {STEPS}] fp32"
    _measure(benchmark, lambda: fn(values, mask), values)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def bench_masked_whiten_backward(benchmark, impl):
    values, mask = _inputs(requires_grad=True)
    fn = IMPLEMENTATIONS[impl]["whiten"]
    benchmark.group = f"masked_whiten forward+backward [{BATCH}, {STEPS}] fp32"
    step = backward_of(lambda: fn(values, mask), [values])
    _measure(benchmark, step, values)
