"""Fused attention: FlashAttention-style forward and backward, and a fused head-averaged attention map."""
from __future__ import annotations

import torch

from . import _attention_ops, _backend  # noqa: F401  (_attention_ops registers fake kernels and autograd)
from ._checks import check_qkv_tensors, check_scale, last_dim_contiguous
from .reference import attention as ref

__all__ = ["fused_attention"]

_OP = "pykernels.fused_attention"


def _check_qkv(q, k, v):
    check_qkv_tensors(_OP, q, k, v, "tokens")
    b, h, _, d = q.shape
    if k.size(0) != b or v.size(0) != b:
        raise ValueError(f"{_OP}: batch sizes differ: q {b}, k {k.size(0)}, v {v.size(0)}")
    if k.size(1) != v.size(1):
        raise ValueError(f"{_OP}: k and v must have the same number of heads, got {k.size(1)} and {v.size(1)}")
    if k.size(1) == 0 or h % k.size(1) != 0:
        raise ValueError(f"{_OP}: the {h} query heads must be a multiple of the {k.size(1)} key/value heads")
    if k.size(3) != d:
        raise ValueError(f"{_OP}: q and k head dims differ: {d} and {k.size(3)}")
    if k.size(2) != v.size(2):
        raise ValueError(f"{_OP}: k and v token counts differ: {k.size(2)} and {v.size(2)}")
    if d == 0:
        raise ValueError(f"{_OP}: the head dim must be positive")


def _bias_from(attn_bias, q, k):
    """A float additive bias expanded (no copy) to ``[B, H, Nq, Nk]``; a bool mask becomes 0 / -inf."""
    if attn_bias is None:
        return None
    if not isinstance(attn_bias, torch.Tensor):
        raise TypeError(f"{_OP}: attn_bias must be a tensor, got {type(attn_bias).__name__}")
    if attn_bias.device != q.device:
        raise ValueError(f"{_OP}: attn_bias is on {attn_bias.device}, q on {q.device}")
    full = (q.size(0), q.size(1), q.size(2), k.size(2))
    try:
        broadcast = torch.broadcast_shapes(attn_bias.shape, full)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(full):
        raise ValueError(f"{_OP}: attn_bias of shape {list(attn_bias.shape)} is not broadcastable to "
                         f"[B, H, Nq, Nk] = {list(full)}")
    if attn_bias.dtype == torch.bool:
        attn_bias = torch.zeros(attn_bias.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_bias,
                                                                                           float("-inf"))
    elif attn_bias.is_floating_point():
        attn_bias = attn_bias.to(q.dtype)
    else:
        raise TypeError(f"{_OP}: attn_bias must be a floating bias or a bool mask, got {attn_bias.dtype}")
    return attn_bias.expand(full)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_bias: torch.Tensor | None = None,
                    causal: bool = False, scale: float | None = None, return_attn_mean: bool = False,
                    backend: str = "auto"):
    """``softmax(q kᵀ · scale + attn_bias) v`` without materialising the attention matrix.

    Layout as ``scaled_dot_product_attention``: q ``[B, H, Nq, D]``, k ``[B, Hkv, Nk, D]``, v
    ``[B, Hkv, Nk, Dv]``; grouped-query attention when ``H`` is a multiple of ``Hkv``. ``attn_bias`` is a float
    additive bias (it receives a gradient) or a bool mask (True takes part), broadcastable to
    ``[B, H, Nq, Nk]`` and never expanded in memory. ``causal`` follows SDPA's ``is_causal`` (top-left).
    A query whose keys are all masked outputs zeros; SDPA outputs NaN there.

    With ``return_attn_mean=True`` also returns the head-averaged attention probabilities ``[B, Nq, Nk]``,
    computed by a fused kernel from the forward's log-sum-exp (no ``[B, H, Nq, Nk]`` tensor) and
    differentiable with respect to q, k and the bias.
    """
    _check_qkv(q, k, v)
    bias = _bias_from(attn_bias, q, k)
    scale = check_scale(_OP, scale, q.size(-1))
    engine = _backend.select(_OP, backend, q.device)
    if engine == "reference":
        return ref.attention(q, k, v, bias, causal, scale, return_attn_mean)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    ns = getattr(torch.ops, _backend.namespace(engine, q.device))
    if not return_attn_mean:
        return ns.attention(q, k, v, bias, bool(causal), float(scale))[0]
    out, _lse, attn_mean = ns.attention_with_map(q, k, v, bias, bool(causal), float(scale))
    return out, attn_mean
