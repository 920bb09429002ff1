"""Reference semantics of the dense attention ops.

Layout as ``torch.nn.functional.scaled_dot_product_attention``: q ``[B, H, Nq, D]``, k ``[B, Hkv, Nk, D]``,
v ``[B, Hkv, Nk, Dv]`` with ``H % Hkv == 0``. ``bias`` is an additive float tensor broadcastable to
``[B, H, Nq, Nk]`` (``-inf`` masks a key). ``causal`` keeps key ``j`` for query ``i`` iff ``j <= i``. A query
that sees no key outputs 0 (SDPA gives NaN), and its row of the attention map is 0.
"""
from __future__ import annotations

import torch


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.size(1), dim=1) if t.size(1) != heads else t


def attention_scores(q, k, bias=None, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``q k^T * scale + bias`` with the causal mask applied, ``[B, H, Nq, Nk]``."""
    scale = q.size(-1) ** -0.5 if scale is None else scale
    s = torch.matmul(q, _expand_kv(k, q.size(1)).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if causal:
        nq, nk = s.shape[-2:]
        visible = torch.ones(nq, nk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    return s


def masked_softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension; a row whose scores are all -inf (no visible key) is 0 instead of NaN.
    NaN and +inf scores still make their row NaN, as in torch.softmax."""
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1)
    return p.masked_fill(empty, 0.0)


def attention_probs(q, k, bias=None, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Softmax over keys; rows with no visible key are 0 instead of NaN."""
    return masked_softmax(attention_scores(q, k, bias, causal, scale))


def attention(q, k, v, bias=None, causal: bool = False, scale: float | None = None, return_attn_mean: bool = False):
    """``softmax(q k^T * scale + bias) v``; with ``return_attn_mean`` also the head-averaged probabilities."""
    p = attention_probs(q, k, bias, causal, scale)
    out = torch.matmul(p, _expand_kv(v, q.size(1)))
    if return_attn_mean:
        return out, p.mean(dim=1)
    return out
