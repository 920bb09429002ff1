"""Triton engine of the graph message-passing ops (``torch.ops.pykernels_triton.<op>``).

Same meaning as the C++ CPU engine (``csrc/graph/*_cpu.cpp``), argument for argument. Every kernel is
row-split ("CSR vector"): one program owns one target row (or, in backward, one source row through the
transpose) and a block of its features or heads, and walks the row's edges in masked chunks of
``BLOCK_E``. Each output element is written by exactly one program, so there are no atomics and every
result is bitwise reproducible. Index math is 64-bit: ``program_id`` and loaded indices are int64
before they meet a stride. fp16/bf16/fp32 accumulate in fp32, fp64 in fp64 (``ACC``).

Block sizes come from host-side heuristics (mean degree, feature width) rather than ``@triton.autotune``:
the best block depends on the degree distribution, which is not a kernel argument an autotune key could
see, and the interpreter would run every config.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_REDUCES = ("sum", "mean", "max", "min")
# Elements of one chunk's [edges, features] tile: about 32 fp32 registers per thread at 4 warps.
_TILE = 4096
_MAX_BLOCK_F = 128


# ------------------------------------------------------------------------------------------- heuristics


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _edge_block(num_edges: int, num_rows: int, width: int) -> int:
    """Edges per chunk: the mean degree rounded up to a power of 2 (so typical rows take one chunk and
    waste few lanes), kept within [8, 64], and small enough that the [edges, width] tile fits _TILE."""
    mean = -(-num_edges // max(num_rows, 1))
    return max(1, min(max(_pow2(mean), 8), 64, _TILE // width))


def _warps(tile: int) -> int:
    return min(8, _pow2(tile // 512))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _split_scale(scale: float):
    """Triton passes Python floats as fp32; fp64 attention needs the scale to fp64 precision, so it
    travels as an fp32 head plus the fp32 rounding error (hi + lo is exact to ~2^-48)."""
    hi = float(torch.tensor(scale, dtype=torch.float32))
    return hi, float(scale) - hi


# ------------------------------------------------------------------------------------------------- CSR


def coo_to_csr(row, col, num_rows, num_cols, context):
    """Stable sort of the edges by row: ``(rowptr, col in CSR order, perm)`` with ``perm[pos]`` the input
    position of CSR position ``pos``. Plain torch ops (sort, searchsorted) so it runs on any device."""
    if num_rows < 0 or num_cols < 0:
        raise ValueError(f"{context}: node counts must be non-negative, got {num_rows} and {num_cols}")
    if row.dim() != 1 or col.dim() != 1 or row.numel() != col.numel():
        raise ValueError(f"{context}: row and col must be 1-D of equal length")
    if row.dtype != col.dtype or row.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{context}: indices must be int32 or int64, got {row.dtype}")
    row, col = row.long(), col.long()
    bad_row = (row < 0) | (row >= num_rows)
    bad = bad_row | (col < 0) | (col >= num_cols)
    if bool(bad.any()):  # the one host synchronisation; the message names the first bad edge, as the C++ engine
        p = int(torch.argmax(bad.to(torch.uint8)))
        if bool(bad_row[p]):
            raise IndexError(f"{context} holds target index {int(row[p])} at position {p}, out of range for "
                             f"{num_rows} target nodes")
        raise IndexError(f"{context} holds source index {int(col[p])} at position {p}, out of range for "
                         f"{num_cols} source nodes")
    row_sorted, perm = torch.sort(row, stable=True)
    # rowptr[r] = first CSR position whose row is >= r: a search instead of bincount, which avoids atomics.
    rowptr = torch.searchsorted(row_sorted, torch.arange(num_rows + 1, device=row.device))
    return rowptr, col.index_select(0, perm), perm


def arg_to_source_(arg, col, empty):
    """arg = col[arg] in place, ``empty`` where arg is -1 (an empty row).

    torch.where evaluates both branches, so the gather runs for every position: one outside [-1, E) must be an
    IndexError here (as in the C++ engines), not a device-side assert, and with no edges (scatter of an empty
    index into dim_size > 0 groups) every position is -1 and there is no col to gather from.
    """
    flat = arg.view(-1)
    bad = torch.logical_or(flat < -1, flat >= col.numel()).nonzero()
    if bad.numel():
        pos = int(bad[0, 0])
        raise IndexError(f"pykernels.arg_to_source_: arg holds {int(flat[pos])} at flat position {pos}, out of "
                         f"range for {col.numel()} CSR positions")
    if col.numel() == 0:
        flat.fill_(empty)
        return
    flat.copy_(torch.where(flat >= 0, col.index_select(0, flat.clamp(min=0)), empty))


# ------------------------------------------------------------------------------------------------ SpMM


@triton.jit
def _spmm_sum_kernel(rowptr_ptr, col_ptr, w_ptr, x_ptr, out_ptr, H, F, HAS_W: tl.constexpr, MEAN: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    # Heads and features are flattened to H*F columns so that narrow heads (F = 1) still fill a block.
    i = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    hf = H * F
    f_mask = f < hf
    head = f // F
    start = tl.load(rowptr_ptr + i)
    end = tl.load(rowptr_ptr + i + 1)
    acc = tl.zeros([BLOCK_F], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_mask = e < end
        j = tl.load(col_ptr + e, mask=e_mask, other=0)
        m = e_mask[:, None] & f_mask[None, :]
        msg = tl.load(x_ptr + j[:, None] * hf + f[None, :], mask=m, other=0.0).to(ACC)
        if HAS_W:
            msg *= tl.load(w_ptr + e[:, None] * H + head[None, :], mask=m, other=0.0).to(ACC)
        acc += tl.sum(msg, axis=0)
    if MEAN:
        acc *= 1.0 / tl.maximum(end - start, 1).to(ACC)
    tl.store(out_ptr + i * hf + f, acc.to(out_ptr.dtype.element_ty), mask=f_mask)


@triton.jit
def _spmm_arg_kernel(rowptr_ptr, col_ptr, w_ptr, x_ptr, out_ptr, arg_ptr, H, F, HAS_W: tl.constexpr,
                     IS_MAX: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    hf = H * F
    f_mask = f < hf
    head = f // F
    start = tl.load(rowptr_ptr + i)
    end = tl.load(rowptr_ptr + i + 1)
    best = tl.zeros([BLOCK_F], dtype=ACC)
    arg = tl.full([BLOCK_F], -1, tl.int64)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_mask = e < end
        j = tl.load(col_ptr + e, mask=e_mask, other=0)
        m = e_mask[:, None] & f_mask[None, :]
        val = tl.load(x_ptr + j[:, None] * hf + f[None, :], mask=m, other=0.0).to(ACC)
        if HAS_W:
            val *= tl.load(w_ptr + e[:, None] * H + head[None, :], mask=m, other=0.0).to(ACC)
        # Negating turns min into max exactly, so one search serves both.
        if IS_MAX:
            key = val
        else:
            key = -val
        # The chunk's winner, as the sequential CPU loop would pick it: the first NaN if there is one
        # (a NaN wins and then sticks), else the first edge holding the maximum. NaNs are handled
        # explicitly because tl.max does not promise how it treats them.
        is_nan = m & (key != key)
        ok = m & (key == key)
        top = tl.max(tl.where(ok, key, float("-inf")), axis=0)
        has_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
        win = tl.where(has_nan[None, :], is_nan, ok & (key == top[None, :]))
        chunk_arg = tl.min(tl.where(win, e[:, None], end), axis=0)
        chunk_key = tl.where(has_nan, float("nan"), top)
        # Chunks arrive in CSR order, so a strict comparison keeps the earlier edge on ties.
        take = (best == best) & ((arg < 0) | (chunk_key != chunk_key) | (chunk_key > best))
        best = tl.where(take, chunk_key, best)
        arg = tl.where(take, chunk_arg, arg)
    if not IS_MAX:
        best = -best
    best = tl.where(arg < 0, 0.0, best)
    tl.store(out_ptr + i * hf + f, best.to(out_ptr.dtype.element_ty), mask=f_mask)
    tl.store(arg_ptr + i * hf + f, arg, mask=f_mask)


def spmm(rowptr, col, rowptr_t, col_t, perm_t, weight, x, reduce):
    if reduce not in _REDUCES:
        raise ValueError(f"pykernels.spmm: reduce must be one of sum, mean, max, min; got '{reduce}'")
    x = x.contiguous()
    num_rows, (_, heads, feats) = rowptr.numel() - 1, x.shape
    with_arg = reduce in ("max", "min")
    arg_shape = (num_rows if with_arg else 0, heads, feats)
    hf, num_edges = heads * feats, col.numel()
    if num_edges == 0 or hf == 0:  # every row is empty: zeros, and arg -1
        return x.new_zeros((num_rows, heads, feats)), torch.full(arg_shape, -1, dtype=torch.long, device=x.device)
    out = x.new_empty((num_rows, heads, feats))
    arg = torch.empty(arg_shape, dtype=torch.long, device=x.device)
    block_f = min(_pow2(hf), _MAX_BLOCK_F)
    block_e = _edge_block(num_edges, num_rows, block_f)
    grid = (num_rows, triton.cdiv(hf, block_f))
    w = weight.contiguous() if weight is not None else x  # x stands in for the pointer HAS_W never reads
    meta = dict(HAS_W=weight is not None, ACC=_acc(x.dtype), BLOCK_E=block_e, BLOCK_F=block_f,
                num_warps=_warps(block_e * block_f))
    if with_arg:
        _spmm_arg_kernel[grid](rowptr, col, w, x, out, arg, heads, feats, IS_MAX=reduce == "max", **meta)
    else:
        _spmm_sum_kernel[grid](rowptr, col, w, x, out, heads, feats, MEAN=reduce == "mean", **meta)
    return out, arg


@triton.jit
def _spmm_arg_grad_x_kernel(rowptr_t_ptr, col_t_ptr, perm_t_ptr, w_ptr, arg_ptr, grad_ptr, grad_x_ptr, H, F,
                            HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    # One program owns source row j and gathers from the targets j feeds (the transpose), so no two
    # programs write the same grad_x element.
    j = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    hf = H * F
    f_mask = f < hf
    head = f // F
    start = tl.load(rowptr_t_ptr + j)
    end = tl.load(rowptr_t_ptr + j + 1)
    acc = tl.zeros([BLOCK_F], dtype=ACC)
    for t0 in range(start, end, BLOCK_E):
        t = t0 + tl.arange(0, BLOCK_E)
        t_mask = t < end
        i = tl.load(col_t_ptr + t, mask=t_mask, other=0)
        e = tl.load(perm_t_ptr + t, mask=t_mask, other=-1)
        m = t_mask[:, None] & f_mask[None, :]
        won = m & (tl.load(arg_ptr + i[:, None] * hf + f[None, :], mask=m, other=-1) == e[:, None])
        # Loading under `won` only: a gradient the edge did not win is never read, not even as 0 * inf.
        g = tl.load(grad_ptr + i[:, None] * hf + f[None, :], mask=won, other=0.0).to(ACC)
        if HAS_W:
            g *= tl.load(w_ptr + e[:, None] * H + head[None, :], mask=won, other=0.0).to(ACC)
        acc += tl.sum(g, axis=0)
    tl.store(grad_x_ptr + j * hf + f, acc.to(grad_x_ptr.dtype.element_ty), mask=f_mask)


@triton.jit
def _spmm_arg_grad_w_kernel(rowptr_ptr, col_ptr, arg_ptr, grad_ptr, x_ptr, grad_w_ptr, H, F, ACC: tl.constexpr,
                            BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    # One program owns target row i and head h: the weights of the row's edges for that head are its own.
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    start = tl.load(rowptr_ptr + i)
    end = tl.load(rowptr_ptr + i + 1)
    base = (i * H + h) * F
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_mask = e < end
        j = tl.load(col_ptr + e, mask=e_mask, other=0)
        acc = tl.zeros([BLOCK_E], dtype=ACC)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            f_mask = f < F
            arg = tl.load(arg_ptr + base + f, mask=f_mask, other=-1)
            g = tl.load(grad_ptr + base + f, mask=f_mask, other=0.0).to(ACC)
            won = e_mask[:, None] & (arg[None, :] == e[:, None])
            xv = tl.load(x_ptr + (j[:, None] * H + h) * F + f[None, :], mask=won, other=0.0).to(ACC)
            acc += tl.sum(tl.where(won, g[None, :] * xv, 0.0), axis=1)
        tl.store(grad_w_ptr + e * H + h, acc.to(grad_w_ptr.dtype.element_ty), mask=e_mask)


def spmm_arg_backward(rowptr, col, rowptr_t, col_t, perm_t, weight, arg, grad_out, x, weight_grad):
    x, grad_out, arg = x.contiguous(), grad_out.contiguous(), arg.contiguous()
    num_rows, num_cols = rowptr.numel() - 1, rowptr_t.numel() - 1
    heads, feats = x.shape[1], x.shape[2]
    hf, num_edges = heads * feats, col.numel()
    grad_w = x.new_zeros((num_edges, heads)) if weight_grad else x.new_empty(0)
    if num_edges == 0 or hf == 0:
        return torch.zeros_like(x), grad_w
    grad_x, grad_w = torch.empty_like(x), torch.empty_like(grad_w)
    acc = _acc(x.dtype)
    block_f = min(_pow2(hf), _MAX_BLOCK_F)
    block_e = _edge_block(num_edges, num_cols, block_f)
    w = weight.contiguous() if weight is not None else x
    _spmm_arg_grad_x_kernel[(num_cols, triton.cdiv(hf, block_f))](
        rowptr_t, col_t, perm_t, w, arg, grad_out, grad_x, heads, feats, HAS_W=weight is not None, ACC=acc,
        BLOCK_E=block_e, BLOCK_F=block_f, num_warps=_warps(block_e * block_f))
    if weight_grad:
        block_f = min(_pow2(feats), _MAX_BLOCK_F)
        block_e = _edge_block(num_edges, num_rows, block_f)
        _spmm_arg_grad_w_kernel[(num_rows, heads)](rowptr, col, arg, grad_out, x, grad_w, heads, feats, ACC=acc,
                                                   BLOCK_E=block_e, BLOCK_F=block_f,
                                                   num_warps=_warps(block_e * block_f))
    return grad_x, grad_w


# ----------------------------------------------------------------------------------------------- SDDMM


@triton.jit
def _sddmm_kernel(rowptr_ptr, col_ptr, a_ptr, b_ptr, out_ptr, H, F, ACC: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_F: tl.constexpr):
    # Program (i, h): a[i, h] is re-read from cache per chunk while the b rows of i's edges stream by.
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    start = tl.load(rowptr_ptr + i)
    end = tl.load(rowptr_ptr + i + 1)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_mask = e < end
        j = tl.load(col_ptr + e, mask=e_mask, other=0)
        acc = tl.zeros([BLOCK_E], dtype=ACC)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            f_mask = f < F
            a = tl.load(a_ptr + (i * H + h) * F + f, mask=f_mask, other=0.0).to(ACC)
            b = tl.load(b_ptr + (j[:, None] * H + h) * F + f[None, :], mask=e_mask[:, None] & f_mask[None, :],
                        other=0.0).to(ACC)
            acc += tl.sum(a[None, :] * b, axis=1)
        tl.store(out_ptr + e * H + h, acc.to(out_ptr.dtype.element_ty), mask=e_mask)


def sddmm(rowptr, col, rowptr_t, col_t, perm_t, a, b):
    a, b = a.contiguous(), b.contiguous()
    num_rows, heads, feats = a.shape
    num_edges = col.numel()
    if num_edges == 0 or heads == 0 or feats == 0:  # nothing to read: empty, or dots over zero features
        return a.new_zeros((num_edges, heads))
    out = a.new_empty((num_edges, heads))
    block_f = min(_pow2(feats), _MAX_BLOCK_F)
    block_e = _edge_block(num_edges, num_rows, block_f)
    _sddmm_kernel[(num_rows, heads)](rowptr, col, a, b, out, heads, feats, ACC=_acc(a.dtype), BLOCK_E=block_e,
                                     BLOCK_F=block_f, num_warps=_warps(block_e * block_f))
    return out


# ---------------------------------------------------------------------------------------- edge softmax


@triton.jit
def _edge_softmax_kernel(rowptr_ptr, s_ptr, out_ptr, H, ACC: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = h < H
    start = tl.load(rowptr_ptr + i)
    end = tl.load(rowptr_ptr + i + 1)
    # Pass 1: running max and running sum of exp(s - max) (online softmax): two reads of the scores, not three.
    mx = tl.full([BLOCK_H], float("-inf"), ACC)
    total = tl.zeros([BLOCK_H], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        m = (e < end)[:, None] & h_mask[None, :]
        s = tl.load(s_ptr + e[:, None] * H + h[None, :], mask=m, other=float("-inf")).to(ACC)
        new = tl.maximum(mx, tl.max(s, axis=0))
        # While a head has seen only -inf its max stays -inf; shifting by 0 then avoids exp(-inf + inf) = NaN.
        shift = tl.where(new == float("-inf"), 0.0, new)
        total = total * tl.exp(mx - shift) + tl.sum(tl.exp(s - shift[None, :]), axis=0)
        mx = new
    # Dividing by a stand-in 1 on dead lanes keeps inf out of the discarded branch; a NaN total (a NaN or +inf
    # score) stays NaN and makes the head's weights NaN, as torch.softmax's.
    inv = tl.where(total != 0, 1.0 / tl.where(total != 0, total, 1.0), 0.0)
    shift = tl.where(mx == float("-inf"), 0.0, mx)
    # Pass 2: normalise. An all -inf head has total 0, hence inv 0 and zeros.
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        m = (e < end)[:, None] & h_mask[None, :]
        offs = e[:, None] * H + h[None, :]
        s = tl.load(s_ptr + offs, mask=m, other=float("-inf")).to(ACC)
        p = tl.exp(s - shift[None, :]) * inv[None, :]
        tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _edge_softmax_backward_kernel(rowptr_ptr, p_ptr, g_ptr, out_ptr, H, ACC: tl.constexpr, BLOCK_E: tl.constexpr,
                                  BLOCK_H: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = h < H
    start = tl.load(rowptr_ptr + i)
    end = tl.load(rowptr_ptr + i + 1)
    dot = tl.zeros([BLOCK_H], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        m = (e < end)[:, None] & h_mask[None, :]
        offs = e[:, None] * H + h[None, :]
        p = tl.load(p_ptr + offs, mask=m, other=0.0).to(ACC)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
        dot += tl.sum(p * g, axis=0)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        m = (e < end)[:, None] & h_mask[None, :]
        offs = e[:, None] * H + h[None, :]
        p = tl.load(p_ptr + offs, mask=m, other=0.0).to(ACC)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
        tl.store(out_ptr + offs, (p * (g - dot[None, :])).to(out_ptr.dtype.element_ty), mask=m)


def _launch_edge_rows(kernel, rowptr, inputs, out):
    """Program (row, head block) over [E, H] edge values; heads are the tile's columns."""
    num_rows = rowptr.numel() - 1
    num_edges, heads = out.shape
    if num_edges == 0 or heads == 0:
        return out
    block_h = min(_pow2(heads), _MAX_BLOCK_F)
    block_e = _edge_block(num_edges, num_rows, block_h)
    kernel[(num_rows, triton.cdiv(heads, block_h))](rowptr, *inputs, out, heads, ACC=_acc(out.dtype),
                                                    BLOCK_E=block_e, BLOCK_H=block_h,
                                                    num_warps=_warps(block_e * block_h))
    return out


