"""Graph message passing: CSR graphs, scatter, SpMM, SDDMM, edge softmax and fused graph attention.

Conventions follow PyTorch Geometric: ``edge_index`` is ``[2, E]`` with row 0 the source ``j`` and row 1
the target ``i``; messages flow source -> target. Node features are ``[N, F]`` or multi-head ``[N, H, F]``;
edge values are ``[E]`` or ``[E, H]`` in the caller's edge order.

Every op is deterministic on every engine: outputs are owned by one target (or, in backward, one
source through the cached transpose), so no result depends on thread or block scheduling.
"""
from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import torch

from . import _backend, _graph_ops
from ._checks import check_scale
from .reference import graph as ref

__all__ = ["CSR", "scatter", "spmm", "sddmm", "edge_softmax", "graph_attention", "ScatterResult"]

ScatterResult = namedtuple("ScatterResult", ["values", "indices"])

_REDUCES = ("sum", "mean", "max", "min")


def _csr_namespace(device: torch.device, engine: str | None = None) -> str:
    """CSR construction runs on the compiled engine for the device, or on the Triton module's torch code.

    A scatter on the emulated CUDA engine (``engine="cuda"``, CPU tensors) builds its grouping there too, so
    the CUDA engine's CSR and position kernels are what it checks.
    """
    if device.type == "cpu":
        return _backend.namespace("cuda", device) if engine == "cuda" else "pykernels"
    return "pykernels" if _backend.cuda_built() else "pykernels_triton"


