"""Triton engine of shifted-window attention (``torch.ops.pykernels_triton.window_attention*``).

Same meaning as ``pykernels.reference.window``, argument for argument with the schemas in
``csrc/registration.cpp``. The grid is never rolled, padded or partitioned: a program finds the tokens of
its window positions with the index math of ``csrc/window/window.h`` (mirrored by the ``@triton.jit``
helpers below) and gathers their rows straight from q, k, v through their strides. A pad position reads
``pad_kv`` (or zeros) as its key and value; its query row is computed and never stored, as in timm.

Forward: one program per (window, query block, batch x head), FlashAttention-2 online softmax over the
window's key blocks, scores ``scale q k^T + bias + shift mask`` built in one helper that every kernel
shares, so the backward's ``exp(s - lse)`` sees the forward's scores.

Backward, atomic-free (every token sits at exactly one window position, so each gradient row has one
writer): a dq pass over (window, query block) and a dk/dv pass over (window, key block). A window that fits
one tile (Swin's 7 x 7 and 8 x 8 in half precision) is done by the dq pass alone, dk and dv coming from the
same P and dS. The bias gradient sums dS over batch and windows: a third kernel owns one dense [query block,
key block] tile per (group of windows, head) and sums its group in a fixed order; the groups are a function
of the shapes only, their partials are summed by ``torch.sum`` (no atomics), and Swin's table gradient is
folded from that dense sum by relative offset. Results are bitwise reproducible run to run.

Block sizes follow the dense engine's table (``attention._meta``); there is no ``@triton.autotune``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _MIN_BLOCK, _cast, _dot, _lse_dtype, _meta, _probs, _row_dot_kernel, check_head_dims
from .graph import _pow2, _split_scale

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Swin's region mask value (window.h's kShiftMaskValue): -100, not -inf.
_SHIFT_MASK_VALUE = tl.constexpr(-100.0)
# The bias-gradient kernel: programs it aims for when grouping windows, and the most fp32 partial elements.
_TARGET_PROGRAMS = 1024
_MAX_PARTIAL = 1 << 24
_FOLD_BLOCK = 64

# --------------------------------------------------------------------------------- index math (window.h)
# geo = (height, width, win_h, win_w, shift_h, shift_w, windows_w, padded_h, padded_w)


@triton.jit
def _cell(geo, w, pos):
    """window_cell: the cell (y', x') of the shifted, padded grid at position pos of window w."""
    y = w // geo[6] * geo[2] + pos // geo[3]
    x = w % geo[6] * geo[3] + pos % geo[3]
    return y, x


@triton.jit
def _token_at(geo, w, pos, n):
    """token_at, with -1 for pad cells and for positions past the window's n (tile padding)."""
    y, x = _cell(geo, w, pos)
    token = (y + geo[4]) % geo[0] * geo[1] + (x + geo[5]) % geo[1]
    return tl.where((y < geo[0]) & (x < geo[1]) & (pos < n), token, -1)


@triton.jit
def _axis_region(c, padded, win, shift):
    r = tl.where(c < padded - win, 0, tl.where(c < padded - shift, 1, 2))
    return tl.where(shift == 0, 0, r)


@triton.jit
def _region(geo, w, pos):
    y, x = _cell(geo, w, pos)
    return _axis_region(y, geo[7], geo[2], geo[4]) * 3 + _axis_region(x, geo[8], geo[3], geo[5])


@triton.jit
def _rel_offset(geo, pos):
    return pos // geo[3] * (2 * geo[3] - 1) + pos % geo[3]


# ------------------------------------------------------------------------------------------ tile helpers


@triton.jit
def _gather(base, token, cols, token_stride, col_stride, num_cols, pad_base, pad_stride, HAS_PAD: tl.constexpr,
            TOKENS_ON_ROWS: tl.constexpr):
    """Rows of the tokens (a [tokens, cols] tile, or its transpose): pad cells read pad_base's row, or zeros."""
    if TOKENS_ON_ROWS:
        t = token[:, None]
        c = cols[None, :]
    else:
        t = token[None, :]
        c = cols[:, None]
    real = t >= 0
    x = tl.load(base + t.to(tl.int64) * token_stride + c.to(tl.int64) * col_stride, mask=real & (c < num_cols),
                other=0.0)
    if HAS_PAD:
        x = tl.where(real, x, tl.load(pad_base + c.to(tl.int64) * pad_stride, mask=c < num_cols, other=0.0))
    return x