def edge_softmax(rowptr, scores):
    scores = scores.contiguous()
    return _launch_edge_rows(_edge_softmax_kernel, rowptr, (scores,), torch.empty_like(scores))


def edge_softmax_backward(rowptr, probs, grad):
    probs, grad = probs.contiguous(), grad.contiguous()
    return _launch_edge_rows(_edge_softmax_backward_kernel, rowptr, (probs, grad), torch.empty_like(probs))


# ------------------------------------------------------------------------------------- graph attention


@triton.jit
def _scores(q_i, k_ptr, bias_ptr, j, e, e_mask, h, H, D, d, d_mask, scale, HAS_BIAS: tl.constexpr,
            ACC: tl.constexpr):
    """scale * q_i . k_j (+ bias_e) for a chunk of edges, -inf on masked lanes; forward and backward share it
    so that backward's exp(s - lse) sees exactly the scores the forward normalised."""
    k = tl.load(k_ptr + (j[:, None] * H + h) * D + d[None, :], mask=e_mask[:, None] & d_mask[None, :],
                other=0.0).to(ACC)
    s = scale * tl.sum(q_i[None, :] * k, axis=1)
    if HAS_BIAS:
        s += tl.load(bias_ptr + e * H + h, mask=e_mask, other=0.0).to(ACC)
    return tl.where(e_mask, s, float("-inf"))


