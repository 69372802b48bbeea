"""Triton kernels of ``rlengine::fused_linear_logprobs``: the log-prob (and entropy) of each
label under ``softmax((hidden @ weight.T + bias) / temperature)``, where the N x V logits only
ever exist as register tiles (forward) or as one bounded chunk of vocabulary columns (backward).

Forward, two kernels:
  ``_forward_partials_kernel``: a program owns BLOCK_N rows and one span of SPLIT_COLUMNS
    vocabulary columns, and walks the span in BLOCK_V tiles. Each tile is
    ``tl.dot(hidden_tile, weight_tile^T)`` accumulated in fp32 over H in BLOCK_K steps, then
    folded into per-row online max / sum-exp (and entropy) accumulators; the label's logit is
    picked from the tile that holds it. Splitting V gives N=8192 rows x V=128256 about 4000
    programs instead of 64 row blocks (H100 has 132 SMs); programs are ordered in groups of
    GROUP_N row blocks so that the ones running together share weight tiles in L2.
  ``_combine_kernel``: merges each row's per-split partials into log-prob, entropy and the
    logsumexp that the backward reuses (O(N x splits) bytes, a few MB at the target shape).

Backward, per chunk of vocabulary columns:
  ``_backward_dlogits_kernel`` recomputes [BLOCK_N, BLOCK_V] logits tiles and writes
    ``dlogits = (g_lp * (onehot - p) - g_ent * p * (log p + H)) / T`` in the inputs' dtype into
    an [N, chunk] buffer (at most DLOGITS_CHUNK_BYTES), plus per-row-block column sums for the
    bias gradient; then two library GEMMs per chunk:
    ``grad_weight[chunk] = dlogits^T @ hidden`` (each row of grad_weight written exactly once)
    and ``grad_hidden += dlogits @ weight[chunk]`` (fp32 accumulator, N x H).

Why not atomics (one fused kernel adding dlogits-tile products into fp32 grad_hidden and
grad_weight): at N=8192, H=4096, V=128256 a fully fused kernel with 128 x 128 tiles issues
N*V*H*(1/BLOCK_N + 1/BLOCK_V) ~ 6.7e10 fp32 atomic adds (~270 GB through L2), results depend on
the order of the adds, and the fp32 grad_weight accumulator alone is V*H*4 = 2.1 GB, over the
2 GB budget. A deterministic scheme whose kernels each own a block of grad_hidden rows (or of
grad_weight rows) must either keep a [BLOCK_N, H] fp32 accumulator (1-2 MB: not on chip) or
recompute the logits once per H slice. Chunking V instead makes grad_weight need no
accumulation at all, keeps the only accumulator (grad_hidden, N*H*4 = 134 MB) small, leaves the
two big GEMMs to cuBLAS, and is deterministic; its cost is writing and twice reading the bf16
dlogits (3 * N*V*2 = 6.3 GB at the target shape, ~2 ms of HBM time next to ~34 TFLOP of
matmuls). Extra peak memory at the target: one 512 MiB dlogits chunk + the 134 MB accumulator
and one 134 MB GEMM result + the bias partials, well under 2 GB.

Under ``TRITON_INTERPRET=1`` (the tests on the CPU) the kernels run with small fixed blocks,
spans and chunks, so that small shapes still cover several splits, tiles and chunks.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# ---- kernels ------------------------------------------------------------------------------------

# Read when this module is imported, which is when Triton decides (from the same knob) whether
# the kernels below are compiled or interpreted.
DOT_IN_ACC = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def _grouped_program(pid, num_row_blocks, num_col_blocks, GROUP_N: tl.constexpr):
    """(row block, column block) of a program: consecutive programs take GROUP_N row blocks
    for one column block, so that the programs resident together read the same weight tiles
    (from L2) and a few row blocks of hidden."""
    per_group = GROUP_N * num_col_blocks
    group = pid // per_group
    first_row_block = group * GROUP_N
    group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_N)
    local = pid % per_group
    return first_row_block + local % group_rows, local // group_rows


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok,
                 stride_hn, stride_hk, stride_wv, stride_wk, inv_temperature, H: tl.constexpr,
                 ACC: tl.constexpr, HAS_BIAS: tl.constexpr, ALLOW_TF32: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(hidden[rows] @ weight[cols]^T + bias[cols]) * inv_temperature, accumulated in ACC.
    H is a compile-time constant (one per model): the K loop has a fixed trip count and, when
    BLOCK_K divides H, masks the compiler can drop. 64-bit row offsets: V * H passes 2^31 for
    large vocabularies and hidden sizes. Under the interpreter (DOT_IN_ACC) the operands are
    converted to the accumulator's type before tl.dot: Triton 3.6's interpreter multiplies
    bfloat16 operands' bit patterns as integers. Products of 16-bit floats are exact in fp32,
    so the result is the one a 16-bit tl.dot gives."""
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hn + offs_k[None, :] * stride_hk
    w_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * stride_wv + offs_k[None, :] * stride_wk
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        k_ok = (k0 + offs_k) < H
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_IN_ACC:
            h = h.to(ACC)
            w = w.to(ACC)
        if ALLOW_TF32:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="tf32", out_dtype=ACC)
        else:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee", out_dtype=ACC)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return acc * inv_temperature