@triton.jit
def _scatter(base, value, token, cols, token_stride, col_stride, num_cols, INTERPRETED: tl.constexpr):
    """Stores a [tokens, cols] tile to the rows of its real tokens."""
    offs = token.to(tl.int64)[:, None] * token_stride + cols.to(tl.int64)[None, :] * col_stride
    tl.store(base + offs, _cast(value, base.dtype.element_ty, INTERPRETED),
             mask=(token >= 0)[:, None] & (cols < num_cols)[None, :])


@triton.jit
def _scores(a, b_t, rows, cols, w, h, n, geo, bias_ptr, bias_st, scale, BIAS: tl.constexpr,
            SHIFT_MASK: tl.constexpr, KEYS_ON_ROWS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
            INTERPRETED: tl.constexpr):
    """scale * a @ b_t + bias (BIAS 1: Swin's table by relative offset, 2: dense [heads, n, n]) + the -100
    region mask, -inf past the window's n positions. Window positions of the queries run along the rows,
    or along the columns with KEYS_ON_ROWS (the dk/dv kernel's transposed tile)."""
    if KEYS_ON_ROWS:
        i = cols[None, :]
        j = rows[:, None]
    else:
        i = rows[:, None]
        j = cols[None, :]
    valid = (rows < n)[:, None] & (cols < n)[None, :]
    s = _dot(a, b_t, ACC, PREC, INTERPRETED) * scale
    if BIAS == 1:
        center = (geo[2] - 1) * (2 * geo[3] - 1) + geo[3] - 1
        row = center + _rel_offset(geo, i) - _rel_offset(geo, j)
        s += tl.load(bias_ptr + row.to(tl.int64) * bias_st[0] + h * bias_st[1], mask=valid, other=0.0).to(ACC)
    if BIAS == 2:
        offs = h * bias_st[0] + i.to(tl.int64) * bias_st[1] + j.to(tl.int64) * bias_st[2]
        s += tl.load(bias_ptr + offs, mask=valid, other=0.0).to(ACC)
    if SHIFT_MASK:
        s += tl.where(_region(geo, w, i) != _region(geo, w, j), _SHIFT_MASK_VALUE, 0.0).to(ACC)
    return tl.where(valid, s, float("-inf"))


# ------------------------------------------------------------------------------------------------ forward


