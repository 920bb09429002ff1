"""2-D neighbourhood attention (NATTEN's semantics) on token sequences laid out row-major over a map."""
from __future__ import annotations

import torch

from . import _backend, _neighborhood_ops  # noqa: F401  (_neighborhood_ops registers fake kernels and autograd)
from .reference import neighborhood as ref

__all__ = ["neighborhood_attention_2d"]

_OP = "pykernels.neighborhood_attention_2d"
_NAMESPACE = {"cpu": "pykernels", "cuda": "pykernels", "triton": "pykernels_triton"}


def _int_pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{_OP}: {name} must be an int or a pair of ints (h, w), got {value!r}")
    if isinstance(value, int):
        return value, value
    try:
        pair = tuple(value)
    except TypeError:
        raise TypeError(f"{_OP}: {name} must be an int or a pair of ints (h, w), got {value!r}") from None
    if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
        raise TypeError(f"{_OP}: {name} must be an int or a pair of ints (h, w), got {value!r}")
    return pair


def _check_tensors(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{_OP}: {name} must be a floating tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name} must be 4-D [B, heads, H*W, head_dim], got {list(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{_OP}: {name} is on {t.device}, q on {q.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: {name} has dtype {t.dtype}, q has {q.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"{_OP}: k must have q's shape {list(q.shape)}, got {list(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{_OP}: v must be [B, heads, H*W, Dv] with q's first three sizes {list(q.shape[:3])}, "
                         f"got {list(v.shape)}")
    if q.size(3) == 0:
        raise ValueError(f"{_OP}: the head dim must be positive")


def _check_geometry(tokens, spatial_shape, kernel_size, dilation):
    (h, w), (kh, kw), (dh, dw) = spatial_shape, kernel_size, dilation
    if h < 1 or w < 1:
        raise ValueError(f"{_OP}: spatial_shape must be positive, got {spatial_shape}")
    if h * w != tokens:
        raise ValueError(f"{_OP}: spatial_shape {spatial_shape} holds {h * w} tokens, but q has {tokens}")
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
    if not isinstance(rpb, torch.Tensor):
        raise TypeError(f"{_OP}: rel_pos_bias must be a tensor, got {type(rpb).__name__}")
    if not rpb.is_floating_point():
        raise TypeError(f"{_OP}: rel_pos_bias must be a floating tensor, got {rpb.dtype}")
    if rpb.device != q.device:
        raise ValueError(f"{_OP}: rel_pos_bias is on {rpb.device}, q on {q.device}")
    expected = [q.size(1), 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1]
    if list(rpb.shape) != expected:
        raise ValueError(f"{_OP}: rel_pos_bias must be [heads, 2*kh - 1, 2*kw - 1] = {expected}, "
                         f"got {list(rpb.shape)}")
    return rpb.to(q.dtype)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.size(-1) <= 1 else t.contiguous()


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
    ``dilation`` are ints or (h, w) pairs, with ``kernel_size * dilation <= (H, W)``.
    """
    _check_tensors(q, k, v)
    spatial = _int_pair(spatial_shape, "spatial_shape")
    kernel = _int_pair(kernel_size, "kernel_size")
    dil = _int_pair(dilation, "dilation")
    _check_geometry(q.size(2), spatial, kernel, dil)
    rpb = _check_rpb(rel_pos_bias, q, kernel)
    if scale is None:
        scale = q.size(-1) ** -0.5
    engine = _backend.select(_OP, backend, q.device)
    if engine == "reference":
        return ref.neighborhood_attention_2d(q, k, v, spatial, kernel, dil, rpb, scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    ns = getattr(torch.ops, _NAMESPACE[engine])
    out, _ = ns.neighborhood_attention_2d(q, k, v, list(spatial), list(kernel), list(dil), rpb, float(scale))
    return out
