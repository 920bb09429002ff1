"""TransformerConv: scaled dot-product attention over each node's incoming edges."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import edge_softmax, graph_attention, scatter, sddmm, spmm
from ._common import as_csr, endpoints, merge_heads, pair, root_skip


class TransformerConv(nn.Module):
    """Drop-in for ``torch_geometric.nn.TransformerConv`` (same arguments and ``state_dict`` keys).

    Without edge features it is one fused :func:`pykernels.graph_attention` call (no ``[E, H, C]`` tensor).
    With ``edge_dim``, PyG adds ``e = lin_edge(edge_attr)`` to both keys and values, so the scores gain
    ``q_i . e_ji`` and the output gains ``sum_j alpha_ji e_ji``: that path runs SDDMM, an edge softmax and
    an SpMM, plus a scatter of the ``[E, H, C]`` edge term that ``e`` itself already has the size of.
    Attention dropout in training also takes that path, since the fused op has no dropout.
    ``return_attention_weights`` (any bool, as in PyG) returns ``(out, (edge_index, alpha))`` with the
    weights before dropout.
    """

    def __init__(self, in_channels: int | tuple[int, int], out_channels: int, heads: int = 1, concat: bool = True,
                 beta: bool = False, dropout: float = 0.0, edge_dim: int | None = None, bias: bool = True,
                 root_weight: bool = True, *, backend: str = "auto"):
        super().__init__()
        self.in_channels, self.out_channels, self.heads, self.concat = in_channels, out_channels, heads, concat
        self.beta, self.root_weight = beta and root_weight, root_weight
        self.dropout, self.edge_dim, self.backend = dropout, edge_dim, backend
        in_src, in_dst = (in_channels, in_channels) if isinstance(in_channels, int) else in_channels
        width = heads * out_channels
        self.lin_key = nn.Linear(in_src, width, bias=bias)
        self.lin_query = nn.Linear(in_dst, width, bias=bias)
        self.lin_value = nn.Linear(in_src, width, bias=bias)
        self.lin_edge = nn.Linear(edge_dim, width, bias=False) if edge_dim is not None else None
        # PyG builds lin_skip even with root_weight=False; so do we, for identical state_dict keys.
        skip = width if concat else out_channels
        self.lin_skip = nn.Linear(in_dst, skip, bias=bias)
        self.lin_beta = nn.Linear(3 * skip, 1, bias=False) if self.beta else None

    def reset_parameters(self) -> None:
        for lin in (self.lin_key, self.lin_query, self.lin_value, self.lin_edge, self.lin_skip, self.lin_beta):
            if lin is not None:
                lin.reset_parameters()

    def forward(self, x, edge_index, edge_attr: torch.Tensor | None = None, return_attention_weights=None):
        if (edge_attr is None) != (self.lin_edge is None):
            raise ValueError("TransformerConv: pass edge_attr exactly when the layer was built with edge_dim")
        heads, channels = self.heads, self.out_channels
        x_src, x_dst = pair(x)
        query, key, value, x_r = self._project(x_src, x_dst)
        graph = as_csr(edge_index, x_src.size(0), x_dst.size(0))
        want_alpha = isinstance(return_attention_weights, bool)
        scale = channels ** -0.5

        if edge_attr is None and not (self.training and self.dropout > 0):
            out = graph_attention(graph, query, key, value, scale, return_attention_weights=want_alpha,
                                  backend=self.backend)
            out, alpha = out if want_alpha else (out, None)
        else:
            scores = sddmm(graph, query, key, backend=self.backend)
            edge = None
            if edge_attr is not None:
                edge = self.lin_edge(edge_attr).view(-1, heads, channels)
                _, target = endpoints(graph, edge_index)
                scores = scores + (query.index_select(0, target) * edge).sum(-1)
            alpha = edge_softmax(graph, scores * scale, backend=self.backend)
            weights = F.dropout(alpha, p=self.dropout, training=self.training)
            out = spmm(graph, value, weights, backend=self.backend)
            if edge is not None:
                out = out + scatter(weights.unsqueeze(-1) * edge, target, 0, x_dst.size(0), backend=self.backend)

        out = merge_heads(out, self.concat)
        if self.root_weight:
            out = root_skip(out, x_r, self.lin_beta)
        return (out, (edge_index, alpha)) if want_alpha else out

    def _project(self, x_src, x_dst):
        """Queries, keys, values ``[N, H, C]`` and the skip term (None without root_weight)."""
        heads, channels = self.heads, self.out_channels
        lins = [self.lin_query, self.lin_key, self.lin_value] + ([self.lin_skip] if self.root_weight else [])
        if x_src is not x_dst:
            query, key, value = (lin(x).view(-1, heads, channels)
                                 for lin, x in zip(lins, (x_dst, x_src, x_src)))
            return query, key, value, self.lin_skip(x_dst) if self.root_weight else None
        # The same nodes feed every projection: one product reads x once, and x's gradient is one product
        # instead of a sum of four.
        weight = torch.cat([lin.weight for lin in lins])
        bias = torch.cat([lin.bias for lin in lins]) if self.lin_query.bias is not None else None
        parts = F.linear(x_src, weight, bias).split([lin.out_features for lin in lins], dim=-1)
        query, key, value = (part.reshape(-1, heads, channels) for part in parts[:3])
        return query, key, value, parts[3] if self.root_weight else None

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads})"