@triton.jit
def _window_fwd_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, pad_ptr, out_ptr, lse_ptr, q_st, k_st, v_st, bias_st,
                       pad_st, out_st, lse_st, geo, H, n, q_blocks, D, DV, scale_hi, scale_lo, BIAS: tl.constexpr,
                       HAS_PAD: tl.constexpr, SHIFT_MASK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    w = tl.program_id(0) // q_blocks
    m = tl.program_id(0) % q_blocks * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    tok_m = _token_at(geo, w, m, n)
    q = _gather(q_ptr + b * q_st[0] + h * q_st[1], tok_m, d, q_st[2], q_st[3], D, q_ptr, 0, False, True)
    k_base = k_ptr + b * k_st[0] + h * k_st[1]
    v_base = v_ptr + b * v_st[0] + h * v_st[1]
    pad_k = pad_ptr + h * pad_st[1]
    pad_v = pad_ptr + pad_st[0] + h * pad_st[1]
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    for start_n in range(0, n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        tok_n = _token_at(geo, w, cols, n)
        k_t = _gather(k_base, tok_n, d, k_st[2], k_st[3], D, pad_k, pad_st[2], HAS_PAD, False)
        s = _scores(q, k_t, m, cols, w, h, n, geo, bias_ptr, bias_st, scale, BIAS, SHIFT_MASK, False, ACC, PREC,
                    INTERPRETED)
        # Every row sees its own (finite) score in its first key block, except rows past n, which stay -inf:
        # shifting those by 0 keeps exp() from making NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _gather(v_base, tok_n, dv, v_st[2], v_st[3], DV, pad_v, pad_st[2], HAS_PAD, True)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, INTERPRETED), v, ACC, PREC, INTERPRETED)
        m_i = m_new
    safe = tl.where(l_i == 0, 1.0, l_i)
    _scatter(out_ptr + b * out_st[0] + h * out_st[1], acc / safe[:, None], tok_m, dv, out_st[2], out_st[3], DV,
             INTERPRETED)
    tl.store(lse_ptr + b * lse_st[0] + h * lse_st[1] + tok_m.to(tl.int64) * lse_st[2], m_i + tl.log(safe),
             mask=tok_m >= 0)


# ------------------------------------------------------------------------------------------------ backward


@triton.jit
def _query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, q_st, do_st, lse_st, b, h, bh, tok, d, dv, N, D, DV,
                Q_ON_ROWS: tl.constexpr, ACC: tl.constexpr):
    """q (as [positions, D] or transposed), dO [positions, DV], lse and delta of window positions. Pad cells
    and tile padding get q = dO = 0 and lse = -inf, so their P and dS are 0."""
    q = _gather(q_ptr + b * q_st[0] + h * q_st[1], tok, d, q_st[2], q_st[3], D, q_ptr, 0, False, Q_ON_ROWS)
    do = _gather(do_ptr + b * do_st[0] + h * do_st[1], tok, dv, do_st[2], do_st[3], DV, do_ptr, 0, False, True)
    real = tok >= 0
    lse = tl.load(lse_ptr + b * lse_st[0] + h * lse_st[1] + tok.to(tl.int64) * lse_st[2], mask=real,
                  other=float("-inf")).to(ACC)
    delta = tl.load(delta_ptr + bh * N + tok, mask=real, other=0.0)
    return q, do, lse, delta


