"""Reference semantics of the windowed attention ops: Swin's shifted windows and HiDiffusion's MSW-MSA.

Tokens are ``[B, heads, H * W, D]``, row-major over the ``(H, W)`` grid. ``window_attention`` is what timm's
``SwinTransformerBlock._attn`` computes around ``WindowAttention`` (timm/models/swin_transformer.py), spelt out
as the copies it makes: roll by ``-shift``, pad bottom/right to whole windows, partition, attention with the
relative-position bias and the -100 region mask, reverse, crop, roll back. Window and shift arrive already
normalised (pairs, no clamping to the grid: see ``pykernels.window.swin_window_shift``).

``msw_msa`` is HiDiffusion's multi-scale shifted-window attention as ``transformer_block.forward`` in
hidiffusion/hidiffusion.py does it: a 2 x 2 grid of windows, a roll without any mask, and a bicubic resample
to ``(2 wh, 2 ww)`` and back when the grid has an odd side.

In both, a query whose scores are all -inf outputs zeros (fused attention's rule) where torch.softmax, and so
timm and HiDiffusion, give NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import masked_softmax

SHIFT_MASK_VALUE = -100.0


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """``[n, n]`` (``n = wh * ww``) rows into Swin's ``[(2 wh - 1)(2 ww - 1), heads]`` bias table."""
    wh, ww = window
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    dy = ys.flatten()[:, None] - ys.flatten()[None, :]
    dx = xs.flatten()[:, None] - xs.flatten()[None, :]
    return (dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)


def table_to_dense(bias_table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """The table gathered to the dense ``[heads, n, n]`` bias."""
    n = window[0] * window[1]
    index = relative_position_index(window).to(bias_table.device)
    return bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)


def shift_regions(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Region id of every cell of the padded grid, labelled exactly as timm's ``get_attn_mask`` does."""
    regions = torch.zeros(padded, dtype=torch.long)
    cnt = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[h[0]:h[1], w[0]:w[1]] = cnt
            cnt += 1
    return regions


def _partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``[..., Hp, Wp, C]`` -> ``[..., windows, wh * ww, C]``, windows and positions row-major."""
    *lead, hp, wp, c = x.shape
    wh, ww = window
    x = x.reshape(*lead, hp // wh, wh, wp // ww, ww, c).transpose(-4, -3)
    return x.reshape(*lead, (hp // wh) * (wp // ww), wh * ww, c)


def _reverse(windows: torch.Tensor, window: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
    *lead, _, _, c = windows.shape
    wh, ww = window
    hp, wp = padded
    x = windows.reshape(*lead, hp // wh, wp // ww, wh, ww, c).transpose(-4, -3)
    return x.reshape(*lead, hp, wp, c)


def window_attention(q, k, v, spatial_shape, window, shift, bias_table=None, dense_bias=None, pad_kv=None,
                     shift_mask: bool = True, scale: float | None = None) -> torch.Tensor:
    """Swin (shifted) window attention; returns ``[B, heads, H * W, Dv]``.

    Pad tokens are keys/values ``pad_kv[0, h]`` / ``pad_kv[1, h]`` (zeros when None); their query rows are
    computed and thrown away, as in timm.
    """
    height, width = spatial_shape
    wh, ww = window
    sh, sw = shift
    b, heads, _, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    hp, wp = math.ceil(height / wh) * wh, math.ceil(width / ww) * ww

    def grid(x, pad_value):
        x = x.reshape(b, heads, height, width, x.size(-1))
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(2, 3))
        padded = pad_value.view(1, heads, 1, 1, -1).expand(b, heads, hp, wp, x.size(-1)).clone()
        padded[:, :, :height, :width] = x
        return _partition(padded, window)

    pad_k = k.new_zeros(heads, d) if pad_kv is None else pad_kv[0]
    pad_v = v.new_zeros(heads, v.size(-1)) if pad_kv is None else pad_kv[1]
    qw, kw, vw = grid(q, q.new_zeros(heads, d)), grid(k, pad_k), grid(v, pad_v)
    scores = qw @ kw.transpose(-1, -2) * scale  # [B, heads, windows, n, n]
    if bias_table is not None:
        dense_bias = table_to_dense(bias_table, window)
    if dense_bias is not None:
        scores = scores + dense_bias[:, None]
    if shift_mask and (sh or sw):
        labels = _partition(shift_regions((hp, wp), window, shift)[..., None], window)[..., 0].to(q.device)
        differ = labels[:, None, :] != labels[:, :, None]
        scores = scores + differ.to(scores.dtype) * SHIFT_MASK_VALUE
    out = masked_softmax(scores) @ vw
    out = _reverse(out, window, (hp, wp))[:, :, :height, :width]
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(2, 3))
    return out.reshape(b, heads, height * width, -1)


def msw_msa_window(spatial_shape) -> tuple[int, int]:
    """HiDiffusion's window: half the grid, rounded up, so that 2 x 2 windows cover it."""
    return math.ceil(spatial_shape[0] / 2), math.ceil(spatial_shape[1] / 2)


def msw_msa(q, k, v, spatial_shape, shift, scale: float | None = None) -> torch.Tensor:
    """HiDiffusion's MSW-MSA step by step, on q, k, v instead of the hidden states.

    Every step before and after the attention (resample, roll, partition) acts on tokens one channel at a
    time, and the projections act on channels one token at a time, so doing them on q, k, v and on the
    attention output gives what HiDiffusion gets on hidden states. As HiDiffusion, the roll is skipped when
    ``shift[0] == 0``, whatever ``shift[1]`` is.
    """
    height, width = spatial_shape
    wh, ww = msw_msa_window(spatial_shape)
    b, heads, _, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    odd = height % 2 != 0 or width % 2 != 0

    def to_windows(x):
        c = heads * x.size(-1)
        x = x.permute(0, 2, 1, 3).reshape(b, height, width, c)
        if odd:
            x = F.interpolate(x.permute(0, 3, 1, 2), size=(2 * wh, 2 * ww), mode="bicubic").permute(0, 2, 3, 1)
        if shift[0] > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = x.reshape(b, 2, wh, 2, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, wh * ww, heads, -1)
        return x.transpose(1, 2)

    qw, kw, vw = to_windows(q), to_windows(k), to_windows(v)
    out = masked_softmax(qw @ kw.transpose(-1, -2) * scale) @ vw  # [4B, heads, n, Dv]
    c = heads * out.size(-1)
    x = out.transpose(1, 2).reshape(b, 2, 2, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * wh, 2 * ww, c)
    if shift[0] > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    if odd:
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(height, width), mode="bicubic").permute(0, 2, 3, 1)
    return x.reshape(b, height * width, heads, -1).transpose(1, 2)