@triton.jit
def _forward_partials_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, inv_temperature_ptr, partials_ptr,
    N, V, stride_hn, stride_hk, stride_wv, stride_wk, ignore_index, n_splits, plane, rows_bucket,
    H: tl.constexpr, SPLIT_COLUMNS: tl.constexpr, HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Per (split, row): running max m of z = logits / T over the split's columns, s = sum
    exp(z - m), w = sum exp(z - m) * (z - m) (for the entropy, against the running max to avoid
    the cancellation of lse - E[z]), and the label's z if the split holds it (else 0). A row
    that meets a NaN gets s = NaN. Loops have compile-time trip counts and skip work with `if`
    (tiles past V, blocks of ignored rows such as prompt tokens)."""
    ACC: tl.constexpr = partials_ptr.dtype.element_ty
    row_block, split = _grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP_N)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    active = row_ok & (labels != ignore_index)
    any_active = tl.max(active.to(tl.int32), axis=0) > 0
    inv_temperature = tl.load(inv_temperature_ptr)
    v_begin = split * SPLIT_COLUMNS

    m = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
    s = tl.zeros([BLOCK_N], dtype=ACC)
    w = tl.zeros([BLOCK_N], dtype=ACC)
    label_z = tl.zeros([BLOCK_N], dtype=ACC)
    nan_count = tl.zeros([BLOCK_N], dtype=tl.int32)
    for t in range(0, SPLIT_COLUMNS, BLOCK_V):
        if any_active & (v_begin + t < V):
            cols = v_begin + t + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok,
                             stride_hn, stride_hk, stride_wv, stride_wk, inv_temperature, H,
                             ACC, HAS_BIAS, ALLOW_TF32, BLOCK_N, BLOCK_V, BLOCK_K)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            # exp(z - m) with m = -inf (a row of -inf so far) would be exp(nan): shift by 0.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_shift)
            p = tl.exp(z - m_shift[:, None])
            if WITH_ENTROPY:
                moved = tl.where(m == float("-inf"), 0.0, m - m_shift)
                z_minus_m = tl.where(p > 0, z - m_shift[:, None], 0.0)  # no 0 * -inf
                w = alpha * (w + moved * s) + tl.sum(p * z_minus_m, axis=1)
            s = alpha * s + tl.sum(p, axis=1)
            m = m_new
            nan_count += tl.sum((z != z).to(tl.int32), axis=1)
            label_z += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
    # tl.max does not promise to propagate NaN, so a NaN row is marked through its sum.
    s = tl.where(nan_count > 0, float("nan"), s)

    # partials is [4, n_splits, N]; plane = n_splits * N (an int64 argument past 2^31).
    out = partials_ptr + split.to(tl.int64) * N + rows
    tl.store(out, m, mask=row_ok)
    out += plane
    tl.store(out, s, mask=row_ok)
    out += plane
    tl.store(out, w, mask=row_ok)
    out += plane
    tl.store(out, label_z, mask=row_ok)


@triton.jit
def _combine_kernel(partials_ptr, labels_ptr, logprobs_ptr, entropy_ptr, logsumexp_ptr,
                    N, V, ignore_index, plane, N_SPLITS: tl.constexpr,
                    WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """Merges the splits of each row (the same online rule across splits as across tiles).
    logsumexp and entropy are NaN for a row with a NaN, a +inf or only -inf logits; the
    log-prob is NaN there and for a label outside [0, V) (never read); ignored rows give 0."""
    ACC: tl.constexpr = partials_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    m = tl.full([BLOCK], float("-inf"), dtype=ACC)
    s = tl.zeros([BLOCK], dtype=ACC)
    w = tl.zeros([BLOCK], dtype=ACC)
    label_z = tl.zeros([BLOCK], dtype=ACC)
    part = partials_ptr + rows.to(tl.int64)
    for _ in range(0, N_SPLITS):
        m_j = tl.load(part, mask=row_ok, other=float("-inf"))
        s_j = tl.load(part + plane, mask=row_ok, other=0.0)
        m_new = tl.maximum(m, m_j)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_shift)
        beta = tl.exp(m_j - m_shift)
        if WITH_ENTROPY:
            w_j = tl.load(part + plane + plane, mask=row_ok, other=0.0)
            moved = tl.where(m == float("-inf"), 0.0, m - m_shift)
            moved_j = tl.where(m_j == float("-inf"), 0.0, m_j - m_shift)
            w = alpha * (w + moved * s) + beta * (w_j + moved_j * s_j)
        s = alpha * s + beta * s_j
        m = m_new
        label_z += tl.load(part + plane + plane + plane, mask=row_ok, other=0.0)
        part += N
    log_s = tl.log(s)
    finite = (m > float("-inf")) & (m < float("inf"))
    logsumexp = tl.where(finite, m + log_s, float("nan"))
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < V)
    logprobs = tl.where(in_range, label_z - logsumexp, float("nan"))
    tl.store(logprobs_ptr + rows, tl.where(ignored, 0.0, logprobs), mask=row_ok)
    tl.store(logsumexp_ptr + rows, tl.where(ignored, 0.0, logsumexp), mask=row_ok)
    if WITH_ENTROPY:
        entropy = tl.where(finite, log_s - w / s, float("nan"))
        tl.store(entropy_ptr + rows, tl.where(ignored, 0.0, entropy), mask=row_ok)


@triton.jit
def _backward_dlogits_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, inv_temperature_ptr, logsumexp_ptr,
    entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr, dlogits_ptr, bias_partials_ptr,
    N, V, stride_hn, stride_hk, stride_wv, stride_wk, ignore_index, v_begin, width,
    rows_bucket, H: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GRAD_LOGPROBS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, BIAS_GRAD: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """dlogits[:, j] for the vocabulary columns v_begin + j, j < width, written [N, width]
    contiguous in the inputs' dtype: per element
        (a * [col == label] - p * (a + b * (log p + H))) / T,
    a, b the incoming gradients of log-prob and entropy, p = exp(z - logsumexp). Ignored rows
    give exactly 0; rows whose logsumexp is not finite or whose label is outside [0, V) give
    NaN, as token_logprobs_backward does. With BIAS_GRAD, the column sums of the block's rows
    go to bias_partials[row block, j] (deterministic: summed over row blocks afterwards)."""
    ACC: tl.constexpr = logsumexp_ptr.dtype.element_ty
    row_block, col_block = _grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N),
                                            tl.cdiv(width, BLOCK_V), GROUP_N)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    local = col_block * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < width
    cols = v_begin + local
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    active = row_ok & (labels != ignore_index)
    # +inf for inactive rows: their p = exp(z - lse) is 0 rather than an overflow
    lse = tl.load(logsumexp_ptr + rows, mask=active, other=float("inf"))
    bad = active & ((labels < 0) | (labels >= V) | ~(tl.abs(lse) < float("inf")))
    a = tl.zeros([BLOCK_N], dtype=ACC)
    b = tl.zeros([BLOCK_N], dtype=ACC)
    entropy = tl.zeros([BLOCK_N], dtype=ACC)
    if HAS_GRAD_LOGPROBS:
        a = tl.load(grad_logprobs_ptr + rows, mask=active, other=0.0).to(ACC)
    if HAS_GRAD_ENTROPY:
        b = tl.load(grad_entropy_ptr + rows, mask=active, other=0.0).to(ACC)
        entropy = tl.load(entropy_ptr + rows, mask=active, other=0.0).to(ACC)
    inv_temperature = tl.load(inv_temperature_ptr)
    z = tl.zeros([BLOCK_N, BLOCK_V], dtype=ACC)
    if tl.max(active.to(tl.int32), axis=0) > 0:  # a block of ignored rows skips the matmul
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok,
                         stride_hn, stride_hk, stride_wv, stride_wk, inv_temperature, H,
                         ACC, HAS_BIAS, ALLOW_TF32, BLOCK_N, BLOCK_V, BLOCK_K)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    weight_of_p = (a + b * entropy)[:, None] + b[:, None] * logp
    dz = tl.where(p > 0, -p * weight_of_p, 0.0)  # p = 0 at a -inf logit: no 0 * inf
    dz += tl.where(cols[None, :] == labels[:, None], a[:, None], 0.0)
    dz = dz * inv_temperature
    dz = tl.where(active[:, None], dz, 0.0)
    dz = tl.where(bad[:, None], float("nan"), dz)
    out = dlogits_ptr + rows.to(tl.int64)[:, None] * width + local[None, :]
    tl.store(out, dz.to(dlogits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if BIAS_GRAD:
        column_sums = tl.sum(dz, axis=0)
        tl.store(bias_partials_ptr + row_block.to(tl.int64) * width + local, column_sums,
                 mask=col_ok)


# ---- launch configuration ---------------------------------------------------------------------

INTERPRETED = bool(DOT_IN_ACC)  # the kernels above were decorated for the interpreter

# Vocabulary columns per forward program: a multiple of every BLOCK_V below, so the number of
# splits (and the partials buffer) does not depend on the configuration the autotuner picks.
SPLIT_COLUMNS = 128 if INTERPRETED else 2048
# Upper bound of the backward's dlogits chunk (N x chunk columns, inputs' dtype).
DLOGITS_CHUNK_BYTES = 512 * 2**20
INTERPRETER_CHUNK_COLUMNS = 96
COMBINE_BLOCK = 32 if INTERPRETED else 256

# Fixed small blocks for the interpreter (tl.dot needs every dimension >= 16).
INTERPRETER_BLOCKS = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=32, GROUP_N=2)

# Tiles sized for H100 (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages). Operand tiles take
# (BLOCK_N + BLOCK_V) * BLOCK_K * itemsize bytes of shared memory per stage, within 227 KB:
# 16-bit inputs get wgmma-sized tiles and 3-4 stages; fp32 inputs (TF32 or exact, as torch's
# matmuls) half-depth tiles; fp64 inputs (the gradcheck path) small ones. Compiled for sm_90a
# (triton.compile and ptxas -v, which need no GPU; tests/test_fused_linear.py compiles one
# tile), the 16-bit tiles use 168-255 registers and spill only at 128 x 256 (100-300 bytes).
TILES = {
    2: [(128, 128, 64, 8, 4), (64, 256, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4)],
    4: [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)],
    8: [(32, 64, 32, 4, 2), (64, 64, 32, 4, 2)],
}
# Row blocks of the smallest BLOCK_N: sizes the bias-gradient partials for any configuration.
MIN_BLOCK_N = INTERPRETER_BLOCKS["BLOCK_N"] if INTERPRETED else \
    min(t[0] for tiles in TILES.values() for t in tiles)
assert INTERPRETED or all(SPLIT_COLUMNS % t[1] == 0 for tiles in TILES.values() for t in tiles)


# Row blocks per program group. About one CTA fits an SM (128-160 KB of shared memory), so the
# 132 resident programs cover 16 row blocks (16 * BLOCK_N rows of hidden: 8-16 MB, in L2) and
# ~8 column blocks, and each weight tile comes from HBM once per 16 row blocks: the weight is
# read N / (16 * BLOCK_N) times per pass (4 times at N = 8192 with BLOCK_N = 128).
GROUP_N = 16


def _autotuned(kernel, key):
    """One autotuner per input itemsize, over that itemsize's tiles. rows_bucket (N rounded up
    to a power of two) keys the tuning on the order of magnitude of N, so that a new batch
    size does not retune."""
    return {itemsize: triton.autotune(
        [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_K": k, "GROUP_N": GROUP_N},
                       num_warps=warps, num_stages=stages)
         for n, v, k, warps, stages in tiles], key=key)(kernel)
        for itemsize, tiles in TILES.items()}


# torch.library.triton_op finds an op's kernels by reading its body's source, where these are
# out of sight (imported on first use, after TRITON_INTERPRET is known); AOTAutograd's cache
# key includes the kernels' source only if it can find them, so tell it (private registry).
try:
    from torch._library.triton import triton_ops_to_kernels as _op_kernels

    _op_kernels["rlengine::fused_linear_logprobs"] = [_forward_partials_kernel, _combine_kernel]
    _op_kernels["rlengine::fused_linear_logprobs_backward"] = [_backward_dlogits_kernel]
except ImportError:  # pragma: no cover - a torch without the registry
    pass

if INTERPRETED:
    _FORWARD_KERNELS = dict.fromkeys(TILES, _forward_partials_kernel)
    _DLOGITS_KERNELS = dict.fromkeys(TILES, _backward_dlogits_kernel)
    _BLOCKS = INTERPRETER_BLOCKS
else:
    _FORWARD_KERNELS = _autotuned(_forward_partials_kernel, ["H", "V", "rows_bucket"])
    _DLOGITS_KERNELS = _autotuned(_backward_dlogits_kernel, ["H", "width", "rows_bucket"])
    _BLOCKS = {}


# ---- launches (called from the triton_op bodies in rlengine/ops/fused_linear.py) ----------------

def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _allow_tf32(dtype: torch.dtype) -> bool:
    """fp32 inputs use TF32 tensor cores only where torch's own fp32 matmuls would; the flag
    means nothing to 16-bit inputs, and fp64 is always exact."""
    if dtype == torch.float32:
        return torch.backends.cuda.matmul.allow_tf32
    return dtype != torch.float64


def _rows_bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _inverse_temperature(temperature: float, dtype: torch.dtype, device) -> torch.Tensor:
    # A one-element tensor rather than a scalar argument: Triton passes Python floats as fp32,
    # which would round 1/T for float64 inputs. For the rest this is float(1/T), as on the CPU.
    return torch.full((1,), 1.0 / temperature, dtype=dtype, device=device)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            labels: torch.Tensor, temperature: float, ignore_index: int,
            with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, entropy or empty, logsumexp) for hidden [N, H], weight [V, H], labels [N]."""
    n = hidden.shape[0]
    acc = _accumulator_dtype(hidden.dtype)
    logprobs = hidden.new_empty((n,), dtype=acc)
    logsumexp = hidden.new_empty((n,), dtype=acc)
    entropy = hidden.new_empty((n if with_entropy else 0,), dtype=acc)
    if n == 0:
        return logprobs, entropy, logsumexp
    labels = labels.contiguous()
    with _on_device(hidden):
        _launch_forward(hidden, weight, bias, labels, temperature, ignore_index, with_entropy,
                        logprobs, entropy, logsumexp)
    return logprobs, entropy, logsumexp


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_forward(hidden, weight, bias, labels, temperature, ignore_index, with_entropy,
                    logprobs, entropy, logsumexp):
    n, h = hidden.shape
    v = weight.shape[0]
    acc = logprobs.dtype
    n_splits = triton.cdiv(v, SPLIT_COLUMNS)
    partials = hidden.new_empty((4, n_splits, n), dtype=acc)
    inv_temperature = _inverse_temperature(temperature, acc, hidden.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * n_splits,)

    wrap_triton(_FORWARD_KERNELS[hidden.dtype.itemsize])[grid](
        hidden, weight, bias if bias is not None else weight, labels, inv_temperature, partials,
        n, v, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        ignore_index, n_splits, n_splits * n, _rows_bucket(n), H=h, SPLIT_COLUMNS=SPLIT_COLUMNS,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy,
        ALLOW_TF32=_allow_tf32(hidden.dtype), **_BLOCKS)
    wrap_triton(_combine_kernel)[(triton.cdiv(n, COMBINE_BLOCK),)](
        partials, labels, logprobs, entropy if with_entropy else logprobs, logsumexp,
        n, v, ignore_index, n_splits * n, N_SPLITS=n_splits, WITH_ENTROPY=with_entropy,
        BLOCK=COMBINE_BLOCK)