@triton.jit
def _attention_fwd_kernel(rowptr_ptr, col_ptr, q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr, H, D, DV,
                          scale_hi, scale_lo, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # Program (target i, head h) streams i's edges through an online softmax: [E, H] scores and
    # [E, H, D] messages never exist in memory.
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    ih = i * H + h
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv < DV
    q_i = tl.load(q_ptr + ih * D + d, mask=d_mask, other=0.0).to(ACC)
    start = tl.load(rowptr_ptr + i)
    end = tl.load(rowptr_ptr + i + 1)
    mx = tl.full([], float("-inf"), ACC)
    total = tl.zeros([], dtype=ACC)
    acc = tl.zeros([BLOCK_DV], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_mask = e < end
        j = tl.load(col_ptr + e, mask=e_mask, other=0)
        s = _scores(q_i, k_ptr, bias_ptr, j, e, e_mask, h, H, D, d, d_mask, scale, HAS_BIAS, ACC)
        new = tl.maximum(mx, tl.max(s, axis=0))
        # Until a finite score arrives the max stays -inf; shifting by 0 keeps exp() from making NaN.
        shift = tl.where(new == float("-inf"), 0.0, new)
        rescale = tl.exp(mx - shift)
        p = tl.exp(s - shift)
        total = total * rescale + tl.sum(p, axis=0)
        v = tl.load(v_ptr + (j[:, None] * H + h) * DV + dv[None, :], mask=e_mask[:, None] & dv_mask[None, :],
                    other=0.0).to(ACC)
        acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
        mx = new
    # A row without a finite score (no edges, or only -inf biases) gets output 0 and lse -inf; a NaN total (a
    # NaN or +inf score) gives NaN for both, as the reference does.
    live = total != 0
    safe = tl.where(live, total, 1.0)  # keeps inf and NaN out of the discarded branch
    tl.store(out_ptr + ih * DV + dv, (acc * tl.where(live, 1.0 / safe, 0.0)).to(out_ptr.dtype.element_ty),
             mask=dv_mask)
    tl.store(lse_ptr + ih, tl.where(live, mx + tl.log(safe), float("-inf")))


def _attention_meta(num_edges, num_rows, q, v):
    """Whole head dims per program (attention heads are narrow), edges per chunk fitted around them."""
    block_d, block_dv = _pow2(q.shape[2]), _pow2(v.shape[2])
    block_e = _edge_block(num_edges, num_rows, max(block_d, block_dv))
    return dict(ACC=_acc(q.dtype), BLOCK_E=block_e, BLOCK_D=block_d, BLOCK_DV=block_dv,
                num_warps=_warps(block_e * max(block_d, block_dv)))


def graph_attention(rowptr, col, rowptr_t, col_t, perm_t, q, k, v, bias, scale):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    num_rows, heads, dqk = q.shape
    dv = v.shape[2]
    num_edges = col.numel()
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if num_edges == 0 or heads == 0:  # no row sees a score
        return (q.new_zeros((num_rows, heads, dv)),
                torch.full((num_rows, heads), float("-inf"), dtype=lse_dtype, device=q.device))
    out = q.new_empty((num_rows, heads, dv))
    lse = torch.empty((num_rows, heads), dtype=lse_dtype, device=q.device)
    b = bias.contiguous() if bias is not None else q  # q stands in for the pointer HAS_BIAS never reads
    _attention_fwd_kernel[(num_rows, heads)](rowptr, col, q, k, v, b, out, lse, heads, dqk, dv,
                                             *_split_scale(scale), HAS_BIAS=bias is not None,
                                             **_attention_meta(num_edges, num_rows, q, v))
    return out, lse


@triton.jit
def _attention_bwd_rows_kernel(rowptr_ptr, col_ptr, q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr, dout_ptr,
                               dq_ptr, p_ptr, ds_ptr, dbias_ptr, H, D, DV, scale_hi, scale_lo,
                               HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, ACC: tl.constexpr,
                               BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # Pass 1, program (target i, head h): recompute p = exp(s - lse), ds = p * (dO_i . v_j - dO_i . O_i),
    # accumulate dq_i, and leave p and ds per edge for pass 2, which cannot rebuild them without lse_i.
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    ih = i * H + h
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv < DV
    q_i = tl.load(q_ptr + ih * D + d, mask=d_mask, other=0.0).to(ACC)
    do_i = tl.load(dout_ptr + ih * DV + dv, mask=dv_mask, other=0.0).to(ACC)
    o_i = tl.load(out_ptr + ih * DV + dv, mask=dv_mask, other=0.0).to(ACC)
    delta = tl.sum(do_i * o_i, axis=0)
    lse = tl.load(lse_ptr + ih)
    # lse = -inf marks a row without a finite score: all its probabilities are 0.
    live = lse != float("-inf")
    start = tl.load(rowptr_ptr + i)
    end = tl.load(rowptr_ptr + i + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_mask = e < end
        j = tl.load(col_ptr + e, mask=e_mask, other=0)
        s = _scores(q_i, k_ptr, bias_ptr, j, e, e_mask, h, H, D, d, d_mask, scale, HAS_BIAS, ACC)
        p = tl.where(live, tl.exp(s - tl.where(live, lse, 0.0)), 0.0)
        v = tl.load(v_ptr + (j[:, None] * H + h) * DV + dv[None, :], mask=e_mask[:, None] & dv_mask[None, :],
                    other=0.0).to(ACC)
        ds = p * (tl.sum(do_i[None, :] * v, axis=1) - delta)
        tl.store(p_ptr + e * H + h, p, mask=e_mask)
        tl.store(ds_ptr + e * H + h, ds, mask=e_mask)
        if BIAS_GRAD:
            tl.store(dbias_ptr + e * H + h, ds.to(dbias_ptr.dtype.element_ty), mask=e_mask)
        k = tl.load(k_ptr + (j[:, None] * H + h) * D + d[None, :], mask=e_mask[:, None] & d_mask[None, :],
                    other=0.0).to(ACC)
        acc += tl.sum((scale * ds)[:, None] * k, axis=0)
    tl.store(dq_ptr + ih * D + d, acc.to(dq_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _attention_bwd_cols_kernel(rowptr_t_ptr, col_t_ptr, perm_t_ptr, q_ptr, dout_ptr, p_ptr, ds_ptr, dk_ptr, dv_ptr,
                               H, D, DV, scale_hi, scale_lo, ACC: tl.constexpr, BLOCK_E: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # Pass 2, program (source j, head h) over the transpose: dv_j = sum p dO_i, dk_j = sum scale ds q_i.
    # Owning source rows makes dk and dv atomic-free.
    j = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv < DV
    start = tl.load(rowptr_t_ptr + j)
    end = tl.load(rowptr_t_ptr + j + 1)
    acc_k = tl.zeros([BLOCK_D], dtype=ACC)
    acc_v = tl.zeros([BLOCK_DV], dtype=ACC)
    for t0 in range(start, end, BLOCK_E):
        t = t0 + tl.arange(0, BLOCK_E)
        t_mask = t < end
        i = tl.load(col_t_ptr + t, mask=t_mask, other=0)
        e = tl.load(perm_t_ptr + t, mask=t_mask, other=0)
        p = tl.load(p_ptr + e * H + h, mask=t_mask, other=0.0)
        ds = tl.load(ds_ptr + e * H + h, mask=t_mask, other=0.0)
        do = tl.load(dout_ptr + (i[:, None] * H + h) * DV + dv[None, :], mask=t_mask[:, None] & dv_mask[None, :],
                     other=0.0).to(ACC)
        acc_v += tl.sum(p[:, None] * do, axis=0)
        q = tl.load(q_ptr + (i[:, None] * H + h) * D + d[None, :], mask=t_mask[:, None] & d_mask[None, :],
                    other=0.0).to(ACC)
        acc_k += tl.sum((scale * ds)[:, None] * q, axis=0)
    tl.store(dk_ptr + (j * H + h) * D + d, acc_k.to(dk_ptr.dtype.element_ty), mask=d_mask)
    tl.store(dv_ptr + (j * H + h) * DV + dv, acc_v.to(dv_ptr.dtype.element_ty), mask=dv_mask)


def graph_attention_backward(rowptr, col, rowptr_t, col_t, perm_t, q, k, v, bias, out, lse, grad_out, scale,
                             bias_grad):
    q, k, v, out, grad_out = (t.contiguous() for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    num_rows, heads, dqk = q.shape
    num_cols, dv = v.shape[0], v.shape[2]
    num_edges = col.numel()
    dbias = q.new_zeros((num_edges, heads)) if bias_grad else q.new_empty(0)
    if num_edges == 0 or heads == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    dq, dk, dvt, dbias = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(dbias)
    # p and ds per edge, kept in the accumulation type like the CPU engine.
    probs = torch.empty((num_edges, heads), dtype=lse.dtype, device=q.device)
    dscore = torch.empty_like(probs)
    scale_hi, scale_lo = _split_scale(scale)
    b = bias.contiguous() if bias is not None else q
    _attention_bwd_rows_kernel[(num_rows, heads)](rowptr, col, q, k, v, b, out, lse, grad_out, dq, probs, dscore,
                                                  dbias if bias_grad else probs, heads, dqk, dv, scale_hi, scale_lo,
                                                  HAS_BIAS=bias is not None, BIAS_GRAD=bias_grad,
                                                  **_attention_meta(num_edges, num_rows, q, v))
    _attention_bwd_cols_kernel[(num_cols, heads)](rowptr_t, col_t, perm_t, q, grad_out, probs, dscore, dk, dvt,
                                                  heads, dqk, dv, scale_hi, scale_lo,
                                                  **_attention_meta(num_edges, num_cols, q, v))
    return dq, dk, dvt, dbias
