"""PyTorch Geometric's ``GCNConv``, ``GATConv``, ``GATv2Conv``, ``SAGEConv`` and ``TransformerConv`` on pykernels.

:func:`pykernels.accelerate` (``"graph"`` family) keeps each layer the PyG object it is (same class, same
Parameters, so ``isinstance``, ``to_hetero`` and explainers see PyG's layer) and gives it a per-instance
``forward`` (:class:`_PygForward`). Each call checks that the kernels compute what PyG's ``forward`` would for
these arguments and this layer's settings, and runs PyG's own ``forward`` otherwise, counting the reason under
path ``"pyg"`` in the report.

Served: dense ``[2, E]`` ``edge_index`` tensors, 2-D node features (or a pair of them), no ``size``, the
``source_to_target`` flow, PyG's sum aggregation (``mean``/``max``/``min``/``sum`` for SAGE), no message-passing
hooks, explain mode or ``decomposed_layers``, initialised (not lazy) Parameters, no autocast. Attention dropout
in training is served on CPU outside ``torch.compile`` only, where drawing PyG's ``[E, H]`` mask from the same
generator gives PyG's exact mask; elsewhere it runs PyG's code.

Graph structure (the CSR of an ``edge_index``, GAT's self loops, GCN's normalised weights when no
``edge_weight`` is passed) is cached per ``accelerate`` call and reused across layers and calls while the
``edge_index`` tensor is the same object with the same version counter and storage, so an in-place change
rebuilds it; an entry dies with its ``edge_index``. Under ``torch.compile`` nothing is cached (it is traced).
A write through ``edge_index.data`` bumps no version counter and is not seen (autograd has the same blind spot).

``torch.jit.script`` of an accelerated layer scripts PyG's own forward on a shallow copy sharing the Parameters;
scripting a model that holds one makes torch put that copy in the model's ``_modules`` (its prepare step assigns
what ``__prepare_scriptable__`` returns), so the model's layer then runs PyG's code. Copies (``copy.deepcopy``,
``to_hetero``) keep the pykernels forward and count their calls apart from the report.
"""
from __future__ import annotations

import collections
import copy
import inspect
import sys
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from .._checks import FLOAT_DTYPES
from ..graph import CSR, edge_softmax, graph_attention, scatter, sddmm, spmm
from ..nn._common import append_self_loops, fill_loop_attr, merge_heads, root_skip

PATH = "pyg"
_CONVS = ("GCNConv", "GATConv", "GATv2Conv", "SAGEConv", "TransformerConv")
_SAGE_AGGRS = {"MeanAggregation": "mean", "MaxAggregation": "max", "MinAggregation": "min",
               "SumAggregation": "sum"}
_HOOK_DICTS = ("_propagate_forward_pre_hooks", "_propagate_forward_hooks", "_message_forward_pre_hooks",
               "_message_forward_hooks", "_aggregate_forward_pre_hooks", "_aggregate_forward_hooks",
               "_message_and_aggregate_forward_pre_hooks", "_message_and_aggregate_forward_hooks",
               "_edge_update_forward_pre_hooks", "_edge_update_forward_hooks")
_CACHE_ENTRIES = 16


def conv_classes() -> dict:
    """``{class: kind}`` of the PyG layers served, only if ``torch_geometric`` is already imported."""
    module = sys.modules.get("torch_geometric.nn")
    if module is None:
        return {}
    return {getattr(module, name): name for name in _CONVS if hasattr(module, name)}


class _GraphCache:
    """Structures derived from ``edge_index`` tensors, shared by the layers of one :func:`accelerate` call.

    An entry is used only while its ``edge_index`` is the same live object with the same version counter and
    storage, and is dropped when that tensor is freed; at most ``_CACHE_ENTRIES`` live at once. Nothing is
    cached under ``torch.compile`` (the structure is traced) or inference mode.
    """

    def __init__(self):
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def get(self, edge_index: torch.Tensor, key: tuple, build):
        # Under inference mode the structure would be inference tensors, which a later training call cannot save
        # for backward.
        if torch.compiler.is_compiling() or edge_index.is_inference() or torch.is_inference_mode_enabled():
            return build()
        stamp = (edge_index._version, edge_index.data_ptr())
        full_key = (id(edge_index),) + key
        with self.lock:
            entry = self.entries.get(full_key)
            if entry is not None and entry[0]() is edge_index and entry[1] == stamp:
                self.entries.move_to_end(full_key)
                return entry[2]
        value = build()
        entries = weakref.ref(self.entries)

        def forget(_, full_key=full_key):
            live = entries()
            if live is not None:
                live.pop(full_key, None)

        with self.lock:
            self.entries[full_key] = (weakref.ref(edge_index, forget), stamp, value)
            self.entries.move_to_end(full_key)
            while len(self.entries) > _CACHE_ENTRIES:
                self.entries.popitem(last=False)
        return value


