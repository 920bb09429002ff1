"""Triton engine of the (max, min) products (``torch.ops.pykernels_triton.*maxmin_matmul*``).

Same meaning as ``pykernels.reference.flow``, argument for argument with the schemas in
``csrc/registration.cpp``; the soft product's formulation is that of ``csrc/flow/maxmin.h``.

Forward: one program owns a [BLOCK_M, BLOCK_N] tile of outputs and walks k one step at a time, loading a
column of a and a row of b (L1-resident after the first touch) and updating every output of the tile. The
(max, min) semiring has no tensor-core path, so each (i, j, k) costs the same few ALU operations however
k is blocked; a [BM, BK, BN] broadcast would add a reduction over BK and a second search for the arg,
while the per-k loop keeps two registers per output. NaN needs no per-element care: min(a_ik, b_kj) is
NaN exactly when a_ik or b_kj is, so the first NaN k of output (i, j) is min(first NaN k of row i of a,
first NaN k of column j of b), two vectors tracked on the side; the inner loop is then a strict
comparison (ties keep the lowest k) and the NaN outputs are patched at the end.

Backward: one kernel computes the gradient of the left operand, tile [BLOCK_M, BLOCK_K], looping over the
n outputs of its rows; the right operand's gradient is the same kernel on the transposed problem
(out^T = b^T (max, min) a^T with the same argk), so each gradient element is written by exactly one
program: no atomics, bitwise reproducible. The hard backward gathers a[i, k*] and b[k*, j] per output and
adds the routed gradient into its k* column; the soft backward recomputes e_x, e_y from the kept hard
product and sum. Both cost O(m k n), like the forward.

Tensors are read through their strides (a stride-0 broadcast batch costs nothing); offsets are int64.
fp16/bf16/fp32 accumulate in fp32, fp64 in fp64. Block sizes come from host rules on m, n, k (no
``@triton.autotune``, which the interpreter would run config by config): the largest power of two up to
64 that pads a dimension by at most 25%, so Vico's 16 x 77 outputs take 16 x 32 tiles (20% padding)
rather than 16 x 128 (66%).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import _cast, _lse_dtype
from .graph import _acc, _pow2, _split_scale

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MAX_BLOCK = 64
# The backward's row block: its one-hot (hard) and two-exponential (soft) tiles need more registers per
# element than the forward's, and ptxas puts a 64 x 64 hard tile at 252 registers a thread (sm_90).
_MAX_GRAD_ROWS = 32


# ------------------------------------------------------------------------------------------- heuristics


def _block(size: int, cap: int = _MAX_BLOCK) -> int:
    """The largest power of two <= cap that pads size by at most 25%, but not below min(16, size rounded up
    to a power of two), and at least 4."""
    b = max(4, min(_pow2(size), cap))
    while b > 16 and triton.cdiv(size, b) * b * 4 > size * 5:
        b //= 2
    return b


def _warps(tile: int) -> int:
    return max(1, min(8, tile // 256))


def _clamp(dtype: torch.dtype) -> float:
    """csrc/flow/maxmin.h's SoftExp<A>::clamp for the accumulation type."""
    return 700.0 if dtype == torch.float64 else 80.0


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _hard_tile(a_base, b_base, rows, cols, M, N, K, sam, sak, sbk, sbn, ACC: tl.constexpr,
               WITH_ARG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(max_k min(a_ik, b_kj), lowest maximising k) of one tile, NaN-exact (see the module docstring)."""
    row_mask = rows < M
    col_mask = cols < N
    a_ptrs = a_base + rows.to(tl.int64) * sam
    b_ptrs = b_base + cols.to(tl.int64) * sbn
    best = tl.full([BLOCK_M, BLOCK_N], float("-inf"), ACC)
    arg = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    row_nan = tl.full([BLOCK_M], K, tl.int32)
    col_nan = tl.full([BLOCK_N], K, tl.int32)
    for k in range(0, K):
        x = tl.load(a_ptrs, mask=row_mask, other=0.0).to(ACC)
        y = tl.load(b_ptrs, mask=col_mask, other=0.0).to(ACC)
        a_ptrs += sak
        b_ptrs += sbk
        row_nan = tl.minimum(row_nan, tl.where(x != x, k, K))
        col_nan = tl.minimum(col_nan, tl.where(y != y, k, K))
        # Ties pick a, as torch.minimum does; the two differ only in the sign of a zero.
        v = tl.where(x[:, None] <= y[None, :], x[:, None], y[None, :])
        if WITH_ARG:
            take = v > best
            best = tl.where(take, v, best)
            arg = tl.where(take, k, arg)
        else:
            best = tl.maximum(best, v)
    nan_k = tl.minimum(row_nan[:, None], col_nan[None, :])
    has_nan = nan_k < K
    return tl.where(has_nan, float("nan"), best), tl.where(has_nan, nan_k, arg)


@triton.jit
def _soft_exp(h, x, inv_t, CLAMP: tl.constexpr):
    # Written as a select that keeps a NaN exponent NaN, and x = h gives 0 even where h is infinite, as
    # csrc/flow/maxmin.h's soft_exponent does.
    e = tl.where(h == x, 0.0, (h - x) * inv_t)
    return tl.exp(tl.where(CLAMP < e, CLAMP, e))


@triton.jit
def _forward_kernel(a_ptr, b_ptr, out_ptr, argk_ptr, hard_ptr, sum_ptr, a_st, b_st, M, N, K, tiles_n,
                    inv_t_hi, inv_t_lo, t_hi, t_lo, SOFT: tl.constexpr, CLAMP: tl.constexpr, ACC: tl.constexpr,
                    INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Hard: out, argk. SOFT: out, hard, sum (argk_ptr unused)."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    bat = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    rows = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    a_base = a_ptr + bat * a_st[0]
    b_base = b_ptr + bat * b_st[0]
    best, arg = _hard_tile(a_base, b_base, rows, cols, M, N, K, a_st[1], a_st[2], b_st[1], b_st[2], ACC, not SOFT,
                           BLOCK_M, BLOCK_N)
    offs = bat * M * N + rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if SOFT:
        inv_t = tl.cast(inv_t_hi, ACC) + tl.cast(inv_t_lo, ACC)
        t = tl.cast(t_hi, ACC) + tl.cast(t_lo, ACC)
        a_ptrs = a_base + rows.to(tl.int64) * a_st[1]
        b_ptrs = b_base + cols.to(tl.int64) * b_st[2]
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k in range(0, K):
            x = tl.load(a_ptrs, mask=rows < M, other=0.0).to(ACC)
            y = tl.load(b_ptrs, mask=cols < N, other=0.0).to(ACC)
            a_ptrs += a_st[2]
            b_ptrs += b_st[1]
            total += 1.0 / (_soft_exp(best, x[:, None], inv_t, CLAMP) + _soft_exp(best, y[None, :], inv_t, CLAMP))
        # The hard product is one of the inputs, so storing it in their type is exact.
        tl.store(hard_ptr + offs, best.to(hard_ptr.dtype.element_ty), mask=mask)
        tl.store(sum_ptr + offs, total, mask=mask)
        tl.store(out_ptr + offs, _cast(best + t * tl.log(total), out_ptr.dtype.element_ty, INTERPRETED), mask=mask)
    else:
        tl.store(out_ptr + offs, best.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(argk_ptr + offs, arg, mask=mask)


# --------------------------------------------------------------------------------------------- backward


@triton.jit
def _grad_left_kernel(x_ptr, y_ptr, argk_ptr, hard_ptr, sum_ptr, g_ptr, grad_ptr, x_st, y_st, argk_st, hard_st,
                      sum_st, g_st, grad_st, M, N, K, tiles_k, inv_t_hi, inv_t_lo, SOFT: tl.constexpr,
                      TIE_TO_LEFT: tl.constexpr, CLAMP: tl.constexpr, ACC: tl.constexpr,
                      INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The gradient of x in out = x (max, min) y, x [B, M, K], y [B, K, N]; per-output tensors (argk or
    hard and sum, g) are [B, M, N]; all read through the strides given. TIE_TO_LEFT: x gets the gradient
    when x <= y (x is a), else only when x < y (x is b^T). Either way a NaN pair sends it to both sides,
    as the reference's autograd does."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_k
    bat = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    rows = (tile // tiles_k) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = (tile % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < M
    k_mask = ks < K
    rows64 = rows.to(tl.int64)
    x_base = x_ptr + bat * x_st[0]
    y_base = y_ptr + bat * y_st[0]
    g_ptrs = g_ptr + bat * g_st[0] + rows64 * g_st[1]
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=ACC)
    if SOFT:
        inv_t = tl.cast(inv_t_hi, ACC) + tl.cast(inv_t_lo, ACC)
        x = tl.load(x_base + rows64[:, None] * x_st[1] + ks.to(tl.int64)[None, :] * x_st[2],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(ACC)
        y_ptrs = y_base + ks.to(tl.int64) * y_st[1]
        h_ptrs = hard_ptr + bat * hard_st[0] + rows64 * hard_st[1]
        s_ptrs = sum_ptr + bat * sum_st[0] + rows64 * sum_st[1]
        for j in range(0, N):
            g = tl.load(g_ptrs, mask=row_mask, other=0.0).to(ACC)
            h = tl.load(h_ptrs, mask=row_mask, other=0.0).to(ACC)
            s = tl.load(s_ptrs, mask=row_mask, other=1.0).to(ACC)
            y = tl.load(y_ptrs, mask=k_mask, other=0.0).to(ACC)
            g_ptrs += g_st[2]
            h_ptrs += hard_st[2]
            s_ptrs += sum_st[2]
            y_ptrs += y_st[2]
            ex = _soft_exp(h[:, None], x, inv_t, CLAMP)
            term = 1.0 / (ex + _soft_exp(h[:, None], y[None, :], inv_t, CLAMP))
            acc += (g / s)[:, None] * (ex * term * term)
    else:
        a_ptrs = argk_ptr + bat * argk_st[0] + rows64 * argk_st[1]
        x_rows = x_base + rows64 * x_st[1]
        y_col = y_base
        for j in range(0, N):
            kstar = tl.load(a_ptrs, mask=row_mask, other=-1)
            g = tl.load(g_ptrs, mask=row_mask, other=0.0).to(ACC)
            # An argk outside [0, K) (not one this engine wrote) routes nothing and reads nothing.
            valid = row_mask & (kstar >= 0) & (kstar < K)
            k64 = kstar.to(tl.int64)
            xs = tl.load(x_rows + k64 * x_st[2], mask=valid, other=0.0).to(ACC)
            ys = tl.load(y_col + k64 * y_st[1], mask=valid, other=0.0).to(ACC)
            a_ptrs += argk_st[2]
            g_ptrs += g_st[2]
            y_col += y_st[2]
            if TIE_TO_LEFT:
                to_left = valid & ~(xs > ys)
            else:
                to_left = valid & ~(xs >= ys)
            routed = tl.where(to_left, g, 0.0)
            acc += tl.where(kstar[:, None] == ks[None, :], routed[:, None], 0.0)
    tl.store(grad_ptr + bat * grad_st[0] + rows64[:, None] * grad_st[1] + ks.to(tl.int64)[None, :] * grad_st[2],
             _cast(acc, grad_ptr.dtype.element_ty, INTERPRETED), mask=row_mask[:, None] & k_mask[None, :])


# ------------------------------------------------------------------------------------------------- host


def _check_operands(op, a, b):
    """What the kernels rely on to stay in bounds; pykernels.flow checks first, more kindly."""
    name = f"pykernels.{op}"
    for label, t in (("a", a), ("b", b)):
        if t.dim() != 3:
            raise ValueError(f"{name}: {label} must be 3-D [batch, rows, cols], got shape {list(t.shape)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}: {label} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if b.dtype != a.dtype:
        raise TypeError(f"{name}: a is {a.dtype} but b is {b.dtype}")
    if b.device != a.device:
        raise ValueError(f"{name}: a is on {a.device} but b is on {b.device}")
    if b.shape[0] != a.shape[0] or b.shape[1] != a.shape[2]:
        raise ValueError(f"{name}: b {list(b.shape)} does not fit a {list(a.shape)}: expected "
                         f"[{a.shape[0]}, {a.shape[2]}, n]")
    if a.shape[2] == 0:
        raise ValueError(f"{name}: the inner size k must be at least 1 (a max over no terms is undefined)")
    if a.shape[2] > 2**31 - 1:
        raise ValueError(f"{name}: k = {a.shape[2]} does not fit argk's int32")
    return a.shape[0], a.shape[1], b.shape[2], a.shape[2]


def _check_outputs_like(op, shape, device, **tensors):
    """Per-output tensors of a backward: [batch, m, n] on the inputs' device; argk int32, the rest float."""
    for label, t in tensors.items():
        if t.shape != shape:
            raise ValueError(f"pykernels.{op}: {label} must be [batch, m, n] = {list(shape)}, got {list(t.shape)}")
        if t.device != device:
            raise ValueError(f"pykernels.{op}: {label} is on {t.device}, expected {device}")
        if label == "argk" and t.dtype != torch.int32:
            raise TypeError(f"pykernels.{op}: argk must be int32, got {t.dtype}")
        if label != "argk" and t.dtype not in _FLOATS:
            raise TypeError(f"pykernels.{op}: {label} must be a float tensor, got {t.dtype}")


def _check_temperature(op, temperature):
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"pykernels.{op}: temperature must be a finite number > 0, got {temperature}")


