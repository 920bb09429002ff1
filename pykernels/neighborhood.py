"""2-D neighbourhood attention (NATTEN's semantics) on token sequences laid out row-major over a map."""
from __future__ import annotations

import torch

from . import _backend, _neighborhood_ops  # noqa: F401  (_neighborhood_ops registers fake kernels and autograd)
from ._checks import check_grid_qkv, check_param_tensor, check_scale, int_pair, last_dim_contiguous
from .reference import neighborhood as ref

__all__ = ["neighborhood_attention_2d"]

_OP = "pykernels.neighborhood_attention_2d"


def _check_geometry(spatial_shape, kernel_size, dilation):
    (h, w), (kh, kw), (dh, dw) = spatial_shape, kernel_size, dilation
    if kh < 1 or kw < 1 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"{_OP}: kernel_size must be odd and positive, got {kernel_size}")
    if dh < 1 or dw < 1:
        raise ValueError(f"{_OP}: dilation must be positive, got {dilation}")
    for axis, length, kernel, dil in (("height", h, kh, dh), ("width", w, kw, dw)):
        if kernel * dil > length:
            raise ValueError(f"{_OP}: kernel_size * dilation along the {axis} ({kernel} * {dil}) must not exceed "
                             f"the map's {axis} {length}")


def _check_rpb(rpb, q, kernel_size):
    if rpb is None:
        return None
    rpb = check_param_tensor(_OP, "rel_pos_bias", rpb, q)
    expected = [q.size(1), 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1]
    if list(rpb.shape) != expected:
        raise ValueError(f"{_OP}: rel_pos_bias must be [heads, 2*kh - 1, 2*kw - 1] = {expected}, "
                         f"got {list(rpb.shape)}")
    return rpb


def neighborhood_attention_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spatial_shape, kernel_size,
                              dilation=1, rel_pos_bias: torch.Tensor | None = None, scale: float | None = None,
                              backend: str = "auto") -> torch.Tensor:
    """2-D neighbourhood attention with NATTEN's semantics, without materialising any attention matrix.

    q, k ``[B, heads, H*W, D]``, v ``[B, heads, H*W, Dv]``, tokens row-major over ``spatial_shape = (H, W)``.
    Query ``(y, x)`` attends to the ``kernel_size`` window of keys centred on it, shifted inwards (not
    wrapped) at the borders. With ``dilation`` d a query sees only keys of its own residue class mod d, and
    the window is taken (and shifted at the borders) on that class's sub-grid, as in NATTEN.
    ``rel_pos_bias`` ``[heads, 2*kh - 1, 2*kw - 1]`` is NATTEN's relative position bias, indexed by the
    key's offset from the query in dilated steps; it receives a gradient. ``kernel_size`` (odd) and
    ``dilation`` are ints or (h, w) pairs, with ``kernel_size * dilation <= (H, W)``. A query whose
    neighbourhood scores are all ``-inf`` outputs zeros, as in :func:`pykernels.fused_attention`.
    """
    spatial = check_grid_qkv(_OP, q, k, v, spatial_shape)
    kernel = int_pair(_OP, "kernel_size", kernel_size, 0)
    dil = int_pair(_OP, "dilation", dilation, 0)
    _check_geometry(spatial, kernel, dil)
    rpb = _check_rpb(rel_pos_bias, q, kernel)
    scale = check_scale(_OP, scale, q.size(-1))
    engine = _backend.select(_OP, backend, q.device)
    if engine == "reference":
        return ref.neighborhood_attention_2d(q, k, v, spatial, kernel, dil, rpb, scale)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    ns = getattr(torch.ops, _backend.namespace(engine, q.device))
    out, _ = ns.neighborhood_attention_2d(q, k, v, list(spatial), list(kernel), list(dil), rpb, float(scale))
    return out
