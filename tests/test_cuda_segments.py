"""entropy_segments, segment_reduce and segment_rewards_to_dense on every device of
helpers.DEVICES (the CUDA kernels of csrc/cuda/segments.cu where a GPU is present; the CPU
kernels always) against the float64 references, forward and backward: rows that span several
tiles of the CUDA scan or share one, a single segment, one segment per token, empty responses,
arbitrary segment labels, extreme thresholds, NaN outside the segments, malformed segmentations
(a ValueError on the CPU and, with RLENGINE_CHECK_INPUTS=1, on every device; otherwise the CUDA
kernels' documented clamping)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DEVICES,
    DTYPES,
    assert_matches,
    incoming_gradient,
    noncontiguous,
    result_dtype,
    to64,
)
from test_segments import (
    FLOORED,
    PHI3,
    REDUCES,
    SPREADS,
    _arbitrary_segments,
    _response_mask,
    _segmentation,
)

import rlengine
from rlengine import ops
from rlengine.ops import reference

OPS = ("entropy_segments", "segment_reduce", "segment_reduce_backward",
       "segment_rewards_to_dense", "segment_rewards_to_dense_backward")
TILE = 2048  # positions per block of the CUDA entropy_segments scan
FLT_MAX = float(torch.finfo(torch.float32).max)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_kernels_are_registered():
    for name in OPS:
        assert rlengine._extension.has_kernel(name, "CUDA"), name


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _segmentations(batch, steps):
    """(name, mask, segment_ids, counts): entropy segmentations with mask holes, arbitrary labels
    with empty segments, one segment per token, one segment per response."""
    mask, ids, counts = _segmentation(batch, steps)
    yield "entropy", mask, ids, counts
    arb_ids, arb_counts = _arbitrary_segments(batch, steps)
    yield "arbitrary", torch.rand(batch, steps) < 0.7, arb_ids, arb_counts
    token = torch.where(mask, torch.cumsum(mask.long(), 1) - 1, -1)
    yield "token", mask, token, mask.sum(1)
    yield "single", mask, torch.where(mask, 0, -1), mask.any(1).long()


# ---- entropy_segments -----------------------------------------------------------------------

def _check_entropy_segments(device, entropy, mask, threshold):
    ids, counts = ops.entropy_segments(*_on(device, entropy, mask), threshold=threshold)
    ref_ids, ref_counts = reference.entropy_segments(to64(entropy), mask, threshold=threshold)
    assert ids.device.type == device and ids.dtype == counts.dtype == torch.int64
    assert torch.equal(ids.cpu(), ref_ids), (threshold, entropy.dtype)
    assert torch.equal(counts.cpu(), ref_counts), (threshold, entropy.dtype)


# (700, 3): hundreds of rows per tile; (4, 2049), (2, 5000): rows across tiles.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (700, 3), (5, 31), (4, TILE + 1), (2, 5000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_segments_matches_reference(device, shape, dtype):
    entropy = (torch.rand(shape) * 3).to(dtype)
    mask = _response_mask(*shape, holes=0.2)
    mask[0] = False  # an empty response
    for threshold in (1.75, 0.3, 2.9):
        _check_entropy_segments(device, entropy, mask, threshold)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_segments_extreme_thresholds_and_values(device, dtype):
    """Thresholds far outside every dtype's range (+-1e300: one segment per response, or a
    segment end at every finite or +inf entropy), at the float32 extremes, and entropies that
    are NaN (never ends a segment) or +-inf."""
    entropy = (torch.rand(6, TILE + 50) * 3).to(dtype)
    special = torch.tensor([math.nan, math.inf, -math.inf, 0.0], dtype=dtype)
    entropy.view(-1)[::7] = special[torch.arange(entropy.numel())[::7] % 4]
    mask = _response_mask(6, TILE + 50, holes=0.1)
    for threshold in (1e300, -1e300, FLT_MAX, -FLT_MAX, 0.0, 1.7):
        _check_entropy_segments(device, entropy, mask, threshold)
    for threshold in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="threshold must be finite"):
            ops.entropy_segments(*_on(device, entropy, mask), threshold=threshold)
        with pytest.raises(ValueError, match="threshold must be finite"):
            torch.ops.rlengine.entropy_segments(*_on(device, entropy, mask), threshold)


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_segments_single_token_level_and_empty(device):
    entropy = torch.rand(5, 300) + 1e-3  # all > 0
    mask = _response_mask(5, 300, holes=0.2)
    mask[1] = False
    mask[2] = True
    ids, counts = ops.entropy_segments(*_on(device, entropy, mask), threshold=0.0)
    rank = torch.cumsum(mask.long(), 1) - 1  # every response token its own segment
    assert torch.equal(ids.cpu(), torch.where(mask, rank, -1))
    assert torch.equal(counts.cpu(), mask.sum(1))
    ids, counts = ops.entropy_segments(*_on(device, entropy, mask), threshold=1e9)
    assert torch.equal(ids.cpu(), torch.where(mask, 0, -1))  # one segment per response
    assert torch.equal(counts.cpu(), mask.any(1).long())
    for shape in ((0, 5), (3, 0), (0, 0)):
        ids, counts = ops.entropy_segments(torch.rand(shape, device=device),
                                           torch.ones(shape, dtype=torch.bool, device=device),
                                           threshold=1.0)
        assert ids.shape == shape and counts.tolist() == [0] * shape[0]


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_segments_noncontiguous(device):
    entropy = torch.rand(TILE + 5, 3, device=device).t() * 3  # transposed
    mask = noncontiguous(_response_mask(3, TILE + 5).to(device))
    assert not (entropy.is_contiguous() or mask.is_contiguous())
    _check_entropy_segments(device, entropy.cpu(), mask.cpu(), 1.5)
    ids, counts = ops.entropy_segments(entropy, mask, threshold=1.5)
    want = ops.entropy_segments(entropy.contiguous(), mask.contiguous(), threshold=1.5)
    assert torch.equal(ids, want[0]) and torch.equal(counts, want[1])


# ---- segment_reduce -------------------------------------------------------------------------

def _check_reduce(device, values, ids, counts, reduce):
    """Forward and backward (random incoming gradient) on `device` equal the float64 reference."""
    dtype = values.dtype
    x = values.detach().to(device).requires_grad_()
    x64 = to64(values).requires_grad_()
    out = ops.segment_reduce(x, *_on(device, ids, counts), reduce=reduce)
    ref = reference.segment_reduce(x64, ids, counts, reduce=reduce)
    assert out.device.type == device and out.dtype == result_dtype(dtype)
    assert_matches(out.cpu(), ref, dtype, what=f"segment_reduce {reduce}")
    grad = incoming_gradient(out.detach().cpu())
    out.backward(grad.to(out.dtype).to(device))
    ref.backward(grad)
    assert x.grad.dtype == dtype and x.grad.shape == values.shape
    assert_matches(x.grad.cpu(), x64.grad, dtype, gradient=True, what=f"grad values ({reduce})")
    assert x.grad.cpu()[ids < 0].eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (5, 31), (17, 257), (3, TILE + 1)])
def test_segment_reduce_matches_reference(device, shape):
    for name, _, ids, counts in _segmentations(*shape):
        values = torch.randn(shape) * 3
        values[ids < 0] = math.nan  # never read
        for reduce in REDUCES:
            _check_reduce(device, values, ids, counts, reduce)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_reduce_dtypes(device, dtype):
    _, ids, counts = _segmentation(6, 80)
    values = (torch.randn(6, 80) * 3).to(dtype)
    for reduce in REDUCES:
        _check_reduce(device, values, ids, counts, reduce)


@pytest.mark.parametrize("device", DEVICES)
def test_segment_reduce_degenerate_and_noncontiguous(device):
    _, ids, counts = _segmentation(5, 33)
    values = torch.randn(5, 33)
    for reduce in REDUCES:
        out = ops.segment_reduce(noncontiguous(values.to(device)),
                                 noncontiguous(ids.int().to(device)), counts.int().to(device),
                                 reduce=reduce)
        torch.testing.assert_close(out.cpu(), reference.segment_reduce(values, ids, counts,
                                                                       reduce=reduce))
        for shape in ((0, 4), (2, 0)):
            x = torch.randn(shape, device=device, requires_grad=True)
            out = ops.segment_reduce(x, torch.zeros(shape, dtype=torch.long, device=device),
                                     torch.zeros(shape[0], dtype=torch.long, device=device),
                                     reduce=reduce)
            assert out.shape == (shape[:1] if reduce == "end_mean" else shape)
            assert out.eq(0).all()
            out.sum().backward()
            assert x.grad.shape == shape


# ---- segment_rewards_to_dense ---------------------------------------------------------------

def _check_dense(device, rewards, ids, counts, mask, **kwargs):
    dtype = rewards.dtype
    x = rewards.detach().to(device).requires_grad_()
    x64 = to64(rewards).requires_grad_()
    out = ops.segment_rewards_to_dense(x, *_on(device, ids, counts, mask), **kwargs)
    ref = reference.segment_rewards_to_dense(x64, ids, counts, mask, **kwargs)
    assert out.device.type == device and out.dtype == result_dtype(dtype)
    assert_matches(out.cpu(), ref, dtype, what=f"dense {kwargs}")
    assert out.cpu()[~mask].eq(0).all()
    grad = incoming_gradient(out.detach().cpu(), where=mask)
    noisy = torch.where(mask, grad, math.nan)  # incoming gradients outside the mask are ignored
    out.backward(noisy.to(out.dtype).to(device))
    ref.backward(grad)
    assert x.grad.dtype == dtype and x.grad.shape == rewards.shape
    assert_matches(x.grad.cpu(), x64.grad, dtype, gradient=True, what=f"grad dense {kwargs}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (5, 31), (17, 257), (3, TILE + 1)])
@pytest.mark.parametrize("spread", SPREADS)
def test_dense_matches_reference(device, shape, spread):
    for name, mask, ids, counts in _segmentations(*shape):
        k_max = (int(counts.max()) if counts.numel() else 0) + 2
        rewards = torch.randn(shape[0], k_max) * 4
        for normalizer in (None, PHI3, FLOORED):
            for clamp in (10.0, 0.7, None):
                _check_dense(device, rewards, ids, counts, mask, normalizer=normalizer,
                             spread=spread, clamp=clamp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_dtypes_and_special_rewards(device, dtype):
    mask, ids, counts = _segmentation(6, 120, holes=0.2)
    rewards = torch.randn(6, 130) * 4
    rewards[:, 0], rewards[:, 1], rewards[:, 2] = math.nan, math.inf, -math.inf
    rewards = rewards.to(dtype)
    for spread in SPREADS:
        for clamp in (10.0, None):
            _check_dense(device, rewards, ids, counts, mask, normalizer=PHI3, spread=spread,
                         clamp=clamp)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_degenerate_and_noncontiguous(device):
    mask, ids, counts = _segmentation(5, 33)
    rewards = torch.randn(5, 40)
    out = ops.segment_rewards_to_dense(
        noncontiguous(rewards.to(device)), noncontiguous(ids.int().to(device)),
        counts.int().to(device), noncontiguous(mask.int().to(device)), normalizer=PHI3)
    torch.testing.assert_close(out.cpu(), reference.segment_rewards_to_dense(
        rewards, ids, counts, mask, normalizer=PHI3))
    # B = 0
    assert ops.segment_rewards_to_dense(
        torch.zeros(0, 3, device=device), torch.zeros(0, 4, dtype=torch.long, device=device),
        torch.zeros(0, dtype=torch.long, device=device),
        torch.ones(0, 4, dtype=torch.bool, device=device)).shape == (0, 4)
    for steps, k_max in ((0, 3), (5, 0), (5, 2)):  # T = 0; Kmax = 0; no segment in any row
        x = torch.zeros(2, k_max, device=device, requires_grad=True)
        out = ops.segment_rewards_to_dense(
            x, torch.full((2, steps), -1, device=device),
            torch.zeros(2, dtype=torch.long, device=device),
            torch.ones(2, steps, dtype=torch.bool, device=device), normalizer=PHI3)
        assert out.shape == (2, steps) and out.eq(0).all()
        out.sum().backward()
        assert x.grad.shape == x.shape and x.grad.eq(0).all()


# ---- malformed segmentations ----------------------------------------------------------------

def _malformed():
    """(segment_ids [2, 6], counts [2], fragment of the CPU kernel's message)."""
    ids = torch.tensor([[0, 0, 1, 1, 2, -1], [-1, 0, 1, 1, -1, -1]])
    counts = torch.tensor([3, 2])

    def patched(b, t, value):
        bad = ids.clone()
        bad[b, t] = value
        return bad

    return [
        (patched(1, 3, 2), counts, "segment_ids[1, 3] = 2 is out of range"),
        (patched(0, 2, -2), counts, "segment_ids[0, 2] = -2"),
        (patched(1, 0, 2**62), counts, f"segment_ids[1, 0] = {2**62}"),
        (patched(0, 0, -2**63), counts, f"= {-2**63}"),
        (ids, torch.tensor([7, 2]), "counts[0] = 7 is out of range"),
        (ids, torch.tensor([3, -1]), "counts[1] = -1 is out of range"),
        (ids, torch.tensor([3, 2**62]), f"counts[1] = {2**62}"),
    ]


MALFORMED = _malformed()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids, counts, fragment", MALFORMED, ids=[m[2] for m in MALFORMED])
def test_malformed_segments_checked(device, ids, counts, fragment, monkeypatch):
    """A ValueError with the CPU kernel's message: always on the CPU, and on every device with
    RLENGINE_CHECK_INPUTS=1."""
    monkeypatch.setenv("RLENGINE_CHECK_INPUTS", "1")
    values, mask = torch.randn(2, 6, device=device), torch.ones(2, 6, dtype=torch.bool,
                                                                 device=device)
    ids, counts = _on(device, ids, counts)
    for reduce in REDUCES:
        with pytest.raises(ValueError, match=r"rlengine\.segment_reduce") as info:
            ops.segment_reduce(values, ids, counts, reduce=reduce)
        assert fragment in str(info.value)
    for spread in SPREADS:
        with pytest.raises(ValueError, match=r"rlengine\.segment_rewards_to_dense") as info:
            ops.segment_rewards_to_dense(torch.randn(2, 8, device=device), ids, counts, mask,
                                         normalizer=PHI3, spread=spread)
        assert fragment in str(info.value)


@pytest.mark.parametrize("device", DEVICES)
def test_counts_above_kmax_checked(device, monkeypatch):
    monkeypatch.setenv("RLENGINE_CHECK_INPUTS", "1")
    with pytest.raises(ValueError, match=r"counts\[0\] = 4 exceeds segment_rewards.shape\[1\] = 3"):
        ops.segment_rewards_to_dense(*_on(device, torch.randn(1, 3), torch.tensor([[0, 1, 2, 3]]),
                                          torch.tensor([4]), torch.ones(1, 4, dtype=torch.bool)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("ids, counts, fragment", MALFORMED, ids=[m[2] for m in MALFORMED])
def test_malformed_segments_clamped_on_cuda(ids, counts, fragment, monkeypatch):
    """Without the check, the CUDA kernels clamp counts into [0, T] ([0, min(T, Kmax)] for the
    dense ops) and take any other id as -1: the results are those of that sanitized
    segmentation, and nothing is read or written out of bounds."""
    monkeypatch.setenv("RLENGINE_CHECK_INPUTS", "0")
    values, mask = torch.randn(2, 6), torch.ones(2, 6, dtype=torch.bool)
    for width, rewards in ((6, None), (4, torch.randn(2, 4))):
        clamped = counts.clamp(0, width)
        sane = torch.where((ids >= 0) & (ids < clamped[:, None]), ids, -1)
        if rewards is None:
            for reduce in REDUCES:
                got = ops.segment_reduce(*_on("cuda", values, ids, counts), reduce=reduce)
                want = ops.segment_reduce(values, sane, clamped, reduce=reduce)
                torch.testing.assert_close(got.cpu(), want)
                grad = torch.randn(want.shape)
                got = torch.ops.rlengine.segment_reduce_backward(
                    *_on("cuda", grad, ids, counts), reduce, torch.float32)
                want = torch.ops.rlengine.segment_reduce_backward(grad, sane, clamped, reduce,
                                                                  torch.float32)
                torch.testing.assert_close(got.cpu(), want)
            continue
        for spread in SPREADS:
            got = ops.segment_rewards_to_dense(*_on("cuda", rewards, ids, counts, mask),
                                               normalizer=PHI3, spread=spread)
            want = ops.segment_rewards_to_dense(rewards, sane, clamped, mask, normalizer=PHI3,
                                                spread=spread)
            torch.testing.assert_close(got.cpu(), want)
            grad = torch.randn(2, 6)
            got = torch.ops.rlengine.segment_rewards_to_dense_backward(
                *_on("cuda", grad, rewards, ids, counts, mask), list(PHI3), spread, 10.0)
            want = torch.ops.rlengine.segment_rewards_to_dense_backward(
                grad, rewards, sane, clamped, mask, list(PHI3), spread, 10.0)
            torch.testing.assert_close(got.cpu(), want)
    torch.cuda.synchronize()  # a kernel fault would surface here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU (CPU: test_segments.py)")
def test_opcheck_cuda():
    mask, ids, counts = _on("cuda", *_segmentation(3, 17, holes=0.2))
    entropy = torch.rand(3, 17, device="cuda").requires_grad_()
    torch.library.opcheck(torch.ops.rlengine.entropy_segments.default, (entropy, mask, 0.8))
    values = torch.randn(3, 17, device="cuda").requires_grad_()
    for reduce in REDUCES:
        torch.library.opcheck(torch.ops.rlengine.segment_reduce.default,
                              (values, ids, counts, reduce))
    rewards = torch.randn(3, 20, device="cuda").requires_grad_()
    for spread, normalizer in (("even", list(PHI3)), ("repeat", None), ("end", list(FLOORED))):
        torch.library.opcheck(torch.ops.rlengine.segment_rewards_to_dense.default,
                              (rewards, ids, counts, mask, normalizer, spread, 1.5))