def _bind(signature: inspect.Signature, args, kwargs):
    try:
        return signature.bind(*args, **kwargs).arguments
    except TypeError:
        return None


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def _features_reason(x, allow_pair: bool) -> str | None:
    if isinstance(x, (tuple, list)):
        if not allow_pair:
            return "bipartite (x_src, x_dst) input (PyG raises)"
        if len(x) != 2 or x[1] is None:
            return "x_dst is None"
        tensors = tuple(x)
    else:
        tensors = (x,)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            return "node features not tensors"
        if not _plain(t):
            return "tensor subclass"
        if t.layout != torch.strided:
            return "sparse node features"
        if t.dim() != 2:
            return "node features not 2-D"
        if t.dtype not in FLOAT_DTYPES or t.dtype != tensors[0].dtype:
            return "node feature dtypes"
        if t.device != tensors[0].device:
            return "devices differ"
        if t.size(0) == 0:
            return "no nodes"
    return None


def _edge_index_reason(edge_index, device) -> str | None:
    if not isinstance(edge_index, torch.Tensor):
        return "edge_index not a tensor (SparseTensor adjacency)"
    if edge_index.layout != torch.strided:
        return "sparse adjacency"
    if not _plain(edge_index):
        return "edge_index is a tensor subclass (EdgeIndex)"
    if edge_index.dtype not in (torch.int64, torch.int32) or edge_index.dim() != 2 or edge_index.size(0) != 2:
        return "edge_index not a [2, E] integer tensor"
    if edge_index.device != device:
        return "devices differ"
    if edge_index.size(1) == 0:
        return "no edges"
    return None


def _edge_values_reason(name: str, t, x: torch.Tensor, num_edges: int, dims: tuple[int, ...]) -> str | None:
    if not isinstance(t, torch.Tensor) or not _plain(t) or t.layout != torch.strided:
        return f"{name} not a plain tensor"
    if t.dtype != x.dtype or t.device != x.device:
        return f"{name} dtype or device"
    if t.dim() not in dims or t.size(0) != num_edges:
        return f"{name} shape"
    return None


def _layer_reason(conv: nn.Module, backend: str, device: torch.device, aggr_names=("SumAggregation",)) -> str | None:
    if conv.flow != "source_to_target":
        return "flow='target_to_source'"
    if conv.node_dim not in (0, -2):
        return "node_dim"
    if conv.decomposed_layers > 1:
        return "decomposed_layers > 1"
    if conv._explain:
        return "explain mode"
    if any(getattr(conv, name) for name in _HOOK_DICTS):
        return "message-passing hooks"
    if type(conv.aggr_module).__name__ not in aggr_names or type(conv.aggr_module).__module__.split(".")[0] != \
            "torch_geometric":
        return f"aggregation {conv.aggr!r}"
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in conv.parameters()):
        return "lazy parameters not initialised"
    for p in conv.parameters():
        if p.device != device:
            return "devices differ"
    if torch.is_autocast_enabled(device.type):
        return "autocast"
    if backend == "auto" and _backend.select("pykernels.spmm", backend, device) == "reference":
        return "no pykernels engine for the device"
    return None


def _size_reason(size, x) -> str | None:
    """A ``size`` equal to the node counts of ``x`` changes nothing; any other is left to PyG."""
    if size is None:
        return None
    x_src, x_dst = (x, x) if isinstance(x, torch.Tensor) else x
    if (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in size)
            and tuple(size) == (x_src.size(0), x_dst.size(0))):
        return None
    return "size argument other than the node counts"


def _dropout_reason(conv: nn.Module, device: torch.device) -> str | None:
    """PyG's dropout on ``[E, H]`` weights is reproduced by drawing the same mask; only where that is exact."""
    if not (conv.training and conv.dropout > 0):
        return None
    if device.type != "cpu":
        return "attention dropout in training off CPU"
    if torch.compiler.is_compiling():
        return "attention dropout in training under torch.compile"
    return None


