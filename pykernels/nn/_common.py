"""Helpers shared by the graph layers: graphs, edge endpoints, self loops and PyG-style initialisation.

Self loops are added without data-dependent shapes, so the layers trace under ``torch.compile(fullgraph=True)``:
instead of dropping existing self loops (PyG's ``remove_self_loops``), the layers keep them in the edge list and
switch them off (weight 0, or score ``-inf`` before a softmax). The result is the same as PyG's.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..graph import CSR, scatter


def glorot(t: torch.Tensor | None) -> None:
    """PyG's ``glorot``: uniform with bound ``sqrt(6 / (size(-2) + size(-1)))`` (also for ``[1, H, C]`` tensors)."""
    if t is not None:
        bound = math.sqrt(6.0 / (t.size(-2) + t.size(-1)))
        torch.nn.init.uniform_(t, -bound, bound)


def pair(x):
    """``(x_src, x_dst)`` from a tensor or a pair, as PyG's bipartite layers take it."""
    if isinstance(x, torch.Tensor):
        return x, x
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return x[0], x[1]
    raise TypeError(f"node features must be a tensor or an (x_src, x_dst) pair, got {type(x).__name__}")


def as_csr(edge_index, num_sources: int, num_targets: int) -> CSR:
    """The CSR of ``edge_index`` with the node counts given, so nothing is inferred from the data."""
    if isinstance(edge_index, CSR):
        return edge_index
    return CSR.from_edge_index(edge_index, num_nodes=(num_sources, num_targets))


def endpoints(graph: CSR, edge_index) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and target of every edge, in edge order (the order of the ``edge_index`` the CSR was built from)."""
    if isinstance(edge_index, torch.Tensor):
        return edge_index[0], edge_index[1]
    return graph.to_edge_order(graph.col), graph.to_edge_order(graph.row)


def append_self_loops(edge_index: torch.Tensor, num_nodes: int):
    """``(edge_index + loops 0..num_nodes-1, is_loop)``: the loops are appended; ``is_loop`` flags the old ones."""
    loops = torch.arange(num_nodes, device=edge_index.device, dtype=edge_index.dtype)
    full = torch.cat([edge_index, loops.expand(2, num_nodes)], dim=1)
    return full, edge_index[0] == edge_index[1]


def remaining_loop_weights(edge_index: torch.Tensor, edge_weight: torch.Tensor, is_loop: torch.Tensor,
                           num_nodes: int, fill_value: float) -> torch.Tensor:
    """Weights of the appended loops under PyG's ``add_remaining_self_loops``.

    A node that had a self loop keeps its weight (the last such edge's, as PyG's index assignment leaves it on
    CPU); the others get ``fill_value``.
    """
    num_edges = edge_weight.size(0)
    position = torch.arange(num_edges, device=edge_weight.device)
    slot = torch.where(is_loop, edge_index[0], num_nodes)
    last = torch.full((num_nodes + 1,), -1, device=edge_weight.device, dtype=torch.long)
    last = last.scatter_reduce(0, slot, torch.where(is_loop, position, -1), "amax")[:num_nodes]
    padded = torch.cat([edge_weight, edge_weight.new_full((1,), fill_value)])
    return padded[torch.where(last >= 0, last, num_edges)]


def fill_loop_attr(edge_attr: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, num_nodes: int,
                   num_targets: int, fill_value, backend: str) -> torch.Tensor:
    """Features of the loops PyG's ``add_self_loops`` appends after ``remove_self_loops``.

    A string ``fill_value`` reduces the features of each node's incoming kept edges (``add``/``sum``, ``mean``,
    ``max``, ``min``); a number or tensor is used as is, ``None`` means 1.
    """
    shape = (num_nodes,) + tuple(edge_attr.shape[1:])
    if fill_value is None:
        return edge_attr.new_ones(shape)
    if isinstance(fill_value, (int, float)):
        return edge_attr.new_full(shape, float(fill_value))
    if isinstance(fill_value, torch.Tensor):
        value = fill_value.to(edge_attr.device, edge_attr.dtype)
        return (value if value.dim() == edge_attr.dim() else value.unsqueeze(0)).expand(shape)
    reduce = {"add": "sum", "sum": "sum", "mean": "mean", "max": "max", "min": "min"}.get(fill_value)
    if reduce is None:
        raise ValueError(f"fill_value must be a number, a tensor or one of 'add', 'sum', 'mean', 'max', 'min'; "
                         f"got {fill_value!r}")
    # Dropped self loops reduce into a spare group past the real targets.
    index = torch.where(keep, target, num_targets)
    out = scatter(edge_attr, index, 0, num_targets + 1, reduce, backend=backend)
    return (out if reduce in ("sum", "mean") else out.values)[:num_nodes]


def merge_heads(out: torch.Tensor, concat: bool, residual: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyG's attention-layer output from ``[N, H, C]`` head outputs: concatenated or averaged, then the residual
    and the bias added."""
    out = out.flatten(1) if concat else out.mean(dim=1)
    if residual is not None:
        out = out + residual
    return out if bias is None else out + bias


def root_skip(out: torch.Tensor, x_r: torch.Tensor, lin_beta: nn.Module | None) -> torch.Tensor:
    """TransformerConv's skip connection: ``out + x_r``, or with ``lin_beta`` PyG's gate
    ``beta * x_r + (1 - beta) * out``, ``beta = sigmoid(lin_beta([out, x_r, out - x_r]))``."""
    if lin_beta is None:
        return out + x_r
    beta = lin_beta(torch.cat([out, x_r, out - x_r], dim=-1)).sigmoid()
    return beta * x_r + (1 - beta) * out