def _forward(a, b, temperature):
    """The hard product (out, argk) when temperature is None, else the soft one (out, hard, sum)."""
    batch, m, n, k = a.shape[0], a.shape[1], b.shape[2], a.shape[2]
    soft = temperature is not None
    shape = (batch, m, n)
    out = a.new_empty(shape)
    if soft:
        kept = (a.new_empty(shape), torch.empty(shape, dtype=_lse_dtype(a.dtype), device=a.device))
    else:
        kept = (torch.empty(shape, dtype=torch.int32, device=a.device),)
    if out.numel() == 0:
        return (out, *kept)
    # out stands in for the outputs the other kind of product writes: the kernel never touches them.
    argk, hard, sum_ = (out, *kept) if soft else (kept[0], out, out)
    inv_t, t = (_split_scale(1.0 / temperature), _split_scale(temperature)) if soft else ((0.0, 0.0), (0.0, 0.0))
    block_m, block_n = _block(m), _block(n)
    tiles_n = triton.cdiv(n, block_n)
    _forward_kernel[(batch * triton.cdiv(m, block_m) * tiles_n,)](
        a, b, out, argk, hard, sum_, a.stride(), b.stride(), m, n, k, tiles_n, *inv_t, *t, SOFT=soft,
        CLAMP=_clamp(a.dtype), ACC=_acc(a.dtype), INTERPRETED=a.device.type == "cpu", BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=_warps(block_m * block_n))
    return (out, *kept)


