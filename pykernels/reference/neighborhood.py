"""Reference semantics of 2-D neighbourhood attention (NATTEN's): masked dense attention.

Tokens are row-major over ``spatial_shape = (H, W)``; q, k ``[B, heads, H*W, D]``, v ``[B, heads, H*W, Dv]``.
Along each axis, with dilation ``d``, query ``p`` sees the keys of its own residue class ``p mod d`` only: on
that class's sub-axis (positions ``r, r + d, r + 2d, ...``) it sees ``kernel`` consecutive positions centred
on it, shifted inwards where the sub-axis ends (NATTEN's ``get_window_start``). The relative position bias
``rpb [heads, 2 kh - 1, 2 kw - 1]`` adds ``rpb[h, (ky - qy) / dh + kh - 1, (kx - qx) / dw + kw - 1]``
(NATTEN's ``get_pb_start`` plus the window offset). Scores are ``q k^T * scale + rpb``. A query whose scores
are all -inf outputs zeros, as fused attention's does.
"""
from __future__ import annotations

import torch

from .attention import masked_softmax


def pair(value, name: str = "value") -> tuple[int, int]:
    """An int or an (h, w) pair as a pair of ints."""
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value}")
    return int(value[0]), int(value[1])


def _axis(length: int, kernel: int, dilation: int, device=None):
    """``visible[p, j]``: query p sees key j along one axis; ``offset[p, j]``: the rpb index of key j."""
    p = torch.arange(length, device=device)
    residue, sub = p % dilation, p // dilation
    class_length = (length - residue + dilation - 1) // dilation
    start = (sub - kernel // 2).clamp(min=0).minimum(class_length - kernel)
    key_sub, same_class = p[None, :] // dilation, residue[None, :] == residue[:, None]
    visible = same_class & (key_sub >= start[:, None]) & (key_sub < start[:, None] + kernel)
    offset = (key_sub - sub[:, None] + kernel - 1).clamp(0, 2 * kernel - 2)
    return visible, offset


def neighborhood_mask(spatial_shape, kernel_size, dilation=1, device=None) -> torch.Tensor:
    """Bool ``[H*W, H*W]``: entry ``[query, key]`` is True where the query sees the key."""
    (h, w), (kh, kw), (dh, dw) = pair(spatial_shape), pair(kernel_size), pair(dilation)
    vy, _ = _axis(h, kh, dh, device)
    vx, _ = _axis(w, kw, dw, device)
    return (vy[:, None, :, None] & vx[None, :, None, :]).reshape(h * w, h * w)


def relative_position_bias(rpb: torch.Tensor, spatial_shape, kernel_size, dilation=1) -> torch.Tensor:
    """``[heads, H*W, H*W]``: rpb gathered at every (query, key) pair; meaningful where the mask is True."""
    (h, w), (kh, kw), (dh, dw) = pair(spatial_shape), pair(kernel_size), pair(dilation)
    _, oy = _axis(h, kh, dh, rpb.device)
    _, ox = _axis(w, kw, dw, rpb.device)
    return rpb[:, oy[:, None, :, None], ox[None, :, None, :]].reshape(rpb.size(0), h * w, h * w)


def neighborhood_attention_2d(q, k, v, spatial_shape, kernel_size, dilation=1, rpb=None, scale=None):
    """``softmax(q k^T * scale + rpb, masked to each query's neighbourhood) v``."""
    scale = q.size(-1) ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if rpb is not None:
        s = s + relative_position_bias(rpb, spatial_shape, kernel_size, dilation)
    s = s.masked_fill(~neighborhood_mask(spatial_shape, kernel_size, dilation, q.device), float("-inf"))
    return torch.matmul(masked_softmax(s), v)