def _chunk_columns(n: int, v: int, dtype: torch.dtype) -> int:
    if INTERPRETED:
        return min(v, INTERPRETER_CHUNK_COLUMNS)
    columns = DLOGITS_CHUNK_BYTES // max(1, n * dtype.itemsize)
    return min(v, max(256, columns // 256 * 256))


def _matmul_accumulate(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b with the result in acc (fp32 for 16-bit inputs): cuBLAS writes fp32 directly."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=acc)
    return torch.mm(a.to(acc), b.to(acc))


def backward(grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None,
             hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             labels: torch.Tensor, logsumexp: torch.Tensor, entropy: torch.Tensor,
             temperature: float, ignore_index: int, need_hidden: bool, need_weight: bool,
             need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias) in the inputs' dtype; an empty tensor for each
    gradient not asked for."""
    n, h = hidden.shape
    v = weight.shape[0]
    dtype = hidden.dtype
    acc = _accumulator_dtype(dtype)
    grad_weight = hidden.new_empty((v, h)) if need_weight else hidden.new_empty((0,))
    grad_bias = hidden.new_empty((v,)) if need_bias else hidden.new_empty((0,))
    if n == 0:
        return (hidden.new_zeros((n, h)) if need_hidden else hidden.new_empty((0,)),
                grad_weight.zero_(), grad_bias.zero_())
    labels = labels.contiguous()
    chunk = _chunk_columns(n, v, dtype)
    n_chunks = triton.cdiv(v, chunk)
    # One chunk: grad_hidden straight from one GEMM; several: an fp32 sum over the chunks.
    grad_hidden = hidden.new_empty((n, h)) if need_hidden else hidden.new_empty((0,))
    grad_hidden_sum = hidden.new_zeros((n, h), dtype=acc) if need_hidden and n_chunks > 1 \
        else None
    inv_temperature = _inverse_temperature(temperature, acc, hidden.device)
    has_grad_logprobs = grad_logprobs is not None
    has_grad_entropy = grad_entropy is not None
    # (unused pointer arguments get any tensor: their kernel branches are compiled out)
    grad_logprobs = grad_logprobs.contiguous() if has_grad_logprobs else logsumexp
    grad_entropy = grad_entropy.contiguous() if has_grad_entropy else logsumexp
    with _on_device(hidden):
        for v_begin in range(0, v, chunk):
            width = min(chunk, v - v_begin)
            dlogits = hidden.new_empty((n, width))
            bias_partials = (hidden.new_zeros((triton.cdiv(n, MIN_BLOCK_N), width), dtype=acc)
                             if need_bias else None)

            def grid(meta, width=width):
                return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(width, meta["BLOCK_V"]),)

            wrap_triton(_DLOGITS_KERNELS[dtype.itemsize])[grid](
                hidden, weight, bias if bias is not None else weight, labels, inv_temperature,
                logsumexp, entropy if has_grad_entropy else logsumexp,
                grad_logprobs, grad_entropy,
                dlogits, bias_partials if bias_partials is not None else logsumexp,
                n, v, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                ignore_index, v_begin, width, _rows_bucket(n), H=h,
                HAS_BIAS=bias is not None, HAS_GRAD_LOGPROBS=has_grad_logprobs,
                HAS_GRAD_ENTROPY=has_grad_entropy, BIAS_GRAD=need_bias,
                ALLOW_TF32=_allow_tf32(dtype), **_BLOCKS)
            if need_weight:
                torch.mm(dlogits.t(), hidden, out=grad_weight[v_begin:v_begin + width])
            if need_hidden:
                weight_chunk = weight[v_begin:v_begin + width]
                if grad_hidden_sum is None:
                    torch.mm(dlogits, weight_chunk, out=grad_hidden)
                else:
                    grad_hidden_sum += _matmul_accumulate(dlogits, weight_chunk, acc)
            if need_bias:
                grad_bias[v_begin:v_begin + width] = bias_partials.sum(0)
    if grad_hidden_sum is not None:
        grad_hidden = grad_hidden_sum.to(dtype)
    return grad_hidden, grad_weight, grad_bias