def _grad_left(x, y, per_output, grad, tie_to_left, inv_t, meta):
    batch, rows, k = x.shape
    block_m, block_k = _block(rows, _MAX_GRAD_ROWS), _block(k)
    tiles_k = triton.cdiv(k, block_k)
    _grad_left_kernel[(batch * triton.cdiv(rows, block_m) * tiles_k,)](
        x, y, *per_output, grad, x.stride(), y.stride(), *(t.stride() for t in per_output), grad.stride(), rows,
        y.shape[2], k, tiles_k, *inv_t, TIE_TO_LEFT=tie_to_left, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=_warps(block_m * block_k), **meta)


def _backward(a, b, kept, grad_out, temperature, a_grad, b_grad):
    """kept: (argk,) for the hard product, (hard, sum) for the soft one (temperature not None)."""
    soft = temperature is not None
    grad_a = a.new_empty(a.shape) if a_grad else a.new_empty(0)
    grad_b = b.new_empty(b.shape) if b_grad else b.new_empty(0)
    if grad_out.numel() == 0:
        return grad_a.zero_(), grad_b.zero_()
    # grad_out stands in for the tensors the other kind of product keeps: the kernel never reads them.
    per_output = (grad_out, *kept, grad_out) if soft else (kept[0], grad_out, grad_out, grad_out)
    inv_t = _split_scale(1.0 / temperature) if soft else (0.0, 0.0)
    meta = dict(SOFT=soft, CLAMP=_clamp(a.dtype), ACC=_acc(a.dtype), INTERPRETED=a.device.type == "cpu")
    if a_grad:
        _grad_left(a, b, per_output, grad_a, True, inv_t, meta)
    if b_grad:
        # b's gradient is the left operand's of out^T = b^T (max, min) a^T, read through transposed views.
        _grad_left(b.transpose(1, 2), a.transpose(1, 2), tuple(t.transpose(1, 2) for t in per_output),
                   grad_b.transpose(1, 2), False, inv_t, meta)
    return grad_a, grad_b


def maxmin_matmul(a, b):
    _check_operands("maxmin_matmul", a, b)
    return _forward(a, b, None)


def maxmin_matmul_backward(a, b, argk, grad_out, a_grad, b_grad):
    op = "maxmin_matmul_backward"
    batch, m, n, _ = _check_operands(op, a, b)
    _check_outputs_like(op, torch.Size((batch, m, n)), a.device, argk=argk, grad_out=grad_out)
    return _backward(a, b, (argk,), grad_out, None, a_grad, b_grad)


def soft_maxmin_matmul(a, b, temperature):
    _check_operands("soft_maxmin_matmul", a, b)
    _check_temperature("soft_maxmin_matmul", temperature)
    return _forward(a, b, temperature)


def soft_maxmin_matmul_backward(a, b, hard, sum_, grad_out, temperature, a_grad, b_grad):
    op = "soft_maxmin_matmul_backward"
    batch, m, n, _ = _check_operands(op, a, b)
    _check_outputs_like(op, torch.Size((batch, m, n)), a.device, hard=hard, sum=sum_, grad_out=grad_out)
    _check_temperature(op, temperature)
    return _backward(a, b, (hard, sum_), grad_out, temperature, a_grad, b_grad)