@triton.jit
def _window_dq_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, pad_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
                      q_st, k_st, v_st, bias_st, pad_st, do_st, lse_st, dq_st, dk_st, dv_st, geo, H, N, n, q_blocks,
                      D, DV, scale_hi, scale_lo, BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
                      SHIFT_MASK: tl.constexpr, FUSED: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                      INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dq for one query block of one window; FUSED (the window is one tile): dk and dv too."""
    w = tl.program_id(0) // q_blocks
    m = tl.program_id(0) % q_blocks * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    tok_m = _token_at(geo, w, m, n)
    q, do, lse, delta = _query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, q_st, do_st, lse_st, b, h, bh, tok_m, d, dv,
                                    N, D, DV, True, ACC)
    k_base = k_ptr + b * k_st[0] + h * k_st[1]
    v_base = v_ptr + b * v_st[0] + h * v_st[1]
    pad_k = pad_ptr + h * pad_st[1]
    pad_v = pad_ptr + pad_st[0] + h * pad_st[1]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        tok_n = _token_at(geo, w, cols, n)
        k_t = _gather(k_base, tok_n, d, k_st[2], k_st[3], D, pad_k, pad_st[2], HAS_PAD, False)
        v_t = _gather(v_base, tok_n, dv, v_st[2], v_st[3], DV, pad_v, pad_st[2], HAS_PAD, False)
        s = _scores(q, k_t, m, cols, w, h, n, geo, bias_ptr, bias_st, scale, BIAS, SHIFT_MASK, False, ACC, PREC,
                    INTERPRETED)
        p = _probs(s, lse[:, None])
        ds = p * (_dot(do, v_t, ACC, PREC, INTERPRETED) - delta[:, None])
        dq += _dot(_cast(ds, k_t.dtype, INTERPRETED), tl.trans(k_t), ACC, PREC, INTERPRETED)
        if FUSED:
            dv_tile = _dot(tl.trans(_cast(p, do.dtype, INTERPRETED)), do, ACC, PREC, INTERPRETED)
            dk_tile = _dot(tl.trans(_cast(ds, q.dtype, INTERPRETED)), q, ACC, PREC, INTERPRETED)
            _scatter(dk_ptr + b * dk_st[0] + h * dk_st[1], dk_tile * scale, tok_n, d, dk_st[2], dk_st[3], D,
                     INTERPRETED)
            _scatter(dv_ptr + b * dv_st[0] + h * dv_st[1], dv_tile, tok_n, dv, dv_st[2], dv_st[3], DV, INTERPRETED)
    _scatter(dq_ptr + b * dq_st[0] + h * dq_st[1], dq * scale, tok_m, d, dq_st[2], dq_st[3], D, INTERPRETED)


@triton.jit
def _window_dkv_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, pad_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, q_st,
                       k_st, v_st, bias_st, pad_st, do_st, lse_st, dk_st, dv_st, geo, H, N, n, k_blocks, D, DV,
                       scale_hi, scale_lo, BIAS: tl.constexpr, HAS_PAD: tl.constexpr, SHIFT_MASK: tl.constexpr,
                       ACC: tl.constexpr, PREC: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk and dv for one key block of one window, over the window's query blocks (keys x queries tiles)."""
    w = tl.program_id(0) // k_blocks
    cols = tl.program_id(0) % k_blocks * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    tok_n = _token_at(geo, w, cols, n)
    k = _gather(k_ptr + b * k_st[0] + h * k_st[1], tok_n, d, k_st[2], k_st[3], D, pad_ptr + h * pad_st[1],
                pad_st[2], HAS_PAD, True)
    v = _gather(v_ptr + b * v_st[0] + h * v_st[1], tok_n, dv, v_st[2], v_st[3], DV,
                pad_ptr + pad_st[0] + h * pad_st[1], pad_st[2], HAS_PAD, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    for start_m in range(0, n, BLOCK_M):
        m = start_m + tl.arange(0, BLOCK_M)
        tok_m = _token_at(geo, w, m, n)
        q_t, do, lse, delta = _query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, q_st, do_st, lse_st, b, h, bh, tok_m,
                                          d, dv, N, D, DV, False, ACC)
        s_t = _scores(k, q_t, cols, m, w, h, n, geo, bias_ptr, bias_st, scale, BIAS, SHIFT_MASK, True, ACC, PREC,
                      INTERPRETED)
        p_t = _probs(s_t, lse[None, :])
        dv_acc += _dot(_cast(p_t, do.dtype, INTERPRETED), do, ACC, PREC, INTERPRETED)
        ds_t = p_t * (_dot(v, tl.trans(do), ACC, PREC, INTERPRETED) - delta[None, :])
        dk += _dot(_cast(ds_t, q_t.dtype, INTERPRETED), tl.trans(q_t), ACC, PREC, INTERPRETED)
    _scatter(dk_ptr + b * dk_st[0] + h * dk_st[1], dk * scale, tok_n, d, dk_st[2], dk_st[3], D, INTERPRETED)
    _scatter(dv_ptr + b * dv_st[0] + h * dv_st[1], dv_acc, tok_n, dv, dv_st[2], dv_st[3], DV, INTERPRETED)


@triton.jit
def _window_dbias_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, pad_ptr, do_ptr, lse_ptr, delta_ptr, partial_ptr, q_st,
                         k_st, v_st, bias_st, pad_st, do_st, lse_st, geo, H, N, n, windows, items, groups, k_blocks,
                         D, DV, scale_hi, scale_lo, BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
                         SHIFT_MASK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                         INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """partial[g, h] tile = dS of one [query block, key block] summed over group g's (batch, window) items,
    in item order."""
    m = tl.program_id(0) // k_blocks * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) % k_blocks * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for item in range(g * items // groups, (g + 1) * items // groups):
        b = (item // windows).to(tl.int64)
        w = item % windows
        bh = b * H + h
        tok_m = _token_at(geo, w, m, n)
        tok_n = _token_at(geo, w, cols, n)
        q, do, lse, delta = _query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, q_st, do_st, lse_st, b, h, bh, tok_m,
                                        d, dv, N, D, DV, True, ACC)
        k_t = _gather(k_ptr + b * k_st[0] + h * k_st[1], tok_n, d, k_st[2], k_st[3], D, pad_ptr + h * pad_st[1],
                      pad_st[2], HAS_PAD, False)
        v_t = _gather(v_ptr + b * v_st[0] + h * v_st[1], tok_n, dv, v_st[2], v_st[3], DV,
                      pad_ptr + pad_st[0] + h * pad_st[1], pad_st[2], HAS_PAD, False)
        s = _scores(q, k_t, m, cols, w, h, n, geo, bias_ptr, bias_st, scale, BIAS, SHIFT_MASK, False, ACC, PREC,
                    INTERPRETED)
        p = _probs(s, lse[:, None])
        acc += p * (_dot(do, v_t, ACC, PREC, INTERPRETED) - delta[:, None])
    offs = ((g * H + h) * n + m.to(tl.int64)[:, None]) * n + cols[None, :]
    tl.store(partial_ptr + offs, acc, mask=(m < n)[:, None] & (cols < n)[None, :])


