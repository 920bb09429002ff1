"""SAGEConv: neighbourhood reduction by SpMM plus a root linear map."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import spmm
from ._common import as_csr, pair

_AGGRS = {"mean": "mean", "max": "max", "min": "min", "sum": "sum", "add": "sum"}


class SAGEConv(nn.Module):
    """Drop-in for ``torch_geometric.nn.SAGEConv`` (same arguments and ``state_dict`` keys).

    ``out = lin_l(reduce_{j -> i} x_j) + lin_r(x_i)`` with ``aggr`` one of ``mean``, ``max``, ``min``,
    ``sum``/``add``. For ``sum``/``mean`` the map runs before the SpMM when it shrinks the features. Unlike PyG,
    ``forward`` also takes an optional ``edge_weight`` that scales each message before the reduction
    (``mean`` still divides by the number of incoming edges).
    """

    def __init__(self, in_channels: int | tuple[int, int], out_channels: int, aggr: str = "mean",
                 normalize: bool = False, root_weight: bool = True, project: bool = False, bias: bool = True, *,
                 backend: str = "auto"):
        super().__init__()
        if aggr not in _AGGRS:
            raise ValueError(f"SAGEConv: aggr must be one of {tuple(_AGGRS)}, got {aggr!r}")
        self.in_channels, self.out_channels, self.aggr = in_channels, out_channels, aggr
        self.normalize, self.root_weight, self.project = normalize, root_weight, project
        self.backend = backend
        in_src, in_dst = (in_channels, in_channels) if isinstance(in_channels, int) else in_channels
        self.lin = nn.Linear(in_src, in_src) if project else None
        self.lin_l = nn.Linear(in_src, out_channels, bias=bias)
        self.lin_r = nn.Linear(in_dst, out_channels, bias=False) if root_weight else None

    def reset_parameters(self) -> None:
        for lin in (self.lin, self.lin_l, self.lin_r):
            if lin is not None:
                lin.reset_parameters()

    def forward(self, x, edge_index, edge_weight: torch.Tensor | None = None) -> torch.Tensor:
        x_src, x_dst = pair(x)
        if self.lin is not None:
            x_src = self.lin(x_src).relu()
        graph = as_csr(edge_index, x_src.size(0), x_src.size(0) if x_dst is None else x_dst.size(0))
        reduce = _AGGRS[self.aggr]
        root = None
        if reduce in ("sum", "mean") and self.out_channels < x_src.size(-1):
            # Project first (the aggregation then moves out_channels per edge). When the root term reads the
            # same nodes, both projections are one product: x is read once and its gradient is one product.
            if self.lin_r is not None and x_dst is x_src:
                both = F.linear(x_src, torch.cat([self.lin_l.weight, self.lin_r.weight]))
                projected, root = both.split(self.out_channels, dim=-1)
            else:
                projected = F.linear(x_src, self.lin_l.weight)
            out = spmm(graph, projected, edge_weight, reduce, backend=self.backend)
            if self.lin_l.bias is not None:
                out = out + self.lin_l.bias
        else:
            out = self.lin_l(spmm(graph, x_src, edge_weight, reduce, backend=self.backend))
        if self.lin_r is not None and x_dst is not None:
            out = out + (root if root is not None else self.lin_r(x_dst))
        return F.normalize(out, p=2.0, dim=-1) if self.normalize else out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, aggr={self.aggr})"
