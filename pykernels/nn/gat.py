"""GATConv: additive attention from per-node logits, an edge softmax and one multi-head SpMM."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import CSR, edge_softmax, sddmm, spmm
from ._common import append_self_loops, as_csr, fill_loop_attr, glorot, merge_heads, pair


class GATConv(nn.Module):
    """Drop-in for ``torch_geometric.nn.GATConv`` (same arguments and ``state_dict`` keys).

    The attention logit ``a_s . W x_j + a_d . W x_i (+ a_e . W_e e_ji)`` is a sum of per-node (and per-edge)
    scalars per head, so only ``[N, H]`` and ``[E, H]`` tensors are formed before the SpMM that weighs the
    ``[N, H, C]`` source features: no ``[E, H, C]`` message tensor exists (PyG builds one).

    Self loops follow PyG (``remove_self_loops`` then ``add_self_loops`` with ``fill_value`` for the loops'
    edge features). ``edge_index`` may be a :class:`pykernels.CSR`; it is then used as it is, so it must
    already hold the self loops (and ``edge_attr`` their features). With ``return_attention_weights=True``
    returns ``(out, (edge_index, alpha))`` as PyG does; dropping the old self loops from that edge list has a
    data-dependent size, so this one option does not trace under ``torch.compile(fullgraph=True)``.
    """

    def __init__(self, in_channels: int | tuple[int, int], out_channels: int, heads: int = 1, concat: bool = True,
                 negative_slope: float = 0.2, dropout: float = 0.0, add_self_loops: bool = True,
                 edge_dim: int | None = None, fill_value="mean", bias: bool = True, residual: bool = False, *,
                 backend: str = "auto"):
        super().__init__()
        self.in_channels, self.out_channels, self.heads, self.concat = in_channels, out_channels, heads, concat
        self.negative_slope, self.dropout = negative_slope, dropout
        self.add_self_loops, self.edge_dim, self.fill_value = add_self_loops, edge_dim, fill_value
        self.residual, self.backend = residual, backend
        width = heads * out_channels
        self.lin = self.lin_src = self.lin_dst = None
        if isinstance(in_channels, int):
            self.lin = nn.Linear(in_channels, width, bias=False)
        else:
            self.lin_src = nn.Linear(in_channels[0], width, bias=False)
            self.lin_dst = nn.Linear(in_channels[1], width, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        self.lin_edge = nn.Linear(edge_dim, width, bias=False) if edge_dim is not None else None
        self.att_edge = nn.Parameter(torch.empty(1, heads, out_channels)) if edge_dim is not None else None
        total = out_channels * (heads if concat else 1)
        in_dst = in_channels if isinstance(in_channels, int) else in_channels[1]
        self.res = nn.Linear(in_dst, total, bias=False) if residual else None
        self.bias = nn.Parameter(torch.empty(total)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin, self.lin_src, self.lin_dst, self.lin_edge, self.res):
            if lin is not None:
                glorot(lin.weight)
        for att in (self.att_src, self.att_dst, self.att_edge):
            glorot(att)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, edge_index, edge_attr: torch.Tensor | None = None, return_attention_weights=None):
        heads, channels = self.heads, self.out_channels
        x_src, x_dst = pair(x)
        res = self.res(x_dst) if self.res is not None and x_dst is not None else None
        lin_src = self.lin if self.lin is not None else self.lin_src
        lin_dst = self.lin if self.lin is not None else self.lin_dst
        h_src = lin_src(x_src).view(-1, heads, channels)
        if x_dst is None:
            h_dst = None
        elif x_dst is x_src and lin_dst is lin_src:
            h_dst = h_src
        else:
            h_dst = lin_dst(x_dst).view(-1, heads, channels)
        n_src = h_src.size(0)
        n_dst = n_src if h_dst is None else h_dst.size(0)

        if self.lin_edge is None:
            edge_attr = None
        keep = None
        if self.add_self_loops and not isinstance(edge_index, CSR):
            edge_index, edge_attr, keep = self._self_loops(edge_index, edge_attr, n_src, n_dst)
        graph = as_csr(edge_index, n_src, n_dst)

        # Per-node logits as products, not h * att then a sum, which would form another [N, H, C] tensor.
        if h_dst is h_src:
            logit_src, logit_dst = torch.einsum("nhc,hck->nhk", h_src,
                                                torch.stack([self.att_src[0], self.att_dst[0]], -1)).unbind(-1)
        else:
            logit_src = torch.einsum("nhc,hc->nh", h_src, self.att_src[0])
            logit_dst = (torch.einsum("nhc,hc->nh", h_dst, self.att_dst[0]) if h_dst is not None
                         else logit_src.new_zeros(n_dst, heads))
        # Per-edge values stay in the CSR's order from here to the SpMM: reordering [E, H] tensors to edge
        # order and back between the ops would cost more than the SDDMM itself.
        # One SDDMM of [a_d, 1] . [1, a_s] forms a_d[i] + a_s[j] per edge; its backward is an SpMM over the
        # cached transpose instead of the scatter-add that gathering [N, H] logits to edges costs.
        alpha = sddmm(graph, torch.stack([logit_dst, torch.ones_like(logit_dst)], -1),
                      torch.stack([torch.ones_like(logit_src), logit_src], -1), csr_order=True, backend=self.backend)
        if edge_attr is not None:
            # a_e . (W_e e) per head is e . (W_e^T a_e): fold att_edge into lin_edge, one [D, H] matrix.
            att_edge = self.lin_edge.weight.view(heads, channels, -1) * self.att_edge.view(heads, channels, 1)
            edge_logit = F.linear(edge_attr.view(-1, 1) if edge_attr.dim() == 1 else edge_attr, att_edge.sum(1))
            alpha = alpha + graph.to_csr_order(edge_logit)
        alpha = F.leaky_relu(alpha, self.negative_slope)
        if keep is not None:
            alpha = alpha.masked_fill(~keep.index_select(0, graph.perm).unsqueeze(1), float("-inf"))
        alpha = edge_softmax(graph, alpha, csr_order=True, backend=self.backend)
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)

        out = spmm(graph, h_src, alpha, csr_order=True, backend=self.backend)
        out = merge_heads(out, self.concat, res, self.bias)
        if not return_attention_weights:
            return out
        alpha = graph.to_edge_order(alpha)
        if keep is not None:
            return out, (edge_index[:, keep], alpha[keep])
        return out, (edge_index, alpha)

    def _self_loops(self, edge_index, edge_attr, n_src, n_dst):
        """PyG's remove-then-add self loops, keeping old loops in place: ``keep`` flags the edges PyG keeps."""
        num_loops = min(n_src, n_dst)
        with_loops, is_loop = append_self_loops(edge_index, num_loops)
        if edge_attr is not None:
            loop_attr = fill_loop_attr(edge_attr, edge_index[1], ~is_loop, num_loops, n_dst, self.fill_value,
                                       self.backend)
            edge_attr = torch.cat([edge_attr, loop_attr])
        return with_loops, edge_attr, torch.cat([~is_loop, is_loop.new_ones(num_loops)])

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads})"
