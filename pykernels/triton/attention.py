"""Triton engine of the dense attention ops (``torch.ops.pykernels_triton.attention*``).

Same meaning as ``pykernels.reference.attention``, argument for argument with the schemas in
``csrc/registration.cpp``. FlashAttention-2 tiling: scores live only as [BLOCK_M, BLOCK_N] tiles, the
forward streams key blocks through an online softmax and keeps the log-sum-exp, and every backward
kernel recomputes P = exp(S - lse) from it. Each output element is written by exactly one program (dq
and dbias by query block, dk and dv by key block looping over the query heads of its kv group), so there
are no atomics and results are bitwise reproducible.

Tensors are read through their strides (views, expanded k/v heads and stride-0 biases cost no copy);
stride arguments travel as tuples, and Triton specialises a stride of 1 into a constant, so the usual
contiguous last dimension still gets vectorised loads. Tile offsets are int64. Matrix products use
``tl.dot`` with fp32 accumulation for fp16/bf16 (P and dS are rounded to the input type first, as in
FlashAttention), IEEE fp32 for fp32 (eager PyTorch does not use TF32 for matmuls by default) and fp64
for fp64, which Triton lowers to DMMA or FMA.

Block sizes come from host rules on the head dims and token counts; there is no ``@triton.autotune``,
which the interpreter would run config by config.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import GPU_MAX_HEAD_DIM
from .graph import _acc, _pow2, _split_scale

# tl.dot needs every tile side >= 16 on GPUs.
_MIN_BLOCK = 16
# Wider heads would reuse the 256 row's tiles, which do not fit: at 512, fp16 dq/dk/dv need 200-266 KB of shared
# memory and fp64 229-264 KB (over sm_80's 163 KiB and sm_90's 227 KiB), and smaller tiles or one pipeline stage
# still spill 5-14 KB.
MAX_HEAD_DIM = GPU_MAX_HEAD_DIM


def check_head_dims(op: str, dqk: int, dv: int) -> None:
    """Refuses head dims the kernels cannot launch with on a GPU (also under the interpreter, so the two agree)."""
    if dqk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"{op}: the triton engine supports head dims up to {MAX_HEAD_DIM}, got D = {dqk} and "
                         f"Dv = {dv}; split the heads or use backend='reference'")
# (BLOCK_M, BLOCK_N, num_warps, num_stages) by element size and padded head width. Picked from ptxas's
# register, spill and shared-memory report for sm_90 (compiled offline, never timed): the largest tiles
# without heavy spills that also fit an A100's 163 KB of shared memory. The dk/dv kernel, which keeps
# k, v, dk and dv of BLOCK_N keys in registers, is the tightest. fp32 dots are IEEE (CUDA cores, not TF32)
# and fp64 ones DMMA or FMA; both need far more registers per element than fp16/bf16 tensor-core dots.
# fp16/bf16 at width 64 takes 8 warps: at 4, ptxas (sm_80) put dq at 255 registers and spilled 408 B for a
# head dim of 40 (not a multiple of 16, so no vector loads), dk/dv 40 B and the forward 72 B; at 8, none.
_TILES = {
    2: {64: (64, 32, 8, 2), 128: (64, 32, 8, 2), 256: (64, 32, 8, 2)},
    4: {64: (32, 32, 8, 1), 128: (16, 16, 4, 2), 256: (16, 16, 4, 2)},
    8: {64: (32, 32, 8, 1), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
}


# ------------------------------------------------------------------------------------------- tile helpers


@triton.jit
def _load_tile(base, rows, cols, row_stride, col_stride, num_rows, num_cols):
    offs = rows.to(tl.int64)[:, None] * row_stride + cols.to(tl.int64)[None, :] * col_stride
    return tl.load(base + offs, mask=(rows < num_rows)[:, None] & (cols < num_cols)[None, :], other=0.0)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """x.to(dtype), rounding to nearest even. GPUs round fp32 -> bf16 so; the interpreter truncates, which
    doubles the bf16 error, so there the fp32 bits are rounded first and the truncation becomes exact."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _store_tile(base, value, rows, cols, row_stride, col_stride, num_rows, num_cols, INTERPRETED: tl.constexpr):
    offs = rows.to(tl.int64)[:, None] * row_stride + cols.to(tl.int64)[None, :] * col_stride
    tl.store(base + offs, _cast(value, base.dtype.element_ty, INTERPRETED),
             mask=(rows < num_rows)[:, None] & (cols < num_cols)[None, :])


