"""sequence_scores, rrhf_rank_loss and bt_loss, forward and backward, on every device in
helpers.DEVICES against the float64 reference (evaluated on the CPU): the CUDA kernels
(csrc/cuda/ranking.cu) where a GPU is present, the CPU kernels everywhere. The cases aim at
what a GPU kernel gets wrong: rows around the warp/block threshold (1024 tokens), rows that
start off a 16-byte boundary or whose mask has another alignment than the values, strided and
transposed inputs read in place, expanded incoming gradients, special values at selected and
unselected positions, K > 32 candidates (several per lane), more rows or queries than one grid
covers, empty batches, and bitwise reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DEVICES,
    DTYPES,
    FP32_EPS,
    GRADIENT_TOLERANCE,
    assert_matches,
    incoming_gradient,
    result_dtype,
    to64,
)

import rlengine
from rlengine import ops
from rlengine.ops import reference

OPS = ("sequence_scores", "sequence_scores_backward", "rrhf_rank_loss",
       "rrhf_rank_loss_backward", "bt_loss", "bt_loss_backward")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("name", OPS)
def test_cuda_kernels_are_registered(name):
    assert rlengine._extension.has_kernel(name, "CUDA")


def _placed(values: torch.Tensor, device: str, layout: str = "contiguous") -> torch.Tensor:
    """values on device, laid out as asked: 'contiguous'; 'offset' (each row starts one element
    into a row one longer, so no row is 16-byte aligned and the mask's phase differs);
    'strided' (every other element of the last dim); 'transposed' (a transposed copy)."""
    if layout == "contiguous" or values.dim() == 0:
        return values.to(device, copy=True)
    if layout == "offset":
        wide = torch.zeros(*values.shape[:-1], values.shape[-1] + 1, dtype=values.dtype)
        wide[..., 1:] = values
        return wide.to(device)[..., 1:]
    if layout == "strided":
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        wide[..., ::2] = values
        return wide.to(device)[..., ::2]
    assert layout == "transposed" and values.dim() == 2
    return values.t().contiguous().to(device).t()


def _sum_slack(x: torch.Tensor, mask: torch.Tensor) -> float:
    """fp32 sums carry about eps * sum |x| of rounding."""
    if x.dtype == torch.float64 or x.numel() == 0:
        return 0.0
    kept = torch.where(mask, x.double().abs(), 0).sum(-1)
    finite = kept[torch.isfinite(kept)]
    return 8 * FP32_EPS * float(finite.max()) if finite.numel() else 0.0


# ==== sequence_scores ============================================================================

def _check_scores(x, mask, device, *, length_penalty=1.0, x_layout="contiguous",
                  mask_layout="contiguous", expanded_grad=False):
    """Forward and backward on device equal the float64 reference; returns (scores, grad) on
    the CPU."""
    dtype = x.dtype
    xd = _placed(x, device, x_layout).requires_grad_()
    md = _placed(mask, device, mask_layout)
    out = ops.sequence_scores(xd, md, length_penalty=length_penalty)
    x64 = to64(x).requires_grad_()
    expected = reference.sequence_scores(x64, mask, length_penalty=length_penalty)
    assert out.device == xd.device and out.dtype == result_dtype(dtype)
    assert_matches(out.cpu(), expected, dtype, what="scores", extra_atol=_sum_slack(x, mask))
    if expanded_grad:
        grad = torch.tensor(0.5, dtype=torch.float64).expand(expected.shape)
        out.backward(torch.tensor(0.5, dtype=out.dtype, device=device).expand(out.shape))
    else:
        grad = incoming_gradient(expected)
        out.backward(grad.to(out.dtype).to(device))
    expected.backward(grad)
    assert xd.grad.dtype == dtype and xd.grad.shape == x.shape
    assert_matches(xd.grad.cpu(), x64.grad, dtype, gradient=True, what="grad token_logprobs")
    return out.detach().cpu(), xd.grad.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (9, 3), (5, 31), (4, 3, 17), (6, 1024), (3, 1025),
                                   (2, 5000)])
@pytest.mark.parametrize("device", DEVICES)
def test_sequence_scores_matches_reference(device, shape, dtype):
    x = (torch.randn(shape) - 2).to(dtype)
    mask = torch.rand(shape) < 0.7
    mask[0] = False                                          # an empty row
    for length_penalty in (1.0, 0.0, 0.7):
        _check_scores(x, mask, device, length_penalty=length_penalty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("x_layout, mask_layout", [
    ("offset", "contiguous"), ("contiguous", "offset"), ("strided", "contiguous"),
    ("contiguous", "strided"), ("transposed", "transposed"), ("offset", "offset")])
@pytest.mark.parametrize("length", [7, 130, 1500])
@pytest.mark.parametrize("device", DEVICES)
def test_sequence_scores_layouts(device, length, x_layout, mask_layout, dtype):
    x = (torch.randn(5, length) - 1).to(dtype)
    mask = torch.rand(5, length) < 0.6
    if x_layout == "transposed":
        x, mask = x[:, :5].contiguous(), mask[:, :5].contiguous()   # square enough to transpose
    _check_scores(x, mask, device, x_layout=x_layout, mask_layout=mask_layout,
                  expanded_grad=length == 130)


@pytest.mark.parametrize("length", [9, 1500])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_sequence_scores_special_values(device, dtype, length):
    x = torch.randn(4, length).to(dtype)
    mask = torch.rand(4, length) < 0.5
    mask[:, 0] = True
    mask[3] = False                                          # an all-masked row
    poison = torch.tensor([math.nan, -math.inf, math.inf]).to(dtype)
    dirty = x.clone()
    dirty[~mask] = poison.repeat(length * 4)[: int((~mask).sum())]
    clean_out, _ = _check_scores(x, mask, device)
    leaf = dirty.to(device).requires_grad_()
    out = ops.sequence_scores(leaf, mask.to(device))
    assert torch.equal(out.cpu(), clean_out)                 # masked values never reach a sum
    # A NaN incoming gradient reaches no position of the empty row.
    grad = torch.ones(4, device=device)
    grad[3] = math.nan
    out.backward(grad)
    assert leaf.grad[~mask.to(device)].eq(0).all() and torch.isfinite(leaf.grad).all()
    # Special values at selected positions propagate as in the reference.
    selected = x.clone()
    selected[0, 0], selected[1, 0] = -math.inf, math.nan
    selected[2, 0], selected[2, length - 1] = math.inf, -math.inf
    mask[2, length - 1] = True
    _check_scores(selected, mask, device)


@pytest.mark.parametrize("device", DEVICES)
def test_sequence_scores_mask_bytes_and_empty_shapes(device):
    # A bool mask whose bytes are not 0/1 still selects (nonzero is true), as on the CPU.
    x = torch.randn(3, 40)
    raw = torch.randint(0, 4, (3, 40), dtype=torch.uint8)
    out = ops.sequence_scores(x.to(device), raw.to(device).view(torch.bool))
    expected = reference.sequence_scores(x.double(), raw != 0)
    assert_matches(out.cpu(), expected, torch.float32, extra_atol=_sum_slack(x, raw != 0))
    for shape in [(0, 5), (3, 0), (2, 0, 4), (0,)]:
        leaf = torch.randn(shape, device=device, requires_grad=True)
        out = ops.sequence_scores(leaf, torch.ones(shape, dtype=torch.bool, device=device))
        assert out.shape == shape[:-1] and out.eq(0).all()
        out.sum().backward()
        assert leaf.grad.shape == shape and leaf.grad.eq(0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_sequence_scores_more_rows_than_one_grid_on_cuda():
    """600k short rows: more than the 65536 blocks x 8 warps of one grid, so rows are walked
    grid-stride."""
    device = "cuda"
    x = torch.randn(600_000, 2)
    mask = torch.rand(600_000, 2) < 0.7
    _check_scores(x, mask, device, expanded_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_sequence_scores_is_reproducible(device):
    x = torch.randn(64, 3000, device=device)
    mask = torch.rand(64, 3000, device=device) < 0.8
    first = ops.sequence_scores(x, mask)
    assert torch.equal(first, ops.sequence_scores(x, mask))


# ==== rrhf_rank_loss =============================================================================

def _check_rank(scores, rewards, valid, device, *, layout="contiguous", expanded_grad=False):
    dtype = scores.dtype
    sd = _placed(scores, device, layout).requires_grad_()
    rd = _placed(rewards, device, layout)
    vd = None if valid is None else _placed(valid, device, layout)
    out = ops.rrhf_rank_loss(sd, rd, vd)
    s64 = to64(scores).requires_grad_()
    expected = reference.rrhf_rank_loss(s64, to64(rewards), valid)
    assert out.dtype == result_dtype(dtype) and out.shape == (scores.shape[0],)
    assert_matches(out.cpu(), expected, dtype, what="rank loss")
    if expanded_grad:
        grad = torch.tensor(0.25, dtype=torch.float64).expand(expected.shape)
        out.backward(torch.tensor(0.25, dtype=out.dtype, device=device).expand(out.shape))
    else:
        grad = incoming_gradient(expected, where=torch.isfinite(expected))
        out.backward(grad.to(out.dtype).to(device))
    expected.backward(grad)
    assert sd.grad.dtype == dtype and sd.grad.shape == scores.shape
    assert_matches(sd.grad.cpu(), s64.grad, dtype, gradient=True, what="grad scores")
    return out.detach().cpu(), sd.grad.cpu()


@pytest.mark.parametrize("reward_dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (4, 2), (8, 7), (3, 33), (2, 70), (0, 4), (4, 0),
                                   (300, 6)])
@pytest.mark.parametrize("device", DEVICES)
def test_rrhf_rank_loss_matches_reference(device, shape, dtype, reward_dtype):
    scores = (torch.randn(shape) - 1).to(dtype)
    valid = torch.rand(shape) < 0.8
    _check_rank(scores, torch.randint(-3, 4, shape).to(reward_dtype), valid, device)  # ties
    _check_rank(scores, torch.randn(shape).to(reward_dtype), None, device)


@pytest.mark.parametrize("layout", ["strided", "transposed", "offset"])
@pytest.mark.parametrize("device", DEVICES)
def test_rrhf_rank_loss_layouts(device, layout):
    shape = (9, 9) if layout == "transposed" else (6, 37)
    scores, rewards = torch.randn(shape), torch.randn(shape)
    valid = torch.rand(shape) < 0.8
    _check_rank(scores, rewards, valid, device, layout=layout, expanded_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_rrhf_rank_loss_special_values(device):
    # Invalid candidates with NaN/inf scores never count; NaN rewards and ties never count;
    # NaN or inf scores of valid candidates propagate like torch.relu's value and gradient.
    p = torch.tensor([[-1.0, math.nan, -3.0, math.inf, -2.0],
                      [-1.0, -2.0, -3.0, -4.0, -5.0],
                      [-1.0, -1.0, -3.0, -0.5, 0.0],
                      [math.nan, -2.0, -1.0, math.inf, -math.inf]])
    r = torch.tensor([[0.0, 5.0, 1.0, -1.0, math.nan],
                      [1.0, 2.0, 3.0, 4.0, 5.0],
                      [0.0, 1.0, -1.0, -2.0, -2.0],
                      [0.0, 1.0, 2.0, 3.0, 4.0]])
    valid = torch.tensor([[True, False, True, False, True],
                          [False, False, False, False, False],
                          [True, True, True, True, True],
                          [True, True, True, True, True]])
    out, grad = _check_rank(p, r, valid, device)
    assert out[:3].tolist() == [2.0, 0.0, 8.5] and math.isnan(out[3])
    assert grad[1].eq(0).all()
    # A query without an active pair keeps a zero row even under a NaN incoming gradient.
    leaf = p.to(device).requires_grad_()
    loss = ops.rrhf_rank_loss(leaf, r.to(device), valid.to(device))
    loss.backward(torch.full((4,), math.nan, device=device))
    assert leaf.grad[1].eq(0).all() and leaf.grad[0].isnan().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_rrhf_rank_loss_more_queries_than_one_grid_on_cuda():
    """600k queries: more than one grid's 65536 blocks x 8 warps."""
    device = "cuda"
    scores, rewards = torch.randn(600_000, 2), torch.randn(600_000, 2)
    _check_rank(scores, rewards, torch.rand(600_000, 2) < 0.9, device, expanded_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_rrhf_rank_loss_is_reproducible(device):
    scores = torch.randn(500, 48, device=device)
    rewards = torch.randn(500, 48, device=device)
    first = ops.rrhf_rank_loss(scores, rewards)
    assert torch.equal(first, ops.rrhf_rank_loss(scores, rewards))


# ==== bt_loss ====================================================================================

def _argument(value, device, dtype=None):
    """(device argument, float64 reference argument) for a bt_loss argument: reals pass
    through; tensors become leaves that require grad (float ones)."""
    if not isinstance(value, torch.Tensor):
        return value, value
    ours = value.to(device, copy=True)
    ref = to64(value)
    if value.dtype.is_floating_point:
        ours.requires_grad_()
        ref.requires_grad_()
    return ours, ref


def _check_bt(chosen, rejected, device, *, margin=None, label_smoothing=0.0,
              layout="contiguous", expanded_grad=False):
    dtype = chosen.dtype
    c = _placed(chosen, device, layout).requires_grad_()
    r = _placed(rejected, device, layout).requires_grad_()
    m, m64 = _argument(margin, device)
    a, a64 = _argument(label_smoothing, device)
    c64, r64 = to64(chosen).requires_grad_(), to64(rejected).requires_grad_()
    out = ops.bt_loss(c, r, margin=m, label_smoothing=a)
    expected = reference.bt_loss(c64, r64, margin=m64, label_smoothing=a64)
    assert out.dtype == result_dtype(dtype) and out.shape == chosen.shape
    # fp32 rounding of delta = chosen - rejected - margin scales with the inputs' magnitude.
    finite = torch.isfinite(c64.detach()) & torch.isfinite(r64.detach())
    scale = float(torch.where(finite, c64.detach().abs() + r64.detach().abs(), 0).max()) \
        if chosen.numel() else 0.0
    slack = 0.0 if dtype == torch.float64 else 4 * FP32_EPS * scale
    assert_matches(out.cpu(), expected, dtype, what="bt loss", extra_atol=slack)
    if expanded_grad:
        grad = torch.tensor(1.5, dtype=torch.float64).expand(expected.shape)
        out.backward(torch.tensor(1.5, dtype=out.dtype, device=device).expand(out.shape))
    else:
        grad = incoming_gradient(expected, where=torch.isfinite(expected))
        out.backward(grad.to(out.dtype).to(device))
    expected.backward(grad)
    for name, ours, ref in [("chosen", c, c64), ("rejected", r, r64), ("margin", m, m64),
                            ("label_smoothing", a, a64)]:
        if isinstance(ours, torch.Tensor) and ours.requires_grad:
            assert ours.grad.dtype == ours.dtype
            # a float64 margin of fp32 pairs gets fp32 gradients: the looser tolerance
            looser = max(ours.dtype, dtype, key=lambda d: GRADIENT_TOLERANCE[d][1])
            assert_matches(ours.grad.cpu(), ref.grad, looser, gradient=True,
                           what=f"grad {name}", extra_atol=slack)
    return out.detach().cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (1000,)])
