"""Windowed attention: Swin's (shifted) window attention and HiDiffusion's MSW-MSA, without the copies.

Tokens are ``[B, heads, H * W, D]``, row-major over the ``(H, W)`` grid. The engines never roll, pad,
partition or reverse the grid: every query finds its window, its shifted neighbours, their relative-position
bias and their shift-mask region by index arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend, _window_ops  # noqa: F401  (_window_ops registers fake kernels and autograd)
from ._checks import check_grid_qkv, check_param_tensor, check_scale, int_pair, last_dim_contiguous
from .reference import window as ref

__all__ = ["msw_msa", "msw_msa_shift", "swin_window_shift", "window_attention"]


def swin_window_shift(spatial_shape, window_size, shift_size=0) -> tuple[tuple[int, int], tuple[int, int]]:
    """The window and shift Swin uses on an ``(H, W)`` grid, as timm's ``_calc_window_shift`` decides them.

    Along an axis no longer than the window, the window shrinks to the axis and the shift is dropped (one
    window covers it, so shifting would only move the seam). ``shift >= window`` is an error.
    """
    op = "pykernels.window_attention"
    spatial = int_pair(op, "spatial_shape", spatial_shape, 1)
    window = int_pair(op, "window_size", window_size, 1)
    shift = int_pair(op, "shift_size", shift_size, 0)
    if shift[0] >= window[0] or shift[1] >= window[1]:
        raise ValueError(f"{op}: shift_size {shift} must be smaller than window_size {window} on both axes")
    clamped = tuple(min(r, w) for r, w in zip(spatial, window))
    return clamped, tuple(0 if r <= w else s for r, w, s in zip(spatial, window, shift))


def _split_bias(op: str, rel_pos_bias, q, requested, window):
    """``(bias_table, dense_bias)`` from a table ``[(2wh-1)(2ww-1), heads]`` or a dense ``[heads, n, n]``."""
    if rel_pos_bias is None:
        return None, None
    bias = check_param_tensor(op, "rel_pos_bias", rel_pos_bias, q)
    heads, n = q.size(1), window[0] * window[1]
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    if bias.dim() == 2:
        if bias.shape == (rows, heads):
            return bias.contiguous(), None
        clamped = "" if window == requested else (
            f" (the window is clamped from {requested} to the {window} grid as timm does, and the table must "
            "follow it, e.g. timm's resize_rel_pos_bias_table)")
        raise ValueError(f"{op}: a relative-position table for window {window} and {heads} heads must be "
                         f"[{rows}, {heads}], got {list(bias.shape)} as rel_pos_bias{clamped}")
    if bias.dim() == 3:
        if bias.shape != (heads, n, n):
            raise ValueError(f"{op}: a dense rel_pos_bias for window {window} and {heads} heads must be "
                             f"[{heads}, {n}, {n}], got {list(bias.shape)}")
        return None, bias
    raise ValueError(f"{op}: rel_pos_bias must be a table [(2wh-1)(2ww-1), heads] or dense [heads, wh*ww, wh*ww], "
                     f"got {list(bias.shape)}")


def _pad_kv(op: str, pad_kv, q, v):
    if pad_kv is None:
        return None
    pad_kv = check_param_tensor(op, "pad_kv", pad_kv, q)
    if v.size(3) != q.size(3):
        raise ValueError(f"{op}: pad_kv needs v's head dim ({v.size(3)}) equal to q's ({q.size(3)})")
    if pad_kv.shape != (2, q.size(1), q.size(3)):
        raise ValueError(f"{op}: pad_kv must be [2, heads, D] = [2, {q.size(1)}, {q.size(3)}], got "
                         f"{list(pad_kv.shape)}")
    return pad_kv.contiguous()


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spatial_shape, window_size, shift_size=0,
                     rel_pos_bias: torch.Tensor | None = None, shift_mask: bool = True, scale: float | None = None,
                     pad_kv: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Swin's (shifted) window attention over a token grid, as timm's ``SwinTransformerBlock`` computes it.

    q, k ``[B, heads, H * W, D]`` and v ``[B, heads, H * W, Dv]``, tokens row-major over
    ``spatial_shape = (H, W)``; returns ``[B, heads, H * W, Dv]``. The grid is rolled by ``-shift_size``
    (``torch.roll``), padded bottom/right to whole windows, cut into windows of ``window_size``, each window
    attends to itself (``softmax(q kᵀ · scale + bias + mask) v``), and the result is rolled back.
    ``window_size`` and ``shift_size`` are ints or ``(h, w)`` pairs; ``shift_size`` must be smaller than the
    window. Along an axis no longer than the window, the window shrinks to that axis and its shift is dropped,
    as timm's ``_calc_window_shift`` does (see :func:`swin_window_shift`).

    * ``rel_pos_bias``: Swin's table ``[(2wh - 1)(2ww - 1), heads]`` (``relative_position_bias_table``),
      gathered per query/key pair exactly as timm's ``relative_position_index``, or a dense
      ``[heads, wh * ww, wh * ww]`` bias. Both receive a gradient.
    * ``shift_mask``: with a shift, adds -100 between tokens of different Swin regions of the padded grid
      (timm's ``get_attn_mask``). ``False`` lets tokens wrapping around the border attend freely (MSW-MSA).
    * ``pad_kv``: ``[2, heads, D]``, the key and value of the pad tokens (zeros when None). timm pads the
      features before the qkv projection, so there they equal the projection's bias: pass
      ``qkv.bias.view(3, heads, D)[1:]`` to match timm exactly, gradient included. Pad tokens are keys only;
      their outputs are dropped.

    A query whose window scores are all ``-inf`` (a ``-inf`` bias) outputs zeros, as in
    :func:`pykernels.fused_attention`; timm's softmax gives NaN there.
    """
    op = "pykernels.window_attention"
    spatial = check_grid_qkv(op, q, k, v, spatial_shape)
    requested = int_pair(op, "window_size", window_size, 1)
    window, shift = swin_window_shift(spatial, window_size, shift_size)
    bias_table, dense_bias = _split_bias(op, rel_pos_bias, q, requested, window)
    pad = _pad_kv(op, pad_kv, q, v)
    scale = check_scale(op, scale, q.size(-1))
    shift_mask = bool(shift_mask)
    engine = _backend.select(op, backend, q.device)
    if engine == "reference":
        return ref.window_attention(q, k, v, spatial, window, shift, bias_table, dense_bias, pad, shift_mask, scale)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    ns = getattr(torch.ops, _backend.namespace(engine, q.device))
    out, _ = ns.window_attention(q, k, v, list(spatial), list(window), list(shift), bias_table, dense_bias, pad,
                                 shift_mask, scale)
    return out