@triton.jit
def _dot(a, b, ACC: tl.constexpr, PREC: tl.constexpr, INTERPRETED: tl.constexpr):
    # The interpreter multiplies bf16 tiles as their uint16 storage. bf16 -> fp32 is exact and so are the
    # products, so upcasting there computes what a GPU's bf16 x bf16 -> fp32 dot does.
    if INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, out_dtype=ACC, input_precision=PREC)


@triton.jit
def _logits(a, b_t, bias_base, bias_row_stride, bias_col_stride, rows, cols, num_rows, num_cols, scale,
            HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, KEYS_ON_ROWS: tl.constexpr, ACC: tl.constexpr,
            PREC: tl.constexpr, INTERPRETED: tl.constexpr):
    """scale * a @ b_t + bias with -inf wherever a key is hidden (padding, causal). Queries run along the
    rows, or along the columns with KEYS_ON_ROWS (the dk/dv kernels' transposed tile). Every kernel builds
    its scores here, so backward's exp(s - lse) sees exactly the scores the forward normalised."""
    valid = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
    if CAUSAL:
        if KEYS_ON_ROWS:
            valid = valid & (rows[:, None] <= cols[None, :])
        else:
            valid = valid & (cols[None, :] <= rows[:, None])
    s = _dot(a, b_t, ACC, PREC, INTERPRETED) * scale
    if HAS_BIAS:
        offs = rows.to(tl.int64)[:, None] * bias_row_stride + cols.to(tl.int64)[None, :] * bias_col_stride
        s += tl.load(bias_base + offs, mask=valid, other=0.0).to(ACC)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _probs(s, lse):
    # lse = -inf marks a query that sees no key; +inf in its place turns every exp() into 0 without a NaN.
    return tl.exp(s - tl.where(lse == float("-inf"), float("inf"), lse))