@pytest.mark.parametrize("device", DEVICES)
def test_bt_loss_matches_reference(device, shape, dtype):
    chosen, rejected = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    _check_bt(chosen, rejected, device)
    _check_bt(chosen, rejected, device, margin=0.3, label_smoothing=0.1)
    _check_bt(chosen, rejected, device, margin=torch.rand(shape, dtype=torch.float64),
              label_smoothing=torch.rand(shape).to(dtype) * 0.4)
    _check_bt(chosen, rejected, device, margin=torch.tensor(-0.2),
              label_smoothing=torch.tensor(0.25, dtype=torch.float64), expanded_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_bt_loss_layouts_and_integer_margin(device):
    pairs = torch.randn(50, 2)                         # chosen = pairs[:, 0]: a stride-2 view
    pair_device = pairs.to(device).requires_grad_()
    out = ops.bt_loss(pair_device[:, 0], pair_device[:, 1], margin=torch.ones(50,
                      dtype=torch.int64, device=device))
    expected = reference.bt_loss(pairs[:, 0].double(), pairs[:, 1].double(), margin=1.0)
    assert_matches(out.cpu(), expected, torch.float32)
    out.mean().backward()
    assert torch.isfinite(pair_device.grad).all() and pair_device.grad.ne(0).all()
    for layout in ("strided", "offset", "transposed"):
        _check_bt(torch.randn(6, 6), torch.randn(6, 6), device, layout=layout,
                  margin=torch.randn(6, 6), label_smoothing=torch.rand(()) * 0.5,
                  expanded_grad=layout == "strided")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_bt_loss_extreme_deltas(device, dtype):
    chosen = torch.tensor([1e4, -1e4, 0.0, 30.0, -30.0, 1e-7, math.inf, -math.inf, math.nan,
                           5.0]).to(dtype)
    rejected = torch.zeros(10, dtype=dtype)
    smoothing = torch.tensor([0.0, 0.0, 0.1, 0.2, 0.0, 0.3, 0.0, 0.5, 0.1, 1.0]).to(dtype)
    out = _check_bt(chosen, rejected, device, label_smoothing=smoothing)
    assert torch.isfinite(out[:6]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bt_loss_empty_and_reproducible(device):
    for shape in [(0,), (3, 0)]:
        c = torch.randn(shape, device=device, requires_grad=True)
        out = ops.bt_loss(c, torch.randn(shape, device=device), label_smoothing=torch.rand(
            shape, device=device).requires_grad_())
        assert out.shape == shape
        out.sum().backward()
        assert c.grad.shape == shape
    c, r = torch.randn(100_000, device=device), torch.randn(100_000, device=device)
    assert torch.equal(ops.bt_loss(c, r, margin=0.5), ops.bt_loss(c, r, margin=0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_bt_loss_more_pairs_than_one_grid_on_cuda():
    """17M pairs: more than 65536 blocks x 256 threads; compared with the CPU kernel."""
    c, r = torch.randn(17_000_000), torch.randn(17_000_000)
    a = torch.rand(17_000_000) * 0.3
    expected = ops.bt_loss(c, r, label_smoothing=a)
    out = ops.bt_loss(c.cuda(), r.cuda(), label_smoothing=a.cuda())
    torch.testing.assert_close(out.cpu(), expected, atol=1e-6, rtol=1e-5)