@triton.jit
def _fold_table_kernel(dense_ptr, table_ptr, table_st, H, geo, n, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """table[r, h] = sum of dense[h, i, j] over the pairs whose relative offset is row r (rel_index), i in
    increasing order: the gather of the forward, reversed without atomics."""
    h = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    wh, ww = geo[2], geo[3]
    rows = (2 * wh - 1) * (2 * ww - 1)
    dy = r // (2 * ww - 1) - (wh - 1)
    dx = r % (2 * ww - 1) - (ww - 1)
    acc = tl.zeros([BLOCK_R], dtype=table_ptr.dtype.element_ty)
    for start_i in range(0, n, BLOCK_I):
        i = start_i + tl.arange(0, BLOCK_I)
        jy = (i // ww)[None, :] - dy[:, None]
        jx = (i % ww)[None, :] - dx[:, None]
        valid = (r < rows)[:, None] & (i < n)[None, :] & (jy >= 0) & (jy < wh) & (jx >= 0) & (jx < ww)
        offs = (h * n + i.to(tl.int64)[None, :]) * n + jy * ww + jx
        acc += tl.sum(tl.load(dense_ptr + offs, mask=valid, other=0.0), axis=1)
    tl.store(table_ptr + r.to(tl.int64) * table_st[0] + h * table_st[1], acc, mask=r < rows)


# --------------------------------------------------------------------------------------------------- host


def _pair(op, name, value, minimum):
    value = list(value)
    if len(value) != 2:
        raise ValueError(f"{op}: {name} must have 2 entries, got {value}")
    if min(value) < minimum:
        raise ValueError(f"{op}: {name} entries must be >= {minimum}, got {value}")
    return int(value[0]), int(value[1])


def _check_param(op, name, t, q, shape):
    if t.dtype != q.dtype or t.device != q.device:
        raise TypeError(f"{op}: {name} must be {q.dtype} on {q.device} like q, got {t.dtype} on {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")


def _check(op, q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv):
    """The geometry tuple of the kernels; the shape agreement they rely on to stay in bounds. The Python API
    checks first, more kindly, so these only guard direct torch.ops.pykernels_triton calls."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, heads, tokens, D], got {list(t.shape)}")
        if t.dtype not in _FLOATS or t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16 like q ({q.dtype} on "
                            f"{q.device}), got {t.dtype} on {t.device}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: k must be q's shape {list(q.shape)} and v [B, heads, tokens, Dv], got "
                         f"{list(k.shape)} and {list(v.shape)}")
    if q.size(3) < 1:
        raise ValueError(f"{op}: the head dim must be positive")
    check_head_dims(op, q.size(3), v.size(3))
    (height, width), (wh, ww), (sh, sw) = (_pair(op, "spatial_shape", spatial_shape, 1),
                                           _pair(op, "window", window, 1), _pair(op, "shift", shift, 0))
    if height * width != q.size(2):
        raise ValueError(f"{op}: spatial_shape {[height, width]} has {height * width} cells but q has {q.size(2)} "
                         "tokens")
    if sh >= wh or sw >= ww:
        raise ValueError(f"{op}: shift {[sh, sw]} must be smaller than window {[wh, ww]}")
    if bias_table is not None and dense_bias is not None:
        raise ValueError(f"{op}: pass bias_table or dense_bias, not both")
    heads = q.size(1)
    if bias_table is not None:
        _check_param(op, "bias_table", bias_table, q, ((2 * wh - 1) * (2 * ww - 1), heads))
    if dense_bias is not None:
        _check_param(op, "dense_bias", dense_bias, q, (heads, wh * ww, wh * ww))
    if pad_kv is not None:
        if v.size(3) != q.size(3):
            raise ValueError(f"{op}: pad_kv needs v's head dim ({v.size(3)}) equal to q's ({q.size(3)})")
        _check_param(op, "pad_kv", pad_kv, q, (2, heads, q.size(3)))
    padded_h, padded_w = -(-height // wh) * wh, -(-width // ww) * ww
    return (height, width, wh, ww, sh, sw, padded_w // ww, padded_h, padded_w)


def _plan(q, dv, n):
    """Kernel parameters: the dense engine's tiles for n queries and n keys. A window that fits one tile
    square gets it (FUSED backward), up to head dims of 64: ptxas (sm_90) spills the fused 64 x 64 tile at
    128."""
    meta = _meta(q, dv, n, n)
    side = max(_MIN_BLOCK, _pow2(n))
    fused = side <= max(meta["BLOCK_M"], meta["BLOCK_N"]) and max(meta["BLOCK_D"], meta["BLOCK_DV"]) <= 64
    if fused:
        meta.update(BLOCK_M=side, BLOCK_N=side)
    # The gathers' index math (tokens, relative offsets, regions) costs registers the dense tiles do not
    # need: at 4 warps ptxas (sm_90) spills 64 x 32 and larger fp16 tiles.
    if meta["BLOCK_M"] * meta["BLOCK_N"] >= 2048:
        meta["num_warps"] = 8
    return meta, fused


def _bias_args(q, bias_table, dense_bias, pad_kv):
    """(BIAS code, bias, its strides, pad, its strides); q stands in for pointers the flags never read."""
    if bias_table is not None:
        bias = (1, bias_table, bias_table.stride())
    elif dense_bias is not None:
        bias = (2, dense_bias, dense_bias.stride())
    else:
        bias = (0, q, (0, 0, 0))
    pad = (pad_kv, pad_kv.stride()) if pad_kv is not None else (q, (0, 0, 0))
    return (*bias, *pad)


def window_attention(q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv, shift_mask, scale):
    op = "pykernels.window_attention"
    geo = _check(op, q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv)
    b, h, tokens, dqk = q.shape
    dv = v.size(3)
    out = q.new_empty((b, h, tokens, dv))
    lse = torch.empty((b, h, tokens), dtype=_lse_dtype(q.dtype), device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    n = geo[2] * geo[3]
    windows = geo[7] // geo[2] * geo[6]
    meta, _ = _plan(q, dv, n)
    code, bias, bias_st, pad, pad_st = _bias_args(q, bias_table, dense_bias, pad_kv)
    q_blocks = triton.cdiv(n, meta["BLOCK_M"])
    _window_fwd_kernel[(windows * q_blocks, b * h)](
        q, k, v, bias, pad, out, lse, q.stride(), k.stride(), v.stride(), bias_st, pad_st, out.stride(),
        lse.stride(), geo, h, n, q_blocks, dqk, dv, *_split_scale(scale), BIAS=code, HAS_PAD=pad_kv is not None,
        SHIFT_MASK=bool(shift_mask) and (geo[4] > 0 or geo[5] > 0), **meta)
    return out, lse


def _groups(batch, windows, heads, tiles, n):
    """Window groups of the bias gradient: a function of the shapes only, so the sum order is fixed."""
    items = batch * windows
    by_programs = -(-_TARGET_PROGRAMS // max(1, heads * tiles))
    by_memory = _MAX_PARTIAL // max(1, heads * n * n)
    return max(1, min(items, by_programs, by_memory))


def window_attention_backward(q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv, shift_mask,
                              scale, out, lse, grad_out, bias_grad):
    op = "pykernels.window_attention_backward"
    geo = _check(op, q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv)
    b, h, tokens, dqk = q.shape
    dv = v.size(3)
    for name, t, shape in (("out", out, (b, h, tokens, dv)), ("grad_out", grad_out, (b, h, tokens, dv)),
                           ("lse", lse, (b, h, tokens))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if lse.dtype != _lse_dtype(q.dtype) or out.dtype != q.dtype or grad_out.dtype != q.dtype:
        raise TypeError(f"{op}: out and grad_out must be {q.dtype} and lse {_lse_dtype(q.dtype)}, got "
                        f"{out.dtype}, {grad_out.dtype} and {lse.dtype}")
    bias_given = bias_table if bias_table is not None else dense_bias
    has_bias_grad = bool(bias_grad) and bias_given is not None
    dbias = torch.empty(bias_given.shape, dtype=q.dtype, device=q.device) if has_bias_grad else q.new_empty(0)
    dq, dk, dvt = (torch.empty_like(t) for t in (q, k, v))
    if b * h * tokens == 0:
        return dq, dk, dvt, dbias.zero_()
    n = geo[2] * geo[3]
    windows = geo[7] // geo[2] * geo[6]
    meta, fused = _plan(q, dv, n)
    code, bias, bias_st, pad, pad_st = _bias_args(q, bias_table, dense_bias, pad_kv)
    delta = torch.empty((b * h, tokens), dtype=_lse_dtype(q.dtype), device=q.device)
    _row_dot_kernel[(b * h, triton.cdiv(tokens, meta["BLOCK_M"]))](
        out, grad_out, delta, out.stride(), grad_out.stride(), h, tokens, dv, ACC=meta["ACC"],
        BLOCK_M=meta["BLOCK_M"], BLOCK_DV=meta["BLOCK_DV"], num_warps=meta["num_warps"])
    q_blocks, k_blocks = triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])
    common = (geo, h, tokens, n)
    dims = (dqk, dv, *_split_scale(scale))
    flags = dict(BIAS=code, HAS_PAD=pad_kv is not None, SHIFT_MASK=bool(shift_mask) and (geo[4] > 0 or geo[5] > 0),
                 **meta)
    _window_dq_kernel[(windows * q_blocks, b * h)](
        q, k, v, bias, pad, grad_out, lse, delta, dq, dk, dvt, q.stride(), k.stride(), v.stride(), bias_st, pad_st,
        grad_out.stride(), lse.stride(), dq.stride(), dk.stride(), dvt.stride(), *common, q_blocks, *dims,
        FUSED=fused, **flags)
    if not fused:
        _window_dkv_kernel[(windows * k_blocks, b * h)](
            q, k, v, bias, pad, grad_out, lse, delta, dk, dvt, q.stride(), k.stride(), v.stride(), bias_st, pad_st,
            grad_out.stride(), lse.stride(), dk.stride(), dvt.stride(), *common, k_blocks, *dims, **flags)
    if has_bias_grad:
        groups = _groups(b, windows, h, q_blocks * k_blocks, n)
        partial = torch.empty((groups, h, n, n), dtype=_lse_dtype(q.dtype), device=q.device)
        # Unpipelined: prefetching the next window's q, dO, k and v gathers keeps two sets of tiles live, and
        # ptxas (sm_80 and sm_90) spilled 3.3 KB a thread at fp32, head dim 128, num_stages=2; at 1 it spills none.
        _window_dbias_kernel[(q_blocks * k_blocks, groups, h)](
            q, k, v, bias, pad, grad_out, lse, delta, partial, q.stride(), k.stride(), v.stride(), bias_st, pad_st,
            grad_out.stride(), lse.stride(), *common, windows, b * windows, groups, k_blocks, *dims,
            **{**flags, "num_stages": 1})
        dense = partial.sum(0)
        if dense_bias is not None:
            dbias.copy_(dense)
        else:
            table = torch.empty(dbias.shape, dtype=dense.dtype, device=q.device)
            _fold_table_kernel[(h, triton.cdiv(table.size(0), _FOLD_BLOCK))](
                dense, table, table.stride(), h, geo, n, BLOCK_R=_FOLD_BLOCK, BLOCK_I=_FOLD_BLOCK)
            dbias.copy_(table)
    return dq, dk, dvt, dbias