@triton.jit
def _causal_end(start_m, Nk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key a query block can see: key blocks from here on are fully masked."""
    if CAUSAL:
        return tl.minimum(Nk, start_m + BLOCK_M)
    return Nk


# ------------------------------------------------------------------------------------------------ forward


@triton.jit
def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr, q_st, k_st, v_st, bias_st, out_st,
                          lse_st, H, G, Nq, Nk, D, DV, scale_hi, scale_lo, HAS_BIAS: tl.constexpr,
                          CAUSAL: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, INTERPRETED: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // G
    start_m = tl.program_id(1) * BLOCK_M
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    m = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(q_ptr + b * q_st[0] + h * q_st[1], m, d, q_st[2], q_st[3], Nq, D)
    k_base = k_ptr + b * k_st[0] + hk * k_st[1]
    v_base = v_ptr + b * v_st[0] + hk * v_st[1]
    bias_base = bias_ptr + b * bias_st[0] + h * bias_st[1]
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    for start_n in range(0, _causal_end(start_m, Nk, CAUSAL, BLOCK_M), BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        k_t = _load_tile(k_base, d, n, k_st[3], k_st[2], D, Nk)
        s = _logits(q, k_t, bias_base, bias_st[2], bias_st[3], m, n, Nq, Nk, scale, HAS_BIAS, CAUSAL, False, ACC,
                    PREC, INTERPRETED)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Until a row meets a finite score its max stays -inf; shifting by 0 keeps exp() from making NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_base, n, dv, v_st[2], v_st[3], Nk, DV)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, INTERPRETED), v, ACC, PREC, INTERPRETED)
        m_i = m_new
    # A row without a finite score gets out 0 and lse -inf; a NaN sum stays NaN, as in the reference.
    dead = l_i == 0
    safe = tl.where(dead, 1.0, l_i)
    out = tl.where(dead[:, None], 0.0, acc / safe[:, None])
    _store_tile(out_ptr + b * out_st[0] + h * out_st[1], out, m, dv, out_st[2], out_st[3], Nq, DV,
                INTERPRETED)
    lse = tl.where(dead, float("-inf"), m_i + tl.log(safe))
    tl.store(lse_ptr + b * lse_st[0] + h * lse_st[1] + m.to(tl.int64) * lse_st[2], lse, mask=m < Nq)


# ------------------------------------------------------------------------------------------------ backward


@triton.jit
def _row_dot_kernel(out_ptr, do_ptr, delta_ptr, out_st, do_st, H, Nq, DV, ACC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O), the softmax backward's per-query term, once instead of per key block."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    delta = tl.zeros([BLOCK_M], dtype=ACC)
    for d0 in range(0, DV, BLOCK_DV):
        dv = d0 + tl.arange(0, BLOCK_DV)
        o = _load_tile(out_ptr + b * out_st[0] + h * out_st[1], m, dv, out_st[2], out_st[3], Nq, DV).to(ACC)
        do = _load_tile(do_ptr + b * do_st[0] + h * do_st[1], m, dv, do_st[2], do_st[3], Nq, DV).to(ACC)
        delta += tl.sum(o * do, axis=1)
    tl.store(delta_ptr + bh * Nq + m, delta, mask=m < Nq)


@triton.jit
def _map_row_dot_kernel(q_ptr, k_ptr, bias_ptr, lse_ptr, g_ptr, r_ptr, q_st, k_st, bias_st, lse_st, g_st, H, G,
                        Nq, Nk, D, scale_hi, scale_lo, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                        ACC: tl.constexpr, PREC: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """r = rowsum(P * G) per (b, h, query): the map backward's delta, which needs a pass over all keys."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // G
    start_m = tl.program_id(1) * BLOCK_M
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    m = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * q_st[0] + h * q_st[1], m, d, q_st[2], q_st[3], Nq, D)
    lse = tl.load(lse_ptr + b * lse_st[0] + h * lse_st[1] + m.to(tl.int64) * lse_st[2], mask=m < Nq,
                  other=0.0).to(ACC)
    k_base = k_ptr + b * k_st[0] + hk * k_st[1]
    bias_base = bias_ptr + b * bias_st[0] + h * bias_st[1]
    r = tl.zeros([BLOCK_M], dtype=ACC)
    for start_n in range(0, _causal_end(start_m, Nk, CAUSAL, BLOCK_M), BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        k_t = _load_tile(k_base, d, n, k_st[3], k_st[2], D, Nk)
        s = _logits(q, k_t, bias_base, bias_st[2], bias_st[3], m, n, Nq, Nk, scale, HAS_BIAS, CAUSAL, False, ACC,
                    PREC, INTERPRETED)
        g = _load_tile(g_ptr + b * g_st[0], m, n, g_st[1], g_st[2], Nq, Nk).to(ACC)
        r += tl.sum(_probs(s, lse[:, None]) * g, axis=1)
    tl.store(r_ptr + bh * Nq + m, r, mask=m < Nq)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, lse_ptr, rd_ptr, dq_ptr, dbias_ptr, q_st, k_st, v_st,
               bias_st, do_st, lse_st, dq_st, dbias_st, H, G, Nq, Nk, D, DV, scale_hi, scale_lo,
               HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, CAUSAL: tl.constexpr, MAP: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dq (and dbias = dS) for one query block of one head. Attention: dS = P * (dO V^T - delta), with do_ptr
    dO [B, H, Nq, Dv]. MAP: dS = P * (G - r) / H, with do_ptr the map gradient G [B, Nq, Nk] and v unused.
    rd_ptr holds delta or r, [B * H, Nq]."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // G
    start_m = tl.program_id(1) * BLOCK_M
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    m = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(q_ptr + b * q_st[0] + h * q_st[1], m, d, q_st[2], q_st[3], Nq, D)
    lse = tl.load(lse_ptr + b * lse_st[0] + h * lse_st[1] + m.to(tl.int64) * lse_st[2], mask=m < Nq,
                  other=0.0).to(ACC)
    rd = tl.load(rd_ptr + bh * Nq + m, mask=m < Nq, other=0.0)
    if MAP:
        g_base = do_ptr + b * do_st[0]
    else:
        do = _load_tile(do_ptr + b * do_st[0] + h * do_st[1], m, dv, do_st[2], do_st[3], Nq, DV)
    k_base = k_ptr + b * k_st[0] + hk * k_st[1]
    v_base = v_ptr + b * v_st[0] + hk * v_st[1]
    bias_base = bias_ptr + b * bias_st[0] + h * bias_st[1]
    dbias_base = dbias_ptr + b * dbias_st[0] + h * dbias_st[1]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    end = _causal_end(start_m, Nk, CAUSAL, BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        k_t = _load_tile(k_base, d, n, k_st[3], k_st[2], D, Nk)
        s = _logits(q, k_t, bias_base, bias_st[2], bias_st[3], m, n, Nq, Nk, scale, HAS_BIAS, CAUSAL, False, ACC,
                    PREC, INTERPRETED)
        p = _probs(s, lse[:, None])
        if MAP:
            g = _load_tile(g_base, m, n, do_st[1], do_st[2], Nq, Nk).to(ACC)
            ds = p * (g - rd[:, None]) / H
        else:
            v_t = _load_tile(v_base, dv, n, v_st[3], v_st[2], DV, Nk)
            ds = p * (_dot(do, v_t, ACC, PREC, INTERPRETED) - rd[:, None])
        if BIAS_GRAD:
            _store_tile(dbias_base, ds, m, n, dbias_st[2], dbias_st[3], Nq, Nk, INTERPRETED)
        dq += _dot(_cast(ds, k_t.dtype, INTERPRETED), tl.trans(k_t), ACC, PREC, INTERPRETED)
    if BIAS_GRAD:
        # Keys past the causal end get no score, hence a zero bias gradient.
        for start_n in range(tl.cdiv(end, BLOCK_N) * BLOCK_N, Nk, BLOCK_N):
            n = start_n + tl.arange(0, BLOCK_N)
            _store_tile(dbias_base, tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC), m, n, dbias_st[2], dbias_st[3], Nq,
                        Nk, INTERPRETED)
    _store_tile(dq_ptr + b * dq_st[0] + h * dq_st[1], dq * scale, m, d, dq_st[2], dq_st[3], Nq, D,
                INTERPRETED)


@triton.jit
def _dkv_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, lse_ptr, rd_ptr, dk_ptr, dv_ptr, q_st, k_st, v_st, bias_st,
                do_st, lse_st, dk_st, dv_st, H, G, Nq, Nk, D, DV, scale_hi, scale_lo, HAS_BIAS: tl.constexpr,
                CAUSAL: tl.constexpr, MAP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    """dk (and, for attention, dv) for one key block of one kv head, summed over the G query heads that
    share it; the tiles are transposed (keys x queries). Arguments as _dq_kernel; MAP writes no dv."""
    bhk = tl.program_id(0).to(tl.int64)
    Hkv = H // G
    b, hk = bhk // Hkv, bhk % Hkv
    start_n = tl.program_id(1) * BLOCK_N
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    n = start_n + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(k_ptr + b * k_st[0] + hk * k_st[1], n, d, k_st[2], k_st[3], Nk, D)
    if not MAP:
        v = _load_tile(v_ptr + b * v_st[0] + hk * v_st[1], n, dv, v_st[2], v_st[3], Nk, DV)
        dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    # Causal: query blocks that end before this key block see none of it.
    first_m = 0
    if CAUSAL:
        first_m = (start_n // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        h = hk * G + g
        q_base = q_ptr + b * q_st[0] + h * q_st[1]
        bias_base = bias_ptr + b * bias_st[0] + h * bias_st[1]
        for start_m in range(first_m, Nq, BLOCK_M):
            m = start_m + tl.arange(0, BLOCK_M)
            q_t = _load_tile(q_base, d, m, q_st[3], q_st[2], D, Nq)
            s_t = _logits(k, q_t, bias_base, bias_st[3], bias_st[2], n, m, Nk, Nq, scale, HAS_BIAS, CAUSAL, True,
                          ACC, PREC, INTERPRETED)
            lse = tl.load(lse_ptr + b * lse_st[0] + h * lse_st[1] + m.to(tl.int64) * lse_st[2], mask=m < Nq,
                          other=0.0).to(ACC)
            p_t = _probs(s_t, lse[None, :])
            rd = tl.load(rd_ptr + (b * H + h) * Nq + m, mask=m < Nq, other=0.0)
            if MAP:
                g_t = _load_tile(do_ptr + b * do_st[0], n, m, do_st[2], do_st[1], Nk, Nq).to(ACC)
                ds_t = p_t * (g_t - rd[None, :]) / H
            else:
                do = _load_tile(do_ptr + b * do_st[0] + h * do_st[1], m, dv, do_st[2], do_st[3], Nq, DV)
                dv_acc += _dot(_cast(p_t, do.dtype, INTERPRETED), do, ACC, PREC, INTERPRETED)
                ds_t = p_t * (_dot(v, tl.trans(do), ACC, PREC, INTERPRETED) - rd[None, :])
            dk += _dot(_cast(ds_t, q_t.dtype, INTERPRETED), tl.trans(q_t), ACC, PREC, INTERPRETED)
    _store_tile(dk_ptr + b * dk_st[0] + hk * dk_st[1], dk * scale, n, d, dk_st[2], dk_st[3], Nk, D,
                INTERPRETED)
    if not MAP:
        _store_tile(dv_ptr + b * dv_st[0] + hk * dv_st[1], dv_acc, n, dv, dv_st[2], dv_st[3], Nk, DV,
                    INTERPRETED)


# ---------------------------------------------------------------------------------------------------- map


@triton.jit
def _map_kernel(q_ptr, k_ptr, bias_ptr, lse_ptr, map_ptr, q_st, k_st, bias_st, lse_st, map_st, H, G, Nq, Nk, D,
                scale_hi, scale_lo, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, ACC: tl.constexpr,
                PREC: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of the map, summed over the heads in registers: the per-head
    probabilities [B, H, Nq, Nk] never reach memory."""
    num_n = tl.cdiv(Nk, BLOCK_N)
    start_m = (tl.program_id(0) // num_n) * BLOCK_M
    start_n = (tl.program_id(0) % num_n) * BLOCK_N
    b = tl.program_id(1).to(tl.int64)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    m = start_m + tl.arange(0, BLOCK_M)
    n = start_n + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    heads = H
    if CAUSAL:
        # A tile wholly above the diagonal is zero: skip the heads, still write the zeros.
        heads = tl.where(start_n < start_m + BLOCK_M, H, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for h32 in range(0, heads):
        h = tl.cast(h32, tl.int64)
        hk = h // G
        q = _load_tile(q_ptr + b * q_st[0] + h * q_st[1], m, d, q_st[2], q_st[3], Nq, D)
        k_t = _load_tile(k_ptr + b * k_st[0] + hk * k_st[1], d, n, k_st[3], k_st[2], D, Nk)
        s = _logits(q, k_t, bias_ptr + b * bias_st[0] + h * bias_st[1], bias_st[2], bias_st[3], m, n, Nq, Nk,
                    scale, HAS_BIAS, CAUSAL, False, ACC, PREC, INTERPRETED)
        lse = tl.load(lse_ptr + b * lse_st[0] + h * lse_st[1] + m.to(tl.int64) * lse_st[2], mask=m < Nq,
                      other=0.0).to(ACC)
        acc += _probs(s, lse[:, None])
    _store_tile(map_ptr + b * map_st[0], acc / H, m, n, map_st[1], map_st[2], Nq, Nk, INTERPRETED)


# --------------------------------------------------------------------------------------------------- host


def _check(op, q, k, v=None, bias=None, lse=None):
    """Shape agreement the kernels rely on to stay in bounds; the Python API checks first, more kindly."""
    name = f"pykernels.{op}"
    for label, t in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        if t is not None and t.dim() != 4:
            raise ValueError(f"{name}: {label} must be 4-D, got shape {list(t.shape)}")
    b, h, nq, dqk = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != dqk or (hkv == 0 and h != 0) or (hkv and h % hkv):
        raise ValueError(f"{name}: k {list(k.shape)} does not fit q {list(q.shape)}")
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{name}: v {list(v.shape)} does not fit k {list(k.shape)}")
    if bias is not None and bias.shape != (b, h, nq, nk):
        raise ValueError(f"{name}: bias must be [B, H, Nq, Nk] = {[b, h, nq, nk]}, got {list(bias.shape)}")
    if lse is not None and lse.shape != (b, h, nq):
        raise ValueError(f"{name}: lse must be [B, H, Nq] = {[b, h, nq]}, got {list(lse.shape)}")
    check_head_dims(name, dqk, v.shape[3] if v is not None else dqk)


def _meta(q, dv, nq, nk):
    """Kernel parameters from the head dims, the dtype and the token counts (tiles shrink to fit tiny ones)."""
    block_d, block_dv = max(_MIN_BLOCK, _pow2(q.shape[-1])), max(_MIN_BLOCK, _pow2(dv))
    width = min(max(block_d, block_dv, 64), 256)
    block_m, block_n, warps, stages = _TILES[q.element_size()][width]
    return dict(ACC=_acc(q.dtype), PREC="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
                INTERPRETED=q.device.type == "cpu", BLOCK_M=min(block_m, max(_MIN_BLOCK, _pow2(nq))),
                BLOCK_N=min(block_n, max(_MIN_BLOCK, _pow2(nk))), BLOCK_D=block_d, BLOCK_DV=block_dv,
                num_warps=warps, num_stages=stages)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias_args(bias, q):
    """(pointer, strides); without a bias q stands in for the pointer HAS_BIAS never reads."""
    return (bias, bias.stride()) if bias is not None else (q, (0, 0, 0, 0))


def attention(q, k, v, bias, causal, scale):
    _check("attention", q, k, v, bias)
    b, h, nq, dqk = q.shape
    hkv, nk, dv = v.shape[1], v.shape[2], v.shape[3]
    out = q.new_empty((b, h, nq, dv))
    lse = torch.empty((b, h, nq), dtype=_lse_dtype(q.dtype), device=q.device)
    if b * h * nq == 0:
        return out, lse
    if nk == 0:  # no query sees a key
        return out.zero_(), lse.fill_(float("-inf"))
    meta = _meta(q, dv, nq, nk)
    bias_t, bias_st = _bias_args(bias, q)
    _attention_fwd_kernel[(b * h, triton.cdiv(nq, meta["BLOCK_M"]))](
        q, k, v, bias_t, out, lse, q.stride(), k.stride(), v.stride(), bias_st, out.stride(), lse.stride(), h,
        h // hkv, nq, nk, dqk, dv, *_split_scale(scale), HAS_BIAS=bias is not None, CAUSAL=bool(causal), **meta)
    return out, lse


def _grad_bias(bias_grad, bias, q, nk):
    if not bias_grad:
        return q.new_empty(0)
    dtype = bias.dtype if bias is not None else q.dtype
    return torch.empty((*q.shape[:3], nk), dtype=dtype, device=q.device)


def attention_backward(q, k, v, bias, out, lse, grad_out, causal, scale, bias_grad):
    _check("attention_backward", q, k, v, bias, lse)
    if out.shape != (*q.shape[:3], v.shape[3]) or grad_out.shape != out.shape:
        raise ValueError(f"pykernels.attention_backward: out and grad_out must be [B, H, Nq, Dv], got "
                         f"{list(out.shape)} and {list(grad_out.shape)}")
    b, h, nq, dqk = q.shape
    hkv, nk, dv = v.shape[1], v.shape[2], v.shape[3]
    dbias = _grad_bias(bias_grad, bias, q, nk)
    if b * h * nq == 0 or nk == 0:  # no score exists, so every gradient is zero
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias.zero_()
    # empty_like, as in the C++ engines and the fake kernels: the gradients keep the inputs' memory layout.
    dq, dk, dvt = (torch.empty_like(t) for t in (q, k, v))
    meta = _meta(q, dv, nq, nk)
    delta = torch.empty((b * h, nq), dtype=_lse_dtype(q.dtype), device=q.device)
    _row_dot_kernel[(b * h, triton.cdiv(nq, meta["BLOCK_M"]))](
        out, grad_out, delta, out.stride(), grad_out.stride(), h, nq, dv, ACC=meta["ACC"], BLOCK_M=meta["BLOCK_M"],
        BLOCK_DV=meta["BLOCK_DV"], num_warps=meta["num_warps"])
    bias_t, bias_st = _bias_args(bias, q)
    common = (h, h // hkv, nq, nk, dqk, dv, *_split_scale(scale))
    flags = dict(HAS_BIAS=bias is not None, CAUSAL=bool(causal), MAP=False, **meta)
    _dq_kernel[(b * h, triton.cdiv(nq, meta["BLOCK_M"]))](
        q, k, v, bias_t, grad_out, lse, delta, dq, dbias if bias_grad else dq, q.stride(), k.stride(), v.stride(),
        bias_st, grad_out.stride(), lse.stride(), dq.stride(), dbias.stride() if bias_grad else (0, 0, 0, 0),
        *common, BIAS_GRAD=bool(bias_grad), **flags)
    _dkv_kernel[(b * hkv, triton.cdiv(nk, meta["BLOCK_N"]))](
        q, k, v, bias_t, grad_out, lse, delta, dk, dvt, q.stride(), k.stride(), v.stride(), bias_st,
        grad_out.stride(), lse.stride(), dk.stride(), dvt.stride(), *common, **flags)
    return dq, dk, dvt, dbias


def attention_map(q, k, bias, lse, causal, scale):
    _check("attention_map", q, k, None, bias, lse)
    b, h, nq, dqk = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if h == 0:  # the mean over no heads, as torch.mean gives it
        return q.new_full((b, nq, nk), float("nan"))
    out = q.new_empty((b, nq, nk))
    if out.numel() == 0:
        return out
    meta = _meta(q, dqk, nq, nk)
    meta.pop("BLOCK_DV")
    bias_t, bias_st = _bias_args(bias, q)
    grid = (triton.cdiv(nq, meta["BLOCK_M"]) * triton.cdiv(nk, meta["BLOCK_N"]), b)
    _map_kernel[grid](q, k, bias_t, lse, out, q.stride(), k.stride(), bias_st, lse.stride(), out.stride(), h,
                      h // hkv, nq, nk, dqk, *_split_scale(scale), HAS_BIAS=bias is not None, CAUSAL=bool(causal),
                      **meta)
    return out


def attention_map_backward(q, k, bias, lse, grad_map, causal, scale, bias_grad):
    _check("attention_map_backward", q, k, None, bias, lse)
    b, h, nq, dqk = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if grad_map.shape != (b, nq, nk):
        raise ValueError(f"pykernels.attention_map_backward: grad_map must be [B, Nq, Nk] = {[b, nq, nk]}, got "
                         f"{list(grad_map.shape)}")
    dbias = _grad_bias(bias_grad, bias, q, nk)
    if b * h * nq == 0 or nk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), dbias.zero_()
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    meta = _meta(q, dqk, nq, nk)
    bias_t, bias_st = _bias_args(bias, q)
    scale_hi, scale_lo = _split_scale(scale)
    flags = dict(HAS_BIAS=bias is not None, CAUSAL=bool(causal), **meta)
    r = torch.empty((b * h, nq), dtype=_lse_dtype(q.dtype), device=q.device)
    rows = (b * h, triton.cdiv(nq, meta["BLOCK_M"]))
    _map_row_dot_kernel[rows](q, k, bias_t, lse, grad_map, r, q.stride(), k.stride(), bias_st, lse.stride(),
                              grad_map.stride(), h, h // hkv, nq, nk, dqk, scale_hi, scale_lo,
                              **{key: val for key, val in flags.items() if key != "BLOCK_DV"})
    # k stands in for v and dk for dv: MAP never touches either. The map gradient rides in dO's slot.
    common = (h, h // hkv, nq, nk, dqk, dqk, scale_hi, scale_lo)
    _dq_kernel[rows](q, k, k, bias_t, grad_map, lse, r, dq, dbias if bias_grad else dq, q.stride(), k.stride(),
                     k.stride(), bias_st, grad_map.stride(), lse.stride(), dq.stride(),
                     dbias.stride() if bias_grad else (0, 0, 0, 0), *common, BIAS_GRAD=bool(bias_grad), MAP=True,
                     **flags)
    _dkv_kernel[(b * hkv, triton.cdiv(nk, meta["BLOCK_N"]))](
        q, k, k, bias_t, grad_map, lse, r, dk, dk, q.stride(), k.stride(), k.stride(), bias_st, grad_map.stride(),
        lse.stride(), dk.stride(), dk.stride(), *common, MAP=True, **flags)
    return dq, dk, dbias


def attention_with_map(q, k, v, bias, causal, scale):
    """The output and the map by the two kernels in turn: this engine has no kernel that shares their work."""
    out, lse = attention(q, k, v, bias, causal, scale)
    return out, lse, attention_map(q, k, bias, lse, causal, scale)


def attention_with_map_backward(q, k, v, bias, out, lse, grad_out, grad_map, causal, scale, bias_grad):
    dq, dk, dv, dbias = attention_backward(q, k, v, bias, out, lse, grad_out, causal, scale, bias_grad)
    map_dq, map_dk, map_dbias = attention_map_backward(q, k, bias, lse, grad_map, causal, scale, bias_grad)
    dq.add_(map_dq)
    dk.add_(map_dk)
    if bias_grad:
        dbias.add_(map_dbias)
    return dq, dk, dv, dbias