def msw_msa_shift(spatial_shape, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Draws HiDiffusion's MSW-MSA shift: 0, 1/4, 1/2 or 3/4 of the window, ``(wh // 4 * i, ww // 4 * i)``.

    The draw is HiDiffusion's own (one ``torch.rand(1)`` against quarters), so the default generator
    seeded as HiDiffusion's was picks the same shifts.
    """
    wh, ww = ref.msw_msa_window(int_pair("pykernels.msw_msa", "spatial_shape", spatial_shape, 1))
    u = torch.rand(1, generator=generator, device=generator.device if generator is not None else "cpu").item()
    i = 0 if u <= 0.25 else 1 if u <= 0.5 else 2 if u <= 0.75 else 3
    return wh // 4 * i, ww // 4 * i


def _resample(x: torch.Tensor, spatial, size) -> torch.Tensor:
    """HiDiffusion's bicubic resample of a token grid, on ``[B, heads, H * W, C]``."""
    b, heads, _, c = x.shape
    grid = x.reshape(b, heads, *spatial, c).permute(0, 1, 4, 2, 3).reshape(b, heads * c, *spatial)
    grid = F.interpolate(grid, size=size, mode="bicubic")
    return grid.reshape(b, heads, c, size[0] * size[1]).transpose(-1, -2)


def msw_msa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spatial_shape, shift=None,
            generator: torch.Generator | None = None, scale: float | None = None,
            backend: str = "auto") -> torch.Tensor:
    """HiDiffusion's multi-scale shifted-window self-attention (MSW-MSA), ``transformer_block.forward`` in
    hidiffusion/hidiffusion.py, on q, k, v ``[B, heads, H * W, D]``.

    A 2 x 2 grid of windows of ``(ceil(H / 2), ceil(W / 2))``, shifted by ``shift`` with tokens wrapping
    around the border and no mask. ``shift`` is an int or ``(h, w)`` pair smaller than the window; None draws
    HiDiffusion's random shift (:func:`msw_msa_shift`, reproducible with ``generator``; the draw reads a
    number on the host, so pass ``shift`` explicitly under ``torch.compile(fullgraph=True)``). As in
    HiDiffusion, no roll happens when the vertical shift is 0. With an odd ``H`` or ``W`` HiDiffusion warns
    and resamples the grid bicubically to ``(2 wh, 2 ww)`` and back around the attention; so does this
    function, which keeps its results identical to HiDiffusion's (and as degraded). A query whose window
    scores are all ``-inf`` outputs zeros, as in :func:`pykernels.fused_attention`; HiDiffusion's softmax gives
    NaN there.
    """
    op = "pykernels.msw_msa"
    spatial = check_grid_qkv(op, q, k, v, spatial_shape)
    window = ref.msw_msa_window(spatial)
    if shift is None:
        shift = msw_msa_shift(spatial, generator)
    shift = int_pair(op, "shift", shift, 0)
    if shift[0] >= window[0] or shift[1] >= window[1]:
        raise ValueError(f"{op}: shift {shift} must be smaller than the window {window} on both axes")
    checked_scale = check_scale(op, scale, q.size(-1))
    if _backend.select(op, backend, q.device) == "reference":
        return ref.msw_msa(q, k, v, spatial, shift, checked_scale)
    grid = (2 * window[0], 2 * window[1])
    odd = grid != spatial
    if odd:
        q, k, v = (_resample(t, spatial, grid) for t in (q, k, v))
    # The caller's scale, not checked_scale: under torch.compile(dynamic=True) the default D ** -0.5 is a
    # symbolic float, which window_attention's check cannot test for finiteness without a graph break; given
    # None it derives the same value itself (the resample keeps the head dim).
    out = window_attention(q, k, v, grid, window, shift if shift[0] > 0 else 0, shift_mask=False, scale=scale,
                           backend=backend)
    return _resample(out, grid, spatial) if odd else out
