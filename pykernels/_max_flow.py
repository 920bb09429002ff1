"""Exact maximum flow: on the layered DAG of attention maps (Abnar & Zuidema's attention flow) and on
arbitrary directed graphs.

Both run the C++ CPU engine (``csrc/flow/max_flow.h``): highest-label push-relabel with global relabelling and
the gap heuristic, stopped after its first phase (the preflow's excess at the sink is the max-flow value).
Queries run in parallel over ``torch.get_num_threads()`` threads, each on its own residual graph, so results
do not depend on the thread count. Inputs on another device are copied to the CPU; the result comes back on
the input's device, as float64.

Numerics: capacities are converted to float64 and never rounded to integers. A residual capacity or a node
excess at or below ``eps = 1e-12 * (largest capacity)`` counts as zero; the value returned is below the exact
one by at most ``(nodes + 2 * edges) * eps`` and never above it beyond float64 rounding.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from . import _flow_ops  # noqa: F401  (registers the fake kernels of both ops)
from .reference.flow import with_residual

__all__ = ["max_flow", "max_flow_layered"]


def _check_capacities(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if t.numel():
        lo, hi = (float(x) for x in torch.aminmax(t.detach()))  # one pass; a NaN propagates to both
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{op}: {name} holds NaN or infinite values; capacities must be finite")
        if lo < 0:
            raise ValueError(f"{op}: {name} holds negative values; capacities must be >= 0")


def _queries(op: str, name: str, value) -> tuple[torch.Tensor, bool]:
    """An int or a 1-D integer tensor of queries as an int64 CPU tensor, plus whether it was a scalar."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be an int or an int32/int64 tensor, got {value.dtype}")
        if value.dim() > 1:
            raise ValueError(f"{op}: {name} must be an int or a 1-D tensor, got shape {list(value.shape)}")
        return value.detach().reshape(-1).to("cpu", torch.int64).contiguous(), value.dim() == 0
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int or a 1-D integer tensor, got {type(value).__name__}")
    return torch.tensor([int(value)], dtype=torch.int64), True


def _check_range(op: str, name: str, q: torch.Tensor, size: int, what: str) -> None:
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= size):
        bad = int(q[(q < 0) | (q >= size)][0])
        raise IndexError(f"{op}: {name} holds {bad}, out of range for {size} {what}")


def _pair_queries(op: str, sources, sinks):
    s, s_scalar = _queries(op, "sources" if op.endswith("layered") else "source", sources)
    t, t_scalar = _queries(op, "sinks" if op.endswith("layered") else "sink", sinks)
    if s_scalar and not t_scalar:
        s = s.expand(t.numel()).contiguous()
    elif t_scalar and not s_scalar:
        t = t.expand(s.numel()).contiguous()
    elif s.numel() != t.numel():
        raise ValueError(f"{op}: sources and sinks must have equal length, got {s.numel()} and {t.numel()}")
    return s, t, s_scalar and t_scalar


