"""Triton engine of 2-D neighbourhood attention (``torch.ops.pykernels_triton.neighborhood_attention_2d*``).

Same meaning as ``pykernels.reference.neighborhood`` (NATTEN's), argument for argument with the schemas in
``csrc/registration.cpp``; which keys a query sees comes from ``csrc/window/neighborhood.h``, mirrored
axis by axis in the ``@triton.jit`` helpers below (an axis is the tuple (length, kernel, dilation)).

Every query has its own window, so tiles are gathers, not shared operands: a program owns BLOCK_M
consecutive tokens of one (batch, head), walks the kh x kw kernel offsets in chunks of BLOCK_K, gathers the
[BLOCK_M, BLOCK_K, D] keys and values of the chunk and reduces over D on the CUDA cores, with an online
softmax across chunks and fp32 (fp64 for fp64) accumulation.

Backward recomputes P from the lse, atomic-free: the query pass writes dq (and, for the rpb gradient, dS of
every (query, kernel offset) into a scratch buffer); the key pass owns BLOCK_N keys and walks their inverse
neighbourhood (neighborhood.h's first_query..last_query run on each axis, at most 2 kernel - 1 queries per
axis) for dk and dv. The rpb gradient is reduced from the dS buffer by one program per (head, block of
bias entries) in a fixed order, so every result is bitwise reproducible run to run, whatever
``pykernels.set_deterministic`` says.

Block sizes come from host rules on the head dims and kernel size (no ``@triton.autotune``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _cast, _lse_dtype, _probs, _row_dot_kernel, check_head_dims
from .graph import _acc, _pow2, _split_scale

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Elements of one gathered [BLOCK_M, BLOCK_K, D] tile: 32 per thread at 4 warps. ptxas (sm_90) spills at
# twice that; the key pass, which holds q and dO gathers at once, gets half.
_TILE = 4096
_MAX_BLOCK_K = 16
_MAX_BLOCK_M = 64
_RPB_BLOCK_E = 32
_RPB_BLOCK_Q = 64

# --------------------------------------------------------------------------- index math (neighborhood.h)


@triton.jit
def _class_length(axis, r):
    return (axis[0] - r + axis[2] - 1) // axis[2]


@triton.jit
def _window_start(axis, i, n):
    s = i - axis[1] // 2
    return tl.minimum(tl.maximum(s, 0), n - axis[1])


@triton.jit
def _first_query(axis, j):
    return tl.where(j < axis[1], 0, j - axis[1] // 2)


@triton.jit
def _last_query(axis, j, n):
    return tl.where(j >= n - axis[1], n - 1, j + axis[1] // 2)


@triton.jit
def _sub(axis, p):
    """(residue class, sub position, class length, window start) of map position p along an axis."""
    r = p % axis[2]
    i = p // axis[2]
    n = _class_length(axis, r)
    return r, i, n, _window_start(axis, i, n)


# ------------------------------------------------------------------------------------------ tile helpers


@triton.jit
def _gather3(base, token, cols, token_stride, col_stride, mask, num_cols, ACC: tl.constexpr):
    """[R, C, cols] rows of the [R, C] tokens, in the accumulation type."""
    offs = token.to(tl.int64)[:, :, None] * token_stride + cols.to(tl.int64)[None, None, :] * col_stride
    return tl.load(base + offs, mask=mask[:, :, None] & (cols < num_cols)[None, None, :], other=0.0).to(ACC)


@triton.jit
def _rows(base, token, cols, token_stride, col_stride, mask, num_cols, ACC: tl.constexpr):
    offs = token.to(tl.int64)[:, None] * token_stride + cols.to(tl.int64)[None, :] * col_stride
    return tl.load(base + offs, mask=mask[:, None] & (cols < num_cols)[None, :], other=0.0).to(ACC)


@triton.jit
def _store_rows(base, value, token, cols, token_stride, col_stride, mask, num_cols, INTERPRETED: tl.constexpr):
    offs = token.to(tl.int64)[:, None] * token_stride + cols.to(tl.int64)[None, :] * col_stride
    tl.store(base + offs, _cast(value, base.dtype.element_ty, INTERPRETED),
             mask=mask[:, None] & (cols < num_cols)[None, :])


@triton.jit
def _query_keys(ay, ax, y, x, t0, BLOCK_K: tl.constexpr):
    """Key tokens [queries, BLOCK_K] of kernel offsets t0 + [0, BLOCK_K) (row-major over kh x kw) of the
    queries at (y, x), their rpb entries (row, column), and which offsets exist."""
    ry, iy, ny, sy = _sub(ay, y)
    rx, ix, nx, sx = _sub(ax, x)
    t = t0 + tl.arange(0, BLOCK_K)
    ty = (t // ax[1])[None, :]
    tx = (t % ax[1])[None, :]
    ky = ry[:, None] + (sy[:, None] + ty) * ay[2]
    kx = rx[:, None] + (sx[:, None] + tx) * ax[2]
    # bias_index(i, j) = j - i + kernel - 1 with j = start + offset.
    ey = (sy - iy + ay[1] - 1)[:, None] + ty
    ex = (sx - ix + ax[1] - 1)[:, None] + tx
    return ky * ax[0] + kx, ey, ex, t < ay[1] * ax[1]


@triton.jit
def _add_bias(s, rpb_ptr, rpb_st, h, ey, ex, mask, HAS_RPB: tl.constexpr, ACC: tl.constexpr):
    if HAS_RPB:
        offs = h * rpb_st[0] + ey.to(tl.int64) * rpb_st[1] + ex.to(tl.int64) * rpb_st[2]
        s += tl.load(rpb_ptr + offs, mask=mask, other=0.0).to(ACC)
    return s


# ------------------------------------------------------------------------------------------------ forward


@triton.jit
def _na_fwd_kernel(q_ptr, k_ptr, v_ptr, rpb_ptr, out_ptr, lse_ptr, q_st, k_st, v_st, rpb_st, out_st, lse_st, ay, ax,
                   H, N, D, DV, scale_hi, scale_lo, HAS_RPB: tl.constexpr, ACC: tl.constexpr,
                   INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    live = tok < N
    y, x = tok // ax[0], tok % ax[0]
    q = _rows(q_ptr + b * q_st[0] + h * q_st[1], tok, d, q_st[2], q_st[3], live, D, ACC) * scale
    k_base = k_ptr + b * k_st[0] + h * k_st[1]
    v_base = v_ptr + b * v_st[0] + h * v_st[1]
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    for t0 in range(0, ay[1] * ax[1], BLOCK_K):
        key, ey, ex, exists = _query_keys(ay, ax, y, x, t0, BLOCK_K)
        mask = live[:, None] & exists
        k = _gather3(k_base, key, d, k_st[2], k_st[3], mask, D, ACC)
        s = _add_bias(tl.sum(q[:, None, :] * k, axis=2), rpb_ptr, rpb_st, h, ey, ex, mask, HAS_RPB, ACC)
        s = tl.where(mask, s, float("-inf"))
        # Rows past N stay at -inf: shifting them by 0 keeps exp() from making NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _gather3(v_base, key, dv, v_st[2], v_st[3], mask, DV, ACC)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
        m_i = m_new
    safe = tl.where(l_i == 0, 1.0, l_i)
    _store_rows(out_ptr + b * out_st[0] + h * out_st[1], acc / safe[:, None], tok, dv, out_st[2], out_st[3], live,
                DV, INTERPRETED)
    tl.store(lse_ptr + b * lse_st[0] + h * lse_st[1] + tok.to(tl.int64) * lse_st[2], m_i + tl.log(safe),
             mask=live)


# ------------------------------------------------------------------------------------------------ backward


@triton.jit
def _na_dq_kernel(q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, ds_ptr, q_st, k_st, v_st, rpb_st,
                  do_st, lse_st, dq_st, ay, ax, H, N, D, DV, scale_hi, scale_lo, HAS_RPB: tl.constexpr,
                  RPB_GRAD: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dq of BLOCK_M queries; RPB_GRAD: also dS [B * H, N, kh * kw] for the rpb reduction."""
    tok = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    live = tok < N
    y, x = tok // ax[0], tok % ax[0]
    q = _rows(q_ptr + b * q_st[0] + h * q_st[1], tok, d, q_st[2], q_st[3], live, D, ACC) * scale
    do = _rows(do_ptr + b * do_st[0] + h * do_st[1], tok, dv, do_st[2], do_st[3], live, DV, ACC)
    lse = tl.load(lse_ptr + b * lse_st[0] + h * lse_st[1] + tok.to(tl.int64) * lse_st[2], mask=live,
                  other=float("-inf")).to(ACC)
    delta = tl.load(delta_ptr + bh * N + tok, mask=live, other=0.0)
    k_base = k_ptr + b * k_st[0] + h * k_st[1]
    v_base = v_ptr + b * v_st[0] + h * v_st[1]
    kk = ay[1] * ax[1]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for t0 in range(0, kk, BLOCK_K):
        key, ey, ex, exists = _query_keys(ay, ax, y, x, t0, BLOCK_K)
        mask = live[:, None] & exists
        k = _gather3(k_base, key, d, k_st[2], k_st[3], mask, D, ACC)
        s = _add_bias(tl.sum(q[:, None, :] * k, axis=2), rpb_ptr, rpb_st, h, ey, ex, mask, HAS_RPB, ACC)
        p = _probs(tl.where(mask, s, float("-inf")), lse[:, None])
        v = _gather3(v_base, key, dv, v_st[2], v_st[3], mask, DV, ACC)
        ds = p * (tl.sum(do[:, None, :] * v, axis=2) - delta[:, None])
        dq += tl.sum(ds[:, :, None] * k, axis=1)
        if RPB_GRAD:
            t = t0 + tl.arange(0, BLOCK_K)
            tl.store(ds_ptr + (bh * N + tok.to(tl.int64))[:, None] * kk + t[None, :], ds, mask=mask)
    _store_rows(dq_ptr + b * dq_st[0] + h * dq_st[1], dq * scale, tok, d, dq_st[2], dq_st[3], live, D,
                INTERPRETED)