def _dropout_mask(p: float, shape, like: torch.Tensor) -> torch.Tensor:
    """The scaled mask ``F.dropout`` multiplies a tensor of ``shape`` by: on CPU it draws ``bernoulli_`` on an
    empty tensor of that shape and dtype, then multiplies, so the same draw on ones is that mask."""
    return F.dropout(like.new_ones(shape), p=p, training=True)


def _plain_csr(edge_index: torch.Tensor, n_src: int, n_dst: int) -> CSR:
    return CSR.from_edge_index(edge_index, num_nodes=(n_src, n_dst))


def _gcn_structure(conv, edge_index, edge_weight, n: int, dtype):
    """PyG's ``gcn_norm`` edge list as a CSR and its weights (edge order of that list)."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    index, weight = gcn_norm(edge_index, edge_weight, n, conv.improved, conv.add_self_loops, conv.flow, dtype)
    return CSR.from_edge_index(index, num_nodes=(n, n)), weight


class _PygForward:
    """``forward`` of one PyG conv layer (instance attribute): the pykernels path where exact, PyG's otherwise."""

    def __init__(self, conv: nn.Module, kind: str, backend: str, tally, cache: _GraphCache):
        self.conv, self.kind, self.backend, self.tally, self.cache = conv, kind, backend, tally, cache
        self.signature = inspect.signature(type(conv).forward)

    def original(self, *args, **kwargs):
        return type(self.conv).forward(self.conv, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        from ..accelerate import _record  # it imports this module

        arguments = _bind(self.signature, (self.conv,) + args, kwargs)
        reason, served = ("arguments PyG's forward does not take", None) if arguments is None else \
            getattr(self, f"_{self.kind}")(arguments)
        _record(self.tally.key, PATH, reason or "served")
        return self.original(*args, **kwargs) if reason is not None else served()

    def _graph(self, edge_index, key, build):
        return self.cache.get(edge_index, (self.kind,) + key, build)

    # Each _<kind> returns (reason, None) to fall back, or (None, thunk) to serve.

    def _common_reason(self, arguments, allow_pair, aggr_names=("SumAggregation",)):
        conv, x, edge_index = self.conv, arguments["x"], arguments["edge_index"]
        reason = _features_reason(x, allow_pair)
        if reason is not None:
            return reason
        device = (x[0] if isinstance(x, (tuple, list)) else x).device
        return (_edge_index_reason(edge_index, device) or _layer_reason(conv, self.backend, device, aggr_names)
                or _size_reason(arguments.get("size"), x))

    def _GCNConv(self, a):
        conv, x, edge_index, edge_weight = self.conv, a["x"], a["edge_index"], a.get("edge_weight")
        reason = self._common_reason(a, allow_pair=False)
        if reason is None and edge_weight is not None:
            reason = _edge_values_reason("edge_weight", edge_weight, x, edge_index.size(1), (1,))
        if reason is not None:
            return reason, None
        n, backend = x.size(0), self.backend

        def run():
            if not conv.normalize:
                graph = self._graph(edge_index, ("plain", n, n), lambda: _plain_csr(edge_index, n, n))
                weight, order = edge_weight, False
            elif conv._cached_edge_index is not None:
                # PyG uses its cache whatever edge_index is passed; so do we, and it may be reset to None.
                index, weight = conv._cached_edge_index
                graph = self._graph(index, ("plain", n, n), lambda: _plain_csr(index, n, n))
                order = False
            elif conv.cached:
                from torch_geometric.nn.conv.gcn_conv import gcn_norm

                index, weight = gcn_norm(edge_index, edge_weight, n, conv.improved, conv.add_self_loops,
                                         conv.flow, x.dtype)
                conv._cached_edge_index = (index, weight)
                graph = self._graph(index, ("plain", n, n), lambda: _plain_csr(index, n, n))
                order = False
            elif edge_weight is None:
                def build():
                    graph, weight = _gcn_structure(conv, edge_index, None, n, x.dtype)
                    return graph, graph.to_csr_order(weight)

                graph, weight = self._graph(edge_index, ("norm", n, conv.improved, conv.add_self_loops, x.dtype),
                                            build)
                order = True
            else:
                graph = self._graph(edge_index, ("loops", n, conv.add_self_loops),
                                    lambda: _gcn_structure(conv, edge_index, None, n, x.dtype)[0])
                weight = _gcn_weights(conv, edge_index, edge_weight, n, x.dtype)
                order = False
            out = spmm(graph, conv.lin(x), weight, csr_order=order, backend=backend)
            return out + conv.bias if conv.bias is not None else out

        return None, run

    def _GATConv(self, a):
        # PyG's GATConv drops an edge_attr it has no edge_dim for.
        return self._gat_family(a, edge_attr_without_dim=None)

    def _GATv2Conv(self, a):
        return self._gat_family(a, edge_attr_without_dim="edge_attr without edge_dim (PyG raises)")

    def _gat_family(self, a, edge_attr_without_dim):
        """GATConv and GATv2Conv: ``edge_attr_without_dim`` is the fallback reason for an ``edge_attr`` the layer
        has no ``edge_dim`` for, or None where the layer ignores such an ``edge_attr``."""
        conv, x, edge_index = self.conv, a["x"], a["edge_index"]
        edge_attr, want = a.get("edge_attr"), a.get("return_attention_weights")
        if edge_attr is not None and conv.lin_edge is None and edge_attr_without_dim is None:
            edge_attr = None
        reason = self._common_reason(a, allow_pair=True)
        if reason is None:
            reason = _dropout_reason(conv, edge_index.device)
            if reason is None and edge_attr is not None:
                reason = (edge_attr_without_dim if conv.lin_edge is None else
                          _edge_values_reason("edge_attr", edge_attr, x if isinstance(x, torch.Tensor) else x[0],
                                              edge_index.size(1), (1, 2)))
            if reason is None and want and torch.compiler.is_compiling():
                reason = "return_attention_weights under torch.compile"
        if reason is not None:
            return reason, None
        return None, lambda: _gat(self, x, edge_index, edge_attr, want)

    def _SAGEConv(self, a):
        conv = self.conv
        reason = self._common_reason(a, allow_pair=True, aggr_names=tuple(_SAGE_AGGRS))
        if reason is None and not isinstance(conv.aggr, str):
            reason = f"aggregation {conv.aggr!r}"
        if reason is not None:
            return reason, None
        return None, lambda: _sage(self, a["x"], a["edge_index"])

    def _TransformerConv(self, a):
        conv, x, edge_index = self.conv, a["x"], a["edge_index"]
        edge_attr = a.get("edge_attr")
        reason = self._common_reason(a, allow_pair=True)
        if reason is None:
            reason = _dropout_reason(conv, edge_index.device)
            if reason is None and edge_attr is not None:
                if conv.lin_edge is None:
                    reason = "edge_attr without edge_dim"
                else:
                    first = x if isinstance(x, torch.Tensor) else x[0]
                    reason = _edge_values_reason("edge_attr", edge_attr, first, edge_index.size(1), (2,))
            elif reason is None and conv.lin_edge is not None:
                reason = "edge_dim layer without edge_attr (PyG raises)"
        if reason is not None:
            return reason, None
        return None, lambda: _transformer(self, x, edge_index, edge_attr, a.get("return_attention_weights"))


def _gcn_weights(conv, edge_index, edge_weight, n, dtype):
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    return gcn_norm(edge_index, edge_weight, n, conv.improved, conv.add_self_loops, conv.flow, dtype)[1]


def _gat_structure(edge_index: torch.Tensor, n_src: int, n_dst: int, self_loops: bool, positions: bool):
    """The CSR GAT attends over and which of its edges PyG keeps.

    PyG removes self loops and appends one per node; here the loops are appended and the old ones kept in the
    edge list but switched off (``keep`` False), which has no data-dependent shape. ``kept`` (with
    ``positions``) lists the kept edges' positions in PyG's order: the old non-loop edges, then the loops.
    """
    if not self_loops:
        return _plain_csr(edge_index, n_src, n_dst), None, None, None
    num_loops = min(n_src, n_dst)
    with_loops, is_loop = append_self_loops(edge_index, num_loops)
    graph = CSR.from_edge_index(with_loops, num_nodes=(n_src, n_dst))
    keep = torch.cat([~is_loop, is_loop.new_ones(num_loops)])
    kept = keep.nonzero().squeeze(1) if positions else None
    return graph, keep, graph.to_csr_order(keep), kept


def _gat(forward: _PygForward, x, edge_index, edge_attr, want):
    """GATConv, and GATv2Conv, whose logits ``att . leaky_relu(W_l x_j + W_r x_i (+ W_e e))`` need the
    ``[E, H, C]`` sums PyG also forms; both then share the masked edge softmax, dropout and SpMM."""
    conv, backend = forward.conv, forward.backend
    heads, channels = conv.heads, conv.out_channels
    v2 = forward.kind == "GATv2Conv"
    res = None
    if v2:
        x_src, x_dst = (x, x) if isinstance(x, torch.Tensor) else x
        if conv.res is not None:
            res = conv.res(x_dst)
        x_src = conv.lin_l(x_src).view(-1, heads, channels)
        if isinstance(x, torch.Tensor) and conv.share_weights:
            x_dst = x_src
        else:
            x_dst = conv.lin_r(x_dst).view(-1, heads, channels)
    elif isinstance(x, torch.Tensor):
        if conv.res is not None:
            res = conv.res(x)
        if conv.lin is not None:
            x_src = x_dst = conv.lin(x).view(-1, heads, channels)
        else:
            x_src, x_dst = conv.lin_src(x).view(-1, heads, channels), conv.lin_dst(x).view(-1, heads, channels)
    else:
        x_src, x_dst = x
        if conv.res is not None:
            res = conv.res(x_dst)
        lin_src = conv.lin if conv.lin is not None else conv.lin_src
        lin_dst = conv.lin if conv.lin is not None else conv.lin_dst
        x_src, x_dst = lin_src(x_src).view(-1, heads, channels), lin_dst(x_dst).view(-1, heads, channels)
    n_src, n_dst = x_src.size(0), x_dst.size(0)
    dropout = conv.training and conv.dropout > 0
    positions = bool(want) or dropout
    graph, keep, keep_csr, kept = forward._graph(
        edge_index, ("gat", n_src, n_dst, conv.add_self_loops, positions),
        lambda: _gat_structure(edge_index, n_src, n_dst, conv.add_self_loops, positions))

    if v2:
        alpha = x_src.index_select(0, graph.col) + x_dst.index_select(0, graph.row)
    else:
        logit_src = (x_src * conv.att_src).sum(dim=-1)
        logit_dst = (x_dst * conv.att_dst).sum(dim=-1)
        # One SDDMM of [a_d, 1] . [1, a_s] forms a_d[i] + a_s[j] per edge in CSR order; its backward is an SpMM
        # over the cached transpose instead of the scatter-add that gathering [N, H] logits to edges costs.
        alpha = sddmm(graph, torch.stack([logit_dst, torch.ones_like(logit_dst)], -1),
                      torch.stack([torch.ones_like(logit_src), logit_src], -1), csr_order=True, backend=backend)
    if edge_attr is not None:
        if conv.add_self_loops:
            loop_attr = fill_loop_attr(edge_attr, edge_index[1], keep[:edge_index.size(1)], min(n_src, n_dst),
                                       n_dst, conv.fill_value, backend)
            edge_attr = torch.cat([edge_attr, loop_attr])
        if edge_attr.dim() == 1:
            edge_attr = edge_attr.view(-1, 1)
        edge_term = conv.lin_edge(edge_attr).view(-1, heads, channels)
        if v2:
            alpha = alpha + graph.to_csr_order(edge_term)
        else:
            alpha = alpha + graph.to_csr_order((edge_term * conv.att_edge).sum(dim=-1))
    alpha = F.leaky_relu(alpha, conv.negative_slope)
    if v2:
        alpha = (alpha * conv.att).sum(dim=-1)
    if keep_csr is not None:
        alpha = alpha.masked_fill(~keep_csr.unsqueeze(1), float("-inf"))
    alpha = edge_softmax(graph, alpha, csr_order=True, backend=backend)
    if dropout:
        mask = _dropout_mask(conv.dropout, (graph.num_edges if kept is None else kept.numel(), heads), alpha)
        if kept is not None:
            mask = mask.new_zeros(graph.num_edges, heads).index_copy(0, kept, mask)
        alpha = alpha * graph.to_csr_order(mask)

    out = spmm(graph, x_src, alpha, csr_order=True, backend=backend)
    out = merge_heads(out, conv.concat, res, conv.bias)
    if not want:
        return out
    alpha = graph.to_edge_order(alpha)
    if kept is None:
        return out, (edge_index, alpha)
    num_loops = min(n_src, n_dst)
    loops = torch.arange(num_loops, device=edge_index.device, dtype=edge_index.dtype).expand(2, num_loops)
    kept_old = kept[:kept.numel() - num_loops]
    return out, (torch.cat([edge_index.index_select(1, kept_old), loops], dim=1), alpha.index_select(0, kept))


def _sage(forward: _PygForward, x, edge_index):
    conv = forward.conv
    x_src, x_dst = (x, x) if isinstance(x, torch.Tensor) else x
    if conv.project and hasattr(conv, "lin"):
        x_src = conv.lin(x_src).relu()
    n_src, n_dst = x_src.size(0), x_dst.size(0)
    graph = forward._graph(edge_index, ("plain", n_src, n_dst), lambda: _plain_csr(edge_index, n_src, n_dst))
    out = conv.lin_l(spmm(graph, x_src, None, _SAGE_AGGRS[type(conv.aggr_module).__name__], backend=forward.backend))
    if conv.root_weight:
        out = out + conv.lin_r(x_dst)
    return F.normalize(out, p=2.0, dim=-1) if conv.normalize else out


def _transformer(forward: _PygForward, x, edge_index, edge_attr, want):
    conv, backend = forward.conv, forward.backend
    heads, channels = conv.heads, conv.out_channels
    x_src, x_dst = (x, x) if isinstance(x, torch.Tensor) else x
    query = conv.lin_query(x_dst).view(-1, heads, channels)
    key = conv.lin_key(x_src).view(-1, heads, channels)
    value = conv.lin_value(x_src).view(-1, heads, channels)
    n_src, n_dst = x_src.size(0), x_dst.size(0)
    graph = forward._graph(edge_index, ("plain", n_src, n_dst), lambda: _plain_csr(edge_index, n_src, n_dst))
    scale = 1.0 / (channels ** 0.5)
    want_alpha = isinstance(want, bool)
    dropout = conv.training and conv.dropout > 0
    if edge_attr is None and not dropout:
        out = graph_attention(graph, query, key, value, scale, return_attention_weights=want_alpha, backend=backend)
        out, alpha = out if want_alpha else (out, None)
    else:
        scores = sddmm(graph, query, key, backend=backend)
        edge = None
        if edge_attr is not None:
            edge = conv.lin_edge(edge_attr).view(-1, heads, channels)
            scores = scores + (query.index_select(0, edge_index[1]) * edge).sum(-1)
        alpha = edge_softmax(graph, scores * scale, backend=backend)
        weights = alpha * _dropout_mask(conv.dropout, alpha.shape, alpha) if dropout else alpha
        out = spmm(graph, value, weights, backend=backend)
        if edge is not None:
            out = out + scatter(weights.unsqueeze(-1) * edge, edge_index[1], 0, n_dst, backend=backend)
    out = merge_heads(out, conv.concat)
    if conv.root_weight:
        out = root_skip(out, conv.lin_skip(x_dst), conv.lin_beta)
    return (out, (edge_index, alpha)) if want_alpha else out


class _PrepareScriptable:
    """``__prepare_scriptable__`` of an accelerated layer (instance attribute): ``torch.jit.script`` compiles a
    module's ``forward`` from its class, which the instance-level one would hide, so it scripts a shallow copy
    without it: PyG's layer with the same Parameters, as it scripts one never accelerated."""

    def __init__(self, conv: nn.Module):
        self.conv = conv

    def __call__(self) -> nn.Module:
        plain = copy.copy(self.conv)
        for name in ("forward", "__prepare_scriptable__"):
            plain.__dict__.pop(name, None)
        return plain


def accelerate_convs(model: nn.Module, backend: str, tally, report, routed_type) -> None:
    """Gives every PyG conv layer of ``model`` (exact classes) a :class:`_PygForward`."""
    classes = conv_classes()
    if not classes:
        return
    cache = _GraphCache()
    for name, module in model.named_modules():
        kind = classes.get(type(module))
        if kind is None:
            subclass = next((k for c, k in classes.items() if isinstance(module, c)), None)
            if subclass is not None:
                report.skipped.append((name, f"subclass {type(module).__name__} of PyG's {subclass}"))
            continue
        current = module.__dict__.get("forward")
        holder = current if isinstance(current, routed_type) else None
        inner = holder.previous if holder is not None else current
        if isinstance(inner, _PygForward):
            report.skipped.append((name, "already runs on pykernels"))
            continue
        if inner is not None:
            report.skipped.append((name, "an instance-level forward is set"))
            continue
        served = _PygForward(module, kind, backend, tally, cache)
        module.__prepare_scriptable__ = _PrepareScriptable(module)
        if holder is not None:
            holder.previous = served
        else:
            module.forward = served
        report.graph.append(name)


def restore_module(module: nn.Module) -> None:
    if isinstance(module.__dict__.get("forward"), _PygForward):
        del module.forward
    if isinstance(module.__dict__.get("__prepare_scriptable__"), _PrepareScriptable):
        del module.__prepare_scriptable__