def _check_index_tensor(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")


def _check_size(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{op}: {name} must be non-negative, got {value}")
    return value


@dataclass(frozen=True, eq=False)
class CSR:
    """A target-major CSR graph, with the transpose cached for backward.

    ``rowptr``/``col`` list, for each target ``i``, the sources of its incoming edges in input order;
    ``perm[p]`` is the input edge id of CSR position ``p`` and ``inv_perm`` its inverse. ``rowptr_t``/``col_t`` is the source-major
    transpose and ``perm_t[t]`` the CSR position of transpose position ``t``. ``edge_weight`` (optional)
    is stored in CSR order.

    The constructors check the indices they are given. The ops under ``torch.ops.pykernels`` that take
    ``rowptr``/``col`` (and a backward's transpose) directly check their contents on CPU tensors (an O(E)
    pass, IndexError naming the op and the array); the CUDA and Triton engines do not (it would cost a
    device-to-host copy per call), so on GPU tensors the indices must be valid, as a ``CSR`` built here is.
    """

    rowptr: torch.Tensor
    col: torch.Tensor
    row: torch.Tensor
    perm: torch.Tensor
    inv_perm: torch.Tensor
    num_rows: int
    num_cols: int
    rowptr_t: torch.Tensor | None = None
    col_t: torch.Tensor | None = None
    perm_t: torch.Tensor | None = None
    edge_weight: torch.Tensor | None = None

    @staticmethod
    def from_edge_index(edge_index: torch.Tensor, num_nodes=None, edge_weight: torch.Tensor | None = None,
                        transpose: bool = True) -> "CSR":
        """Builds the CSR of ``edge_index`` (``[2, E]``, int32 or int64).

        ``num_nodes`` is an int (square graph) or a ``(num_sources, num_targets)`` pair for bipartite graphs;
        when omitted it is inferred from the largest index (one host synchronisation). Out-of-range or
        negative indices raise ``IndexError``. ``transpose=False`` skips the transpose for inference-only use.
        """
        return _csr_from_edge_index("pykernels.CSR.from_edge_index", edge_index, num_nodes, edge_weight, transpose)

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    @property
    def device(self) -> torch.device:
        return self.rowptr.device

    def degree(self) -> torch.Tensor:
        """In-degree of every target (number of incoming edges, duplicates counted)."""
        return self.rowptr[1:] - self.rowptr[:-1]

    # Both reorderings are written as index_copy so that their backward is a gather by the other
    # permutation; index_select's backward would be a scatter-add, several times slower on CPU.
    def to_csr_order(self, values: torch.Tensor) -> torch.Tensor:
        """Reorders per-edge values from input edge order to CSR order."""
        return torch.empty_like(values).index_copy(0, self.inv_perm, values)

    def to_edge_order(self, values: torch.Tensor) -> torch.Tensor:
        """Reorders per-edge values from CSR order back to input edge order."""
        return torch.empty_like(values).index_copy(0, self.perm, values)

    def _kernel_args(self):
        return self.rowptr, self.col, self.rowptr_t, self.col_t, self.perm_t


# A CSR holds only tensors and ints, so a checkpoint that stores one (a cached GCNConv, a dataset's graphs)
# loads under torch.load's default weights_only=True instead of asking for the unsafe weights_only=False.
torch.serialization.add_safe_globals([CSR])


def _csr_from_edge_index(op: str, edge_index, num_nodes, edge_weight, transpose: bool) -> CSR:
    """:meth:`CSR.from_edge_index` with its errors prefixed by ``op``."""
    _check_index_tensor(op, "edge_index", edge_index)
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"{op}: edge_index must have shape [2, E], got {list(edge_index.shape)}")
    source, target = edge_index[0], edge_index[1]
    num_cols, num_rows = _resolve_num_nodes(op, edge_index, num_nodes)
    ns = getattr(torch.ops, _csr_namespace(edge_index.device))
    rowptr, col, perm = ns.coo_to_csr(target, source, num_rows, num_cols, f"{op}: edge_index")
    row = target.index_select(0, perm).long()
    inv_perm = torch.empty_like(perm).index_copy_(0, perm, torch.arange(perm.numel(), device=perm.device))
    rowptr_t = col_t = perm_t = None
    if transpose:
        rowptr_t, col_t, perm_t = ns.coo_to_csr(col, row, num_cols, num_rows, f"{op}: edge_index")
    weight = None
    if edge_weight is not None:
        weight = _edge_values(op, "edge_weight", edge_weight, edge_index.size(1), None, edge_index.device)
        weight = torch.empty_like(weight).index_copy_(0, inv_perm, weight)
    return CSR(rowptr, col, row, perm, inv_perm, num_rows, num_cols, rowptr_t, col_t, perm_t, weight)


def _resolve_num_nodes(op, edge_index, num_nodes):
    if num_nodes is None:
        n = int(edge_index.max()) + 1 if edge_index.numel() else 0
        return n, n
    if isinstance(num_nodes, (tuple, list)):
        if len(num_nodes) != 2:
            raise ValueError(f"{op}: num_nodes must be an int or a (num_sources, num_targets) pair")
        return _check_size(op, "num_nodes[0]", num_nodes[0]), _check_size(op, "num_nodes[1]", num_nodes[1])
    n = _check_size(op, "num_nodes", num_nodes)
    return n, n


def _as_graph(op: str, graph, num_sources: int | None, num_targets: int | None = None) -> CSR:
    if isinstance(graph, CSR):
        if num_sources is not None and num_sources != graph.num_cols:
            raise ValueError(f"{op}: the graph has {graph.num_cols} source nodes but the source features have "
                             f"{num_sources} rows")
        if num_targets is not None and num_targets != graph.num_rows:
            raise ValueError(f"{op}: the graph has {graph.num_rows} target nodes but the target features have "
                             f"{num_targets} rows")
        return graph
    if isinstance(graph, torch.Tensor):
        _check_index_tensor(op, "graph (edge_index)", graph)
        if graph.dim() != 2 or graph.size(0) != 2:
            raise ValueError(f"{op}: edge_index must have shape [2, E], got {list(graph.shape)}")
        n_src = num_sources
        n_dst = num_targets if num_targets is not None else num_sources
        # Errors name the op called and the step that found them, e.g. "pykernels.spmm:
        # pykernels.CSR.from_edge_index: edge_index holds source index 4 ...".
        return _csr_from_edge_index(f"{op}: pykernels.CSR.from_edge_index", graph, (n_src, n_dst), None, True)
    raise TypeError(f"{op}: graph must be a pykernels.CSR or an edge_index tensor, got {type(graph).__name__}")


def _node_features(op: str, name: str, x: torch.Tensor, device=None, dtype=None):
    """Returns ``x`` as contiguous ``[N, H, F]`` and whether the caller passed ``[N, F]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{op}: {name} must be [N, F] or [N, H, F], got {list(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{op}: {name} is on {x.device}, expected {device} (where the graph is)")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {x.dtype}, expected {dtype}")
    single_head = x.dim() == 2
    return (x.unsqueeze(1) if single_head else x).contiguous(), single_head


def _edge_values(op: str, name: str, t: torch.Tensor, num_edges: int, heads: int | None, device, dtype=None):
    """Returns per-edge values as ``[E, H]`` (``[E]`` becomes ``[E, 1]``, broadcast to ``heads``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if t.dim() not in (1, 2) or t.size(0) != num_edges:
        raise ValueError(f"{op}: {name} must be [E] or [E, H] with E={num_edges}, got {list(t.shape)}")
    t = t.unsqueeze(1) if t.dim() == 1 else t
    if heads is not None and t.size(1) != heads:
        if t.size(1) != 1:
            raise ValueError(f"{op}: {name} has {t.size(1)} heads, expected 1 or {heads}")
        t = t.expand(num_edges, heads)
    return t.contiguous()


def _check_graph_device(op: str, csr: CSR, device: torch.device) -> None:
    if csr.device != device:
        raise ValueError(f"{op}: the graph is on {csr.device} but the features are on {device}")


def _check_csr_order(op: str, graph, csr_order: bool) -> None:
    if csr_order and not isinstance(graph, CSR):
        raise ValueError(f"{op}: csr_order=True needs a CSR graph (an edge_index has no CSR order to refer to)")


def spmm(graph, x: torch.Tensor, edge_weight: torch.Tensor | None = None, reduce: str = "sum", *,
         num_targets: int | None = None, csr_order: bool = False, backend: str = "auto") -> torch.Tensor:
    """Sparse-dense product ``out[i] = reduce_{j -> i} w_ji * x[j]`` over the edges of ``graph``.

    ``graph`` is a :class:`CSR` or an ``edge_index``; ``x`` is ``[N_src, F]`` or ``[N_src, H, F]``;
    ``edge_weight`` is ``[E]`` or ``[E, H]`` in edge order, or in the CSR's own order with ``csr_order=True``
    (which skips a reordering each way); it defaults to the CSR's own weights, then 1. ``reduce`` is ``sum``,
    ``mean`` (divides by the in-degree), ``max`` or ``min`` (empty rows give 0). Differentiable in ``x`` and
    ``edge_weight``.
    """
    op = "pykernels.spmm"
    if reduce not in _REDUCES:
        raise ValueError(f"{op}: reduce must be one of {_REDUCES}, got {reduce!r}")
    _check_csr_order(op, graph, csr_order)
    x3, single = _node_features(op, "x", x)
    csr = _as_graph(op, graph, x3.size(0), num_targets)
    _check_graph_device(op, csr, x3.device)
    if edge_weight is not None:
        w = _edge_values(op, "edge_weight", edge_weight, csr.num_edges, x3.size(1), x3.device, x3.dtype)
        w = w if csr_order else csr.to_csr_order(w)
    elif csr.edge_weight is not None:
        w = _edge_values(op, "graph.edge_weight", csr.edge_weight.to(x3.dtype), csr.num_edges, x3.size(1),
                         x3.device)
    else:
        w = None
    engine = _backend.select(op, backend, x3.device)
    if engine == "reference":
        out, _ = ref.spmm(csr.row, csr.col, csr.num_rows, x3, w, reduce)
    else:
        out, _ = getattr(torch.ops, _backend.namespace(engine, x3.device)).spmm(*csr._kernel_args(), w, x3, reduce)
    return out.squeeze(1) if single else out


def sddmm(graph, a: torch.Tensor, b: torch.Tensor, *, csr_order: bool = False, backend: str = "auto") -> torch.Tensor:
    """Per-edge dot products ``out[e] = a[target(e)] . b[source(e)]`` (per head), in edge order (in the
    CSR's order with ``csr_order=True``).

    ``a`` is ``[N_dst, F]`` or ``[N_dst, H, F]``, ``b`` likewise over sources; returns ``[E]`` or ``[E, H]``.
    """
    op = "pykernels.sddmm"
    _check_csr_order(op, graph, csr_order)
    a3, single = _node_features(op, "a", a)
    b3, single_b = _node_features(op, "b", b, a3.device, a3.dtype)
    if single != single_b or a3.shape[1:] != b3.shape[1:]:
        raise ValueError(f"{op}: a and b must agree in heads and features, got {list(a.shape)} and "
                         f"{list(b.shape)}")
    csr = _as_graph(op, graph, b3.size(0), a3.size(0))
    _check_graph_device(op, csr, a3.device)
    engine = _backend.select(op, backend, a3.device)
    if engine == "reference":
        out = ref.sddmm(csr.row, csr.col, a3, b3)
    else:
        out = getattr(torch.ops, _backend.namespace(engine, a3.device)).sddmm(*csr._kernel_args(), a3, b3)
    out = out if csr_order else csr.to_edge_order(out)
    return out.squeeze(1) if single else out


def edge_softmax(graph, scores: torch.Tensor, *, num_targets: int | None = None, csr_order: bool = False,
                 backend: str = "auto") -> torch.Tensor:
    """Softmax of per-edge ``scores`` (``[E]`` or ``[E, H]``, edge order) over each target's incoming edges.

    A target whose scores are all ``-inf`` gets weights 0 (not NaN). With ``csr_order=True`` scores and
    weights are in the CSR's own order.
    """
    op = "pykernels.edge_softmax"
    _check_csr_order(op, graph, csr_order)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{op}: scores must be a tensor, got {type(scores).__name__}")
    if isinstance(graph, torch.Tensor) and num_targets is None:
        raise ValueError(f"{op}: pass num_targets with an edge_index graph (or a CSR)")
    csr = _as_graph(op, graph, None if isinstance(graph, CSR) else num_targets, num_targets)
    single = scores.dim() == 1
    s = _edge_values(op, "scores", scores, csr.num_edges, None, csr.device)
    s = s if csr_order else csr.to_csr_order(s)
    engine = _backend.select(op, backend, s.device)
    if engine == "reference":
        out = ref.edge_softmax(csr.row, s, csr.num_rows)
    else:
        out = getattr(torch.ops, _backend.namespace(engine, s.device)).edge_softmax(csr.rowptr, s)
    out = out if csr_order else csr.to_edge_order(out)
    return out.squeeze(1) if single else out


def graph_attention(graph, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    edge_bias: torch.Tensor | None = None, *, return_attention_weights: bool = False,
                    backend: str = "auto"):
    """Dot-product attention of each target over its incoming edges, fused.

    ``q`` is ``[N_dst, H, D]`` (or ``[N_dst, D]``), ``k`` ``[N_src, H, D]``, ``v`` ``[N_src, H, Dv]``;
    ``scale`` defaults to ``D ** -0.5``; ``edge_bias`` (``[E]`` or ``[E, H]``, edge order) is added to
    the scores and receives a gradient. The forward streams each target's edges through an online
    softmax: no ``[E, H, D]`` tensor exists. A target with no edges (or only ``-inf`` biases) outputs 0.
    With ``return_attention_weights=True`` also returns the ``[E, H]`` softmax weights in edge order
    (computed by SDDMM + edge softmax, differentiable).
    """
    op = "pykernels.graph_attention"
    q3, single = _node_features(op, "q", q)
    k3, _ = _node_features(op, "k", k, q3.device, q3.dtype)
    v3, _ = _node_features(op, "v", v, q3.device, q3.dtype)
    if k3.size(1) != q3.size(1) or v3.size(1) != q3.size(1) or k3.size(2) != q3.size(2):
        raise ValueError(f"{op}: q, k, v must agree in heads and q/k in head dim, got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    if k3.size(0) != v3.size(0):
        raise ValueError(f"{op}: k and v must have the same number of source nodes, got {k3.size(0)} and "
                         f"{v3.size(0)}")
    csr = _as_graph(op, graph, k3.size(0), q3.size(0))
    _check_graph_device(op, csr, q3.device)
    scale = check_scale(op, scale, q3.size(2))
    bias = None
    if edge_bias is not None:
        bias = csr.to_csr_order(_edge_values(op, "edge_bias", edge_bias, csr.num_edges, q3.size(1), q3.device,
                                             q3.dtype))
    engine = _backend.select(op, backend, q3.device)
    if engine == "reference":
        out, weights = ref.graph_attention(csr.row, csr.col, csr.num_rows, q3, k3, v3, float(scale), bias)
    else:
        ns = getattr(torch.ops, _backend.namespace(engine, q3.device))
        out, _ = ns.graph_attention(*csr._kernel_args(), q3, k3, v3, bias, float(scale))
        if return_attention_weights:
            scores = ns.sddmm(*csr._kernel_args(), q3, k3) * scale
            weights = ns.edge_softmax(csr.rowptr, scores + bias if bias is not None else scores)
    out = out.squeeze(1) if single else out
    if not return_attention_weights:
        return out
    weights = csr.to_edge_order(weights)
    return out, (weights.squeeze(1) if single else weights)


def scatter(src: torch.Tensor, index: torch.Tensor, dim: int = 0, dim_size: int | None = None,
            reduce: str = "sum", *, backend: str = "auto"):
    """Reduces slices of ``src`` along ``dim`` into ``dim_size`` groups named by ``index`` (1-D).

    ``sum``/``mean`` return a tensor; ``max``/``min`` return ``(values, indices)`` where ``indices`` is the
    position along ``dim`` of the winning slice (lowest on ties; ``src.size(dim)`` for an empty group, as
    in torch_scatter). Empty groups give 0. Differentiable in ``src``. Runs as a CSR reduction: the
    groups are counting-sorted once, then each group is reduced by one thread, deterministically.
    """
    op = "pykernels.scatter"
    if reduce not in _REDUCES:
        raise ValueError(f"{op}: reduce must be one of {_REDUCES}, got {reduce!r}")
    if not isinstance(src, torch.Tensor) or not src.is_floating_point():
        raise TypeError(f"{op}: src must be a floating tensor")
    _check_index_tensor(op, "index", index)
    if src.dim() == 0:
        raise ValueError(f"{op}: src must have at least one dimension")
    if not -src.dim() <= dim < src.dim():
        raise IndexError(f"{op}: dim {dim} is out of range for src with {src.dim()} dimensions")
    dim = dim % src.dim()
    if index.dim() != 1 or index.numel() != src.size(dim):
        raise ValueError(f"{op}: index must be 1-D with src.size(dim)={src.size(dim)} entries, got "
                         f"{list(index.shape)}")
    if index.device != src.device:
        raise ValueError(f"{op}: index is on {index.device}, src on {src.device}")
    if dim_size is None:
        dim_size = int(index.max()) + 1 if index.numel() else 0
    dim_size = _check_size(op, "dim_size", dim_size)
    moved = src.movedim(dim, 0)
    rest = moved.shape[1:]
    flat = moved.reshape(moved.size(0), 1, rest.numel())
    engine = _backend.select(op, backend, src.device)
    positions = torch.arange(index.numel(), device=index.device, dtype=index.dtype)
    ns = getattr(torch.ops, _csr_namespace(src.device, engine))
    rowptr, col, _ = ns.coo_to_csr(index, positions, dim_size, index.numel(), f"{op}: index")
    if engine == "reference":
        out, arg = ref.scatter(flat, index.long(), dim_size, reduce)
    else:
        needs_t = src.requires_grad and torch.is_grad_enabled()
        rowptr_t, col_t, perm_t = (None, None, None)
        if needs_t:
            row = torch.repeat_interleave(torch.arange(dim_size, device=src.device),
                                          rowptr[1:] - rowptr[:-1], output_size=index.numel())
            rowptr_t, col_t, perm_t = ns.coo_to_csr(col, row, index.numel(), dim_size, f"{op}: index")
        engine_ops = getattr(torch.ops, _backend.namespace(engine, src.device))
        out, arg = engine_ops.spmm(rowptr, col, rowptr_t, col_t, perm_t, None, flat.contiguous(), reduce)
        if reduce in ("max", "min"):
            # arg holds CSR positions (-1 for empty groups); col maps them to positions in src, and empty
            # groups get src.size(dim). In place: a [dim_size, F] int64 copy costs more than the reduction
            # reads. The spmm backward keeps arg when it differentiates; the positions are then a copy.
            if needs_t:
                arg = arg.clone()
            ns.arg_to_source_(arg, col, index.numel())
    out = out.reshape((dim_size,) + rest).movedim(0, dim)
    if reduce in ("sum", "mean"):
        return out
    return ScatterResult(out, arg.reshape((dim_size,) + rest).movedim(0, dim))
