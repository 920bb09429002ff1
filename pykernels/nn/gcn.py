"""GCNConv: symmetric-normalised graph convolution as one weighted SpMM."""
from __future__ import annotations

import torch
from torch import nn

from ..graph import CSR, spmm
from ._common import append_self_loops, as_csr, endpoints, glorot, remaining_loop_weights


class GCNConv(nn.Module):
    """Drop-in for ``torch_geometric.nn.GCNConv`` (same arguments and ``state_dict`` keys).

    ``out = D^-1/2 (A + I) D^-1/2 X W + b``: the per-edge weights ``w_ji / sqrt(d_j d_i)`` are computed once per
    call (or once for all calls with ``cached=True``) and applied by one SpMM. The linear map runs before the
    SpMM when it shrinks the features, after it otherwise.

    Self loops follow PyG's ``add_remaining_self_loops``: a node's existing self loop keeps its weight, the
    others get 1 (2 if ``improved``). As in PyG, ``improved`` only changes anything when ``edge_weight`` is
    given. ``edge_index`` may be a :class:`pykernels.CSR`; it is then used as it is (it must already hold
    the self loops, with their weights in ``edge_weight`` or the CSR's own weights) and only normalised.
    """

    def __init__(self, in_channels: int, out_channels: int, improved: bool = False, cached: bool = False,
                 add_self_loops: bool | None = None, normalize: bool = True, bias: bool = True, *,
                 backend: str = "auto"):
        super().__init__()
        if add_self_loops is None:
            add_self_loops = normalize
        if add_self_loops and not normalize:
            raise ValueError("GCNConv does not support adding self loops without normalize=True")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.improved, self.cached = improved, cached
        self.add_self_loops, self.normalize = add_self_loops, normalize
        self.backend = backend
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        glorot(self.lin.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self._cache = None

    def forward(self, x: torch.Tensor, edge_index, edge_weight: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError("GCNConv does not take bipartite (x_src, x_dst) inputs")
        if self._cache is not None:
            graph, weight = self._cache
        elif self.normalize:
            graph, weight = self._normalized_graph(x, edge_index, edge_weight)
            if self.cached:
                self._cache = (graph, weight.detach())
        else:
            graph, weight = as_csr(edge_index, x.size(0), x.size(0)), edge_weight
        if self.out_channels < self.in_channels:
            out = spmm(graph, self.lin(x), weight, backend=self.backend)
        else:
            out = self.lin(spmm(graph, x, weight, backend=self.backend))
        return out + self.bias if self.bias is not None else out

    def _normalized_graph(self, x, edge_index, edge_weight):
        n = x.size(0)
        if isinstance(edge_index, CSR) and edge_weight is None and edge_index.edge_weight is not None:
            edge_weight = edge_index.to_edge_order(edge_index.edge_weight.to(x.dtype).view(-1))
        if self.add_self_loops and not isinstance(edge_index, CSR):
            with_loops, is_loop = append_self_loops(edge_index, n)
            if edge_weight is None:
                edge_weight = torch.cat([(~is_loop).to(x.dtype), x.new_ones(n)])
            else:
                fill = 2.0 if self.improved else 1.0
                loops = remaining_loop_weights(edge_index, edge_weight, is_loop, n, fill)
                edge_weight = torch.cat([edge_weight.masked_fill(is_loop, 0.0), loops])
            edge_index = with_loops
        graph = as_csr(edge_index, n, n)
        if edge_weight is None:
            edge_weight = x.new_ones(graph.num_edges)
        deg = spmm(graph, x.new_ones(n, 1), edge_weight, backend=self.backend).squeeze(1)
        deg_inv_sqrt = deg.pow(-0.5)
        deg_inv_sqrt = deg_inv_sqrt.masked_fill(deg_inv_sqrt == float("inf"), 0.0)
        source, target = endpoints(graph, edge_index)
        return graph, deg_inv_sqrt[source] * edge_weight * deg_inv_sqrt[target]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels})"