@triton.jit
def _na_dkv_kernel(q_ptr, k_ptr, v_ptr, rpb_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, q_st, k_st, v_st,
                   rpb_st, do_st, lse_st, dk_st, dv_st, ay, ax, span_y, span_x, H, N, D, DV, scale_hi, scale_lo,
                   HAS_RPB: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk and dv of BLOCK_N keys from the queries that see them: on each axis the run first_query..last_query
    of the key's sub-axis (at most span_y x span_x candidates, walked in chunks of BLOCK_C)."""
    tok = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    live = tok < N
    ry, jy, ny, _ = _sub(ay, tok // ax[0])
    rx, jx, nx, _ = _sub(ax, tok % ax[0])
    fy, ly = _first_query(ay, jy), _last_query(ay, jy, ny)
    fx, lx = _first_query(ax, jx), _last_query(ax, jx, nx)
    k = _rows(k_ptr + b * k_st[0] + h * k_st[1], tok, d, k_st[2], k_st[3], live, D, ACC) * scale
    v = _rows(v_ptr + b * v_st[0] + h * v_st[1], tok, dv, v_st[2], v_st[3], live, DV, ACC)
    q_base = q_ptr + b * q_st[0] + h * q_st[1]
    do_base = do_ptr + b * do_st[0] + h * do_st[1]
    lse_base = lse_ptr + b * lse_st[0] + h * lse_st[1]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    for c0 in range(0, span_y * span_x, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        iy = fy[:, None] + (c // span_x)[None, :]
        ix = fx[:, None] + (c % span_x)[None, :]
        mask = live[:, None] & (c < span_y * span_x)[None, :] & (iy <= ly[:, None]) & (ix <= lx[:, None])
        query = (ry[:, None] + iy * ay[2]) * ax[0] + rx[:, None] + ix * ax[2]
        q = _gather3(q_base, query, d, q_st[2], q_st[3], mask, D, ACC)
        # The query's rpb entry for this key: bias_index(query sub position, key sub position).
        ey = jy[:, None] - iy + ay[1] - 1
        ex = jx[:, None] - ix + ax[1] - 1
        s = _add_bias(tl.sum(k[:, None, :] * q, axis=2), rpb_ptr, rpb_st, h, ey, ex, mask, HAS_RPB, ACC)
        lse = tl.load(lse_base + query.to(tl.int64) * lse_st[2], mask=mask, other=float("-inf")).to(ACC)
        p = _probs(tl.where(mask, s, float("-inf")), lse)
        do = _gather3(do_base, query, dv, do_st[2], do_st[3], mask, DV, ACC)
        dv_acc += tl.sum(p[:, :, None] * do, axis=1)
        delta = tl.load(delta_ptr + bh * N + query, mask=mask, other=0.0)
        ds = p * (tl.sum(v[:, None, :] * do, axis=2) - delta)
        dk += tl.sum(ds[:, :, None] * q, axis=1)
    _store_rows(dk_ptr + b * dk_st[0] + h * dk_st[1], dk * scale, tok, d, dk_st[2], dk_st[3], live, D, INTERPRETED)
    _store_rows(dv_ptr + b * dv_st[0] + h * dv_st[1], dv_acc, tok, dv, dv_st[2], dv_st[3], live, DV, INTERPRETED)


@triton.jit
def _na_rpb_kernel(ds_ptr, drpb_ptr, ay, ax, B, H, N, ACC: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_Q: tl.constexpr):
    """drpb[h, e] = sum of dS over the (query, kernel offset) pairs that read entry e, batch by batch and
    query by query: a fixed order."""
    h = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_len = 2 * ax[1] - 1
    entries = (2 * ay[1] - 1) * row_len
    ey = (e // row_len)[:, None]
    ex = (e % row_len)[:, None]
    kk = ay[1] * ax[1]
    acc = tl.zeros([BLOCK_E], dtype=ACC)
    for b in range(0, B):
        for q0 in range(0, N, BLOCK_Q):
            tok = q0 + tl.arange(0, BLOCK_Q)
            _, iy, _, sy = _sub(ay, tok // ax[0])
            _, ix, _, sx = _sub(ax, tok % ax[0])
            ty = ey - (sy - iy + ay[1] - 1)[None, :]
            tx = ex - (sx - ix + ax[1] - 1)[None, :]
            mask = (e < entries)[:, None] & (tok < N)[None, :] & (ty >= 0) & (ty < ay[1]) & (tx >= 0) & (tx < ax[1])
            offs = ((b * H + h) * N + tok.to(tl.int64)[None, :]) * kk + ty * ax[1] + tx
            acc += tl.sum(tl.load(ds_ptr + offs, mask=mask, other=0.0), axis=1)
    tl.store(drpb_ptr + h * entries + e, acc, mask=e < entries)


# --------------------------------------------------------------------------------------------------- host


def _check(op, q, k, v, spatial_shape, kernel_size, dilation, rpb):
    """The (length, kernel, dilation) axes of the kernels; the shape agreement they rely on to stay in
    bounds. The Python API checks first, more kindly; these guard direct torch.ops.pykernels_triton calls."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, heads, H*W, D], got {list(t.shape)}")
        if t.dtype not in _FLOATS or t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16 like q ({q.dtype} on "
                            f"{q.device}), got {t.dtype} on {t.device}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: k must be q's shape {list(q.shape)} and v [B, heads, H*W, Dv], got "
                         f"{list(k.shape)} and {list(v.shape)}")
    check_head_dims(op, q.size(3), v.size(3))
    axes = []
    for name, values in (("spatial_shape", spatial_shape), ("kernel_size", kernel_size), ("dilation", dilation)):
        if len(values) != 2:
            raise ValueError(f"{op}: {name} must have two entries (height, width), got {list(values)}")
    for i, axis in enumerate(("height", "width")):
        length, kernel, dil = int(spatial_shape[i]), int(kernel_size[i]), int(dilation[i])
        if length < 1 or kernel < 1 or kernel % 2 == 0 or dil < 1:
            raise ValueError(f"{op}: along the {axis}, spatial_shape must be positive, kernel_size odd and "
                             f"positive, dilation positive; got {length}, {kernel}, {dil}")
        if kernel * dil > length:
            raise ValueError(f"{op}: kernel_size * dilation along the {axis} ({kernel} * {dil}) exceeds the map's "
                             f"{axis} {length}")
        axes.append((length, kernel, dil))
    if axes[0][0] * axes[1][0] != q.size(2):
        raise ValueError(f"{op}: spatial_shape {list(spatial_shape)} holds {axes[0][0] * axes[1][0]} tokens, q has "
                         f"{q.size(2)}")
    if rpb is not None:
        shape = (q.size(1), 2 * axes[0][1] - 1, 2 * axes[1][1] - 1)
        if rpb.dtype != q.dtype or rpb.device != q.device:
            raise TypeError(f"{op}: rpb must be {q.dtype} on {q.device} like q, got {rpb.dtype} on {rpb.device}")
        if tuple(rpb.shape) != shape:
            raise ValueError(f"{op}: rpb must have shape {list(shape)}, got {list(rpb.shape)}")
    return tuple(axes)


def _span(axis):
    """The most queries of one sub-axis whose windows hold one key: kernel + kernel // 2, except on sub-axes
    shorter than 2 kernel, where windows clamped at both ends can pile up to the whole sub-axis."""
    length, kernel, dilation = axis
    if length // dilation >= 2 * kernel:
        return kernel + kernel // 2
    return min(-(-length // dilation), 2 * kernel - 1)


def _meta(q, dv, rows, cols, tile=_TILE):
    """Blocks of a [rows, cols, D] gather: cols up to _MAX_BLOCK_K, rows to fill `tile` elements."""
    block_d, block_dv = _pow2(q.size(3)), _pow2(dv)
    block_k = min(_pow2(cols), _MAX_BLOCK_K)
    block_m = max(1, min(_MAX_BLOCK_M, tile // (block_k * max(block_d, block_dv)), _pow2(rows)))
    return dict(ACC=_acc(q.dtype), INTERPRETED=q.device.type == "cpu", BLOCK_D=block_d, BLOCK_DV=block_dv,
                num_warps=4), block_m, block_k


def _rpb_args(rpb, q):
    return (rpb, rpb.stride()) if rpb is not None else (q, (0, 0, 0))


def neighborhood_attention_2d(q, k, v, spatial_shape, kernel_size, dilation, rpb, scale):
    op = "pykernels.neighborhood_attention_2d"
    ay, ax = _check(op, q, k, v, spatial_shape, kernel_size, dilation, rpb)
    b, h, tokens, dqk = q.shape
    dv = v.size(3)
    out = q.new_empty((b, h, tokens, dv))
    lse = torch.empty((b, h, tokens), dtype=_lse_dtype(q.dtype), device=q.device)
    if b * h * tokens == 0:
        return out, lse
    meta, block_m, block_k = _meta(q, dv, tokens, ay[1] * ax[1])
    rpb_t, rpb_st = _rpb_args(rpb, q)
    _na_fwd_kernel[(triton.cdiv(tokens, block_m), b * h)](
        q, k, v, rpb_t, out, lse, q.stride(), k.stride(), v.stride(), rpb_st, out.stride(), lse.stride(), ay, ax, h,
        tokens, dqk, dv, *_split_scale(scale), HAS_RPB=rpb is not None, BLOCK_M=block_m, BLOCK_K=block_k, **meta)
    return out, lse


def neighborhood_attention_2d_backward(q, k, v, spatial_shape, kernel_size, dilation, rpb, scale, out, lse,
                                       grad_out, rpb_grad):
    op = "pykernels.neighborhood_attention_2d_backward"
    ay, ax = _check(op, q, k, v, spatial_shape, kernel_size, dilation, rpb)
    if rpb_grad and rpb is None:
        raise ValueError(f"{op}: rpb_grad needs an rpb")
    b, h, tokens, dqk = q.shape
    dv = v.size(3)
    for name, t, shape in (("out", out, (b, h, tokens, dv)), ("grad_out", grad_out, (b, h, tokens, dv)),
                           ("lse", lse, (b, h, tokens))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if lse.dtype != _lse_dtype(q.dtype) or out.dtype != q.dtype or grad_out.dtype != q.dtype:
        raise TypeError(f"{op}: out and grad_out must be {q.dtype} and lse {_lse_dtype(q.dtype)}, got "
                        f"{out.dtype}, {grad_out.dtype} and {lse.dtype}")
    dq, dk, dvt = (torch.empty_like(t) for t in (q, k, v))
    kk = ay[1] * ax[1]
    drpb = q.new_empty((h, 2 * ay[1] - 1, 2 * ax[1] - 1)) if rpb_grad else q.new_empty(0)
    if b * h * tokens == 0:
        return dq, dk, dvt, drpb.zero_()
    acc_dtype = _lse_dtype(q.dtype)
    delta = torch.empty((b * h, tokens), dtype=acc_dtype, device=q.device)
    meta, block_m, block_k = _meta(q, dv, tokens, kk)
    # The row dot loops over dv, so its chunk is capped at 32: a 64 x 256 fp64 chunk of out and dO spilled
    # 1.3 KB a thread in ptxas (sm_80 and sm_90), 64 x 64 up to 240 B; 64 x 32 spills none.
    _row_dot_kernel[(b * h, triton.cdiv(tokens, 64))](
        out, grad_out, delta, out.stride(), grad_out.stride(), h, tokens, dv, ACC=meta["ACC"], BLOCK_M=64,
        BLOCK_DV=min(meta["BLOCK_DV"], 32), num_warps=4)
    rpb_t, rpb_st = _rpb_args(rpb, q)
    ds = torch.empty((b * h, tokens, kk), dtype=acc_dtype, device=q.device) if rpb_grad else delta
    common = (ay, ax, h, tokens, dqk, dv, *_split_scale(scale))
    _na_dq_kernel[(triton.cdiv(tokens, block_m), b * h)](
        q, k, v, rpb_t, grad_out, lse, delta, dq, ds, q.stride(), k.stride(), v.stride(), rpb_st, grad_out.stride(),
        lse.stride(), dq.stride(), *common, HAS_RPB=rpb is not None, RPB_GRAD=bool(rpb_grad), BLOCK_M=block_m,
        BLOCK_K=block_k, **meta)
    span_y, span_x = _span(ay), _span(ax)
    meta, block_n, block_c = _meta(q, dv, tokens, span_y * span_x, _TILE // 2)
    _na_dkv_kernel[(triton.cdiv(tokens, block_n), b * h)](
        q, k, v, rpb_t, grad_out, lse, delta, dk, dvt, q.stride(), k.stride(), v.stride(), rpb_st, grad_out.stride(),
        lse.stride(), dk.stride(), dvt.stride(), ay, ax, span_y, span_x, *common[2:], HAS_RPB=rpb is not None,
        BLOCK_N=block_n, BLOCK_C=block_c, **meta)
    if rpb_grad:
        reduced = torch.empty(drpb.shape, dtype=acc_dtype, device=q.device)
        _na_rpb_kernel[(h, triton.cdiv(reduced[0].numel(), _RPB_BLOCK_E))](
            ds, reduced, ay, ax, b, h, tokens, ACC=meta["ACC"], BLOCK_E=_RPB_BLOCK_E, BLOCK_Q=_RPB_BLOCK_Q)
        drpb.copy_(reduced)
    return dq, dk, dvt, drpb
