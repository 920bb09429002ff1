"""Reference semantics of the graph message-passing ops, in the shortest obviously-correct PyTorch.

Edges are given as ``target`` and ``source`` index vectors (PyG's ``edge_index[1]`` and ``edge_index[0]``)
in any order; messages flow source -> target. Node features are ``[N, H, F]``; per-edge values ``[E, H]``.
Empty groups reduce to 0; a target whose scores are all -inf gets softmax weights 0.
"""
from __future__ import annotations

import torch


def scatter(src: torch.Tensor, index: torch.Tensor, dim_size: int, reduce: str):
    """Reduce rows of ``src`` ([E, ...]) into ``dim_size`` groups given by ``index`` ([E]).

    Returns ``(out, arg)``; ``arg`` (max/min only, else None) holds the position in ``src`` of the winning
    row per output element, the lowest position on ties, ``src.size(0)`` for empty groups.
    """
    shape = (dim_size,) + tuple(src.shape[1:])
    idx = index.view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
    count = torch.zeros(dim_size, dtype=src.dtype, device=src.device).index_add_(
        0, index, torch.ones_like(index, dtype=src.dtype))
    count = count.view((-1,) + (1,) * (src.dim() - 1))
    if reduce in ("sum", "mean"):
        out = torch.zeros(shape, dtype=src.dtype, device=src.device).scatter_add(0, idx, src)
        if reduce == "mean":
            out = out / count.clamp(min=1)
        return out, None
    if reduce not in ("max", "min"):
        raise ValueError(f"reduce must be sum, mean, max or min, got {reduce!r}")
    amax = "amax" if reduce == "max" else "amin"
    best = torch.zeros(shape, dtype=src.dtype, device=src.device).scatter_reduce(
        0, idx, src.detach(), reduce=amax, include_self=False)
    # NaN wins a max/min (as in torch), so compare NaN-aware.
    winner = (src.detach() == best.gather(0, idx)) | (src.isnan() & best.gather(0, idx).isnan())
    pos = torch.arange(src.size(0), device=src.device).view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
    candidates = torch.where(winner, pos, torch.full_like(pos, src.size(0)))
    arg = torch.full(shape, src.size(0), dtype=torch.long, device=src.device).scatter_reduce(
        0, idx, candidates, reduce="amin", include_self=True)
    # The value (and so the gradient) is the winning element itself: ties go to the lowest position,
    # where torch.scatter_reduce would split the gradient between them.
    padded = torch.cat([src, src.new_zeros((1,) + tuple(src.shape[1:]))])
    return padded.gather(0, arg), arg


def spmm(target, source, num_targets: int, x, weight=None, reduce: str = "sum"):
    """``out[i] = reduce_{e: target[e] = i} weight[e] * x[source[e]]``; returns ``(out, arg_edge)``."""
    msg = x.index_select(0, source)
    if weight is not None:
        msg = msg * weight.unsqueeze(-1)
    return scatter(msg, target, num_targets, reduce)


def sddmm(target, source, a, b):
    """``out[e, h] = a[target[e], h] . b[source[e], h]``."""
    return (a.index_select(0, target) * b.index_select(0, source)).sum(-1)


def edge_softmax(target, scores, num_targets: int):
    """Softmax of ``scores`` ([E, H]) over the incoming edges of each target."""
    idx = target.view(-1, 1).expand_as(scores)
    peak = torch.full((num_targets, scores.size(1)), float("-inf"), dtype=scores.dtype, device=scores.device)
    peak = peak.scatter_reduce(0, idx, scores, reduce="amax", include_self=True)
    peak = torch.where(peak == float("-inf"), torch.zeros_like(peak), peak).detach()
    e = torch.exp(scores - peak.gather(0, idx))
    total = torch.zeros_like(peak).scatter_add(0, idx, e)
    # Only an empty (all -inf) target divides by a stand-in 1; a NaN total (a NaN or +inf score) makes every
    # weight of the target NaN, as torch.softmax and PyG's softmax do.
    return e / torch.where(total == 0, torch.ones_like(total), total).gather(0, idx)


def graph_attention(target, source, num_targets: int, q, k, v, scale: float, bias=None):
    """Per-head attention restricted to edges; returns ``(out [N, H, Dv], weights [E, H])``."""
    scores = sddmm(target, source, q, k) * scale
    if bias is not None:
        scores = scores + bias
    weights = edge_softmax(target, scores, num_targets)
    out, _ = spmm(target, source, num_targets, v, weights, "sum")
    return out, weights