def max_flow_layered(maps, sources=None, sinks=None, residual: float = 0.5) -> torch.Tensor:
    """Maximum flow through the layered DAG of attention maps (attention flow, exact).

    ``maps`` are ordered first layer to last (a sequence of tensors, or one tensor iterated along dim 0, as in
    ``pykernels.reference.flow``); ``maps[l]`` is ``[..., n_{l+1}, n_l]`` with rows receiving, like an
    attention map, and every map has the same leading batch shape (batch elements are solved one after the
    other, each with all threads over its queries). Node ``(l, j)`` has an edge to ``(l + 1, i)`` of capacity
    ``Â_l[i, j]``, where ``Â_l = with_residual(maps[l], residual)``: ``(1 - r) A_l + r I`` with rows
    renormalised to sum 1 (rows summing to 0 stay 0), computed in float64. ``residual`` is in ``[0, 1]``;
    a nonzero one needs square maps.

    With ``sources`` and ``sinks`` both None, returns all pairs: ``out[..., i, j]`` is the max-flow from node
    ``j`` of layer 0 to node ``i`` of the last layer, shape ``[..., n_L, n_0]`` (the layout of a rollout
    matrix). Otherwise ``sources`` (layer-0 tokens) and ``sinks`` (last-layer tokens) are ints or 1-D integer
    tensors of equal length ``Q`` (an int pairs with every entry of the other), and the result is ``[..., Q]``
    (``[...]`` for two ints). Always float64. Out-of-range indices raise ``IndexError``.
    """
    op = "pykernels.max_flow_layered"
    if isinstance(maps, torch.Tensor):
        maps = list(maps.unbind(0)) if maps.dim() else maps
    if not isinstance(maps, Sequence) or isinstance(maps, (str, bytes)):
        raise TypeError(f"{op}: maps must be a sequence of tensors, got {type(maps).__name__}")
    if len(maps) == 0:
        raise ValueError(f"{op}: maps must hold at least one attention map")
    if isinstance(residual, bool) or not isinstance(residual, numbers.Real) or not 0.0 <= residual <= 1.0:
        raise ValueError(f"{op}: residual must be a number in [0, 1], got {residual!r}")
    for l, a in enumerate(maps):
        _check_capacities(op, f"maps[{l}]", a)
        if a.dim() < 2:
            raise ValueError(f"{op}: maps[{l}] must have shape [..., n_{{l+1}}, n_l], got {list(a.shape)}")
        if a.shape[:-2] != maps[0].shape[:-2]:
            raise ValueError(f"{op}: every map must have the same batch shape; maps[0] has {list(maps[0].shape[:-2])}"
                             f", maps[{l}] has {list(a.shape[:-2])}")
        if l and a.size(-1) != maps[l - 1].size(-2):
            raise ValueError(f"{op}: maps[{l}] has {a.size(-1)} columns but maps[{l - 1}] has "
                             f"{maps[l - 1].size(-2)} rows; consecutive maps must chain")
        if residual and a.size(-1) != a.size(-2):
            raise ValueError(f"{op}: residual={residual} needs square maps, but maps[{l}] is "
                             f"{a.size(-2)}x{a.size(-1)} (pass residual=0 for non-square maps)")
    device = maps[0].device
    n_first, n_last = maps[0].size(-1), maps[-1].size(-2)
    if sources is None and sinks is None:
        s = torch.arange(n_first).repeat(n_last)
        t = torch.arange(n_last).repeat_interleave(n_first)
        query_shape = (n_last, n_first)
    elif sources is None or sinks is None:
        raise ValueError(f"{op}: pass both sources and sinks, or neither (all pairs)")
    else:
        s, t, scalar = _pair_queries(op, sources, sinks)
        query_shape = () if scalar else (s.numel(),)
    _check_range(op, "sources", s, n_first, "tokens in the first layer")
    _check_range(op, "sinks", t, n_last, "tokens in the last layer")

    batch_shape = maps[0].shape[:-2]
    caps = [with_residual(a.detach().to("cpu", torch.float64), residual).reshape(-1, a.size(-2), a.size(-1))
            for a in maps]
    batch = caps[0].size(0)
    outs = [torch.ops.pykernels.max_flow_layered([c[b].contiguous() for c in caps], s, t) for b in range(batch)]
    out = torch.stack(outs) if outs else torch.empty(0, s.numel(), dtype=torch.float64)
    return out.reshape(tuple(batch_shape) + query_shape).to(device)


def max_flow(edge_index: torch.Tensor, capacity: torch.Tensor, source, sink, num_nodes: int | None = None
             ) -> torch.Tensor:
    """Maximum flow on a directed graph, for one or many (source, sink) queries.

    ``edge_index`` is ``[2, E]`` (int32 or int64) as in PyG: row 0 the tail, row 1 the head of each edge;
    ``capacity`` is ``[E]``, floating, finite and ``>= 0``. Parallel edges add up, self loops carry nothing.
    ``source`` and ``sink`` are ints or 1-D integer tensors of equal length ``Q`` (an int pairs with every
    entry of the other); returns float64 ``[Q]``, or a 0-d tensor for two ints. ``num_nodes`` defaults to
    one more than the largest index among the edges and the queries. A query with ``source == sink`` raises
    ``ValueError`` (its value is undefined; networkx raises too); out-of-range nodes raise ``IndexError``.
    """
    op = "pykernels.max_flow"
    if not isinstance(edge_index, torch.Tensor):
        raise TypeError(f"{op}: edge_index must be a tensor, got {type(edge_index).__name__}")
    if edge_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: edge_index must be int32 or int64, got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"{op}: edge_index must have shape [2, E], got {list(edge_index.shape)}")
    _check_capacities(op, "capacity", capacity)
    if capacity.dim() != 1 or capacity.numel() != edge_index.size(1):
        raise ValueError(f"{op}: capacity must have shape [E] = [{edge_index.size(1)}], got {list(capacity.shape)}")
    s, t, scalar = _pair_queries(op, source, sink)
    ei = edge_index.detach().to("cpu", torch.int64)
    if num_nodes is None:
        largest = max([int(x.max()) for x in (ei, s, t) if x.numel()], default=-1)
        num_nodes = largest + 1
    elif isinstance(num_nodes, bool) or not isinstance(num_nodes, numbers.Integral) or num_nodes < 0:
        raise ValueError(f"{op}: num_nodes must be a non-negative int, got {num_nodes!r}")
    num_nodes = int(num_nodes)
    _check_range(op, "edge_index", ei, num_nodes, "nodes")
    _check_range(op, "source", s, num_nodes, "nodes")
    _check_range(op, "sink", t, num_nodes, "nodes")
    same = (s == t).nonzero()
    if same.numel():
        q = int(same[0])
        raise ValueError(f"{op}: query {q} has source == sink == {int(s[q])}; the max-flow value is undefined")
    rowptr, col, perm = torch.ops.pykernels.coo_to_csr(ei[0], ei[1], num_nodes, num_nodes, f"{op}: edge_index")
    cap = capacity.detach().to("cpu", torch.float64).index_select(0, perm)
    out = torch.ops.pykernels.max_flow(rowptr, col, cap, s, t)
    return (out.reshape(()) if scalar else out).to(edge_index.device)
