"""Graph message-passing benchmarks: pykernels ops and layers against torch.sparse, PyG and torch scatter.

Graphs are generated with power-law in-degrees at the sizes of well-known datasets (no downloads).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

import pykernels as pk
from pykernels.reference import graph as ref
from pykernels.testing import random_graph

from .cases import Case, LazyData

FAMILY = "graph"


@dataclass(frozen=True)
class GraphSpec:
    name: str
    nodes: int
    edges: int
    feats: int
    quick: bool = True

    @property
    def label(self) -> str:
        return f"{self.name} ({self.nodes:,} nodes, {self.edges:,} edges, F={self.feats})"


SPECS = [
    GraphSpec("Cora", 2_708, 10_556, 1433),
    GraphSpec("PubMed", 19_717, 88_648, 500),
    GraphSpec("ogbn-arxiv", 169_343, 1_166_243, 128),
    GraphSpec("ogbn-products", 2_449_029, 61_859_140, 100, quick=False),
]

_data = LazyData()


def _build(spec: GraphSpec, device: torch.device):
    ei = random_graph(spec.nodes, spec.edges, power_law=0.8, seed=1).to(device)
    csr = pk.CSR.from_edge_index(ei, spec.nodes)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(spec.nodes, spec.feats, generator=g).to(device)
    w = torch.rand(spec.edges, generator=g).to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        a = torch.sparse_csr_tensor(csr.rowptr, csr.col, csr.to_csr_order(w), (spec.nodes, spec.nodes),
                                    check_invariants=False)
    return {"ei": ei, "csr": csr, "x": x, "w": w, "A": a}


def _fwd_bwd(fn, *leaves):
    def run():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, leaves, torch.ones_like(out))
        return out
    return run


def _pyg_scatter():
    try:
        from torch_geometric.utils import scatter, softmax

        return scatter, softmax
    except ImportError:
        return None, None


def _spmm_cases(spec, device, get):
    cases = []
    pyg_scatter, _ = _pyg_scatter()
    bytes_moved = lambda elt: spec.edges * (spec.feats * elt + 8 + elt) + spec.nodes * spec.feats * elt

    def leaf_x():
        return get()["x"].detach().requires_grad_()

    for reduce, sparse_reduce in (("sum", "sum"), ("mean", "mean"), ("max", "amax")):
        for mode in (("fwd", "fwd+bwd") if reduce == "sum" else ("fwd+bwd",)):
            xs = {}

            def x_for(name, mode=mode):
                if mode == "fwd":
                    return get()["x"]
                if name not in xs:
                    xs[name] = leaf_x()
                return xs[name]

            def wrap(name, body, mode=mode, x_for=x_for):
                if mode == "fwd":
                    return lambda: body(x_for(name))
                return lambda: _fwd_bwd(lambda: body(x_for(name)), x_for(name))()

            # Default arguments bind this iteration's reduction: a bare closure would see the loop's last one.
            providers = {
                "pykernels": wrap("pk", lambda x, r=reduce: pk.spmm(get()["csr"], x, get()["w"], r)),
                "torch.sparse.mm (CSR)": wrap("sp", lambda x, r=sparse_reduce: torch.sparse.mm(get()["A"], x, r)
                                              if r != "sum" else torch.sparse.mm(get()["A"], x)),
            }
            if pyg_scatter is not None:
                providers["PyG gather-scatter"] = wrap("pyg", lambda x, r=reduce: pyg_scatter(
                    x.index_select(0, get()["ei"][0]) * get()["w"].unsqueeze(1), get()["ei"][1], 0, spec.nodes, r))
            if reduce == "sum":
                providers["torch index_add_"] = wrap("ia", lambda x: torch.zeros_like(x).index_add_(
                    0, get()["ei"][1], x.index_select(0, get()["ei"][0]) * get()["w"].unsqueeze(1)))
            cases.append(Case(FAMILY, f"spmm {reduce} · {spec.label}", mode, providers, bytes_moved(4)))
    return cases


def _scatter_cases(spec, device, get):
    def src():
        data = get()
        if "src" not in data:
            data["src"] = data["x"].index_select(0, data["ei"][0])
        return data["src"]

    def reduce_values(kind):
        return torch.zeros(spec.nodes, spec.feats, device=device).scatter_reduce(
            0, get()["ei"][1].unsqueeze(1).expand(-1, spec.feats), src(), kind, include_self=False)

    def max_with_indices():
        """torch_scatter's scatter_max in plain torch: the maxima, then the first position holding each."""
        index = get()["ei"][1].unsqueeze(1).expand(-1, spec.feats)
        values = reduce_values("amax")
        positions = torch.arange(spec.edges, device=device).unsqueeze(1)
        holds = src() == values.gather(0, index)
        first = torch.full((spec.nodes, spec.feats), spec.edges, device=device).scatter_reduce(
            0, index, torch.where(holds, positions, spec.edges), "amin")
        return values, first

    cases = []
    for reduce in ("sum", "max"):
        providers = {"pykernels": lambda r=reduce: pk.scatter(src(), get()["ei"][1], 0, spec.nodes, r)}
        if reduce == "sum":
            providers["torch scatter_reduce"] = lambda: reduce_values("sum")
            providers["torch index_add_"] = lambda: torch.zeros(spec.nodes, spec.feats, device=device).index_add_(
                0, get()["ei"][1], src())
        else:
            providers["torch scatter_reduce + first index of the max"] = max_with_indices
            providers["torch scatter_reduce (values only)"] = lambda: reduce_values("amax")
        cases.append(Case(FAMILY, f"scatter {reduce} · {spec.label}", "fwd", providers,
                          spec.edges * (spec.feats * 4 + 8) + spec.nodes * spec.feats * 4))
    return cases


def _attention_cases(spec, device, get):
    heads = 8 if spec.feats % 8 == 0 else 4
    dim = max(spec.feats // heads, 1)
    _, pyg_softmax = _pyg_scatter()

    def qkv():
        data = get()
        if "qkv" not in data:
            g = torch.Generator().manual_seed(3)
            data["qkv"] = [torch.randn(spec.nodes, heads, dim, generator=g).to(device).requires_grad_()
                           for _ in range(3)]
            data["scores"] = torch.randn(spec.edges, heads, generator=g).to(device).requires_grad_()
        return data["qkv"]

    def fused():
        q, k, v = qkv()
        return pk.graph_attention(get()["csr"], q, k, v)

    def unfused():
        q, k, v = qkv()
        ei = get()["ei"]
        return ref.graph_attention(ei[1], ei[0], spec.nodes, q, k, v, dim ** -0.5)[0]

    label = f"graph_attention H={heads} D={dim} · {spec.label}"
    cases = [
        Case(FAMILY, label, "fwd", {"pykernels (fused)": lambda: fused(),
                                    "unfused gather-softmax-scatter": lambda: unfused()}),
        Case(FAMILY, label, "fwd+bwd", {"pykernels (fused)": lambda: _fwd_bwd(fused, *qkv())(),
                                        "unfused gather-softmax-scatter": lambda: _fwd_bwd(unfused, *qkv())()}),
    ]
    sddmm = {"pykernels": lambda: _fwd_bwd(lambda: pk.sddmm(get()["csr"], qkv()[0], qkv()[1]), *qkv()[:2])(),
             "gather-mul-sum": lambda: _fwd_bwd(lambda: ref.sddmm(get()["ei"][1], get()["ei"][0], qkv()[0],
                                                                  qkv()[1]), *qkv()[:2])()}
    cases.append(Case(FAMILY, f"sddmm H={heads} D={dim} · {spec.label}", "fwd+bwd", sddmm))
    if pyg_softmax is not None:
        softmax = {
            "pykernels": lambda: _fwd_bwd(lambda: pk.edge_softmax(get()["csr"], get()["scores"]), get()["scores"])(),
            "PyG softmax": lambda: _fwd_bwd(lambda: pyg_softmax(get()["scores"], get()["ei"][1], num_nodes=spec.nodes),
                                            get()["scores"])(),
        }
        cases.append(Case(FAMILY, f"edge_softmax H={heads} · {spec.label}", "fwd+bwd", softmax))
    return cases


def _layer_cases(spec, device, get):
    try:
        import torch_geometric.nn as pyg_nn
    except ImportError:
        return []
    ours = pk.nn
    hidden = 64
    heads = 4
    configs = [
        ("GCNConv", lambda m: m.GCNConv(spec.feats, hidden)),
        ("GATConv", lambda m: m.GATConv(spec.feats, hidden // heads, heads=heads)),
        ("SAGEConv mean", lambda m: m.SAGEConv(spec.feats, hidden, aggr="mean")),
        ("SAGEConv max", lambda m: m.SAGEConv(spec.feats, hidden, aggr="max")),
        ("TransformerConv", lambda m: m.TransformerConv(spec.feats, hidden // heads, heads=heads)),
    ]
    cases = []
    for name, make in configs:
        if not hasattr(ours, name.split()[0]):
            continue

        def layers(make=make, name=name):
            data = get()
            key = f"layer {name}"
            if key not in data:
                torch.manual_seed(0)
                theirs = make(pyg_nn).to(device)
                mine = make(ours).to(device)
                mine.load_state_dict(theirs.state_dict())
                data[key] = (mine, theirs, data["x"].detach().requires_grad_())
            return data[key]

        def run(which, layers=layers):
            mine, theirs, x = layers()
            layer = mine if which == 0 else theirs
            out = layer(x, get()["ei"])
            grads = torch.autograd.grad(out, [x] + list(layer.parameters()), torch.ones_like(out))
            return grads

        cases.append(Case(FAMILY, f"{name} layer · {spec.label}", "fwd+bwd",
                          {"pykernels.nn": lambda run=run: run(0), "PyG": lambda run=run: run(1)}))
    return cases


def cases(device: torch.device, quick: bool, specs: list[GraphSpec] | None = None) -> list[Case]:
    """All cases; ``quick`` keeps Cora and PubMed whole and, at ogbn-arxiv size, the headline cases
    (SpMM sum, fused graph attention, GATConv), so the family finishes in a few minutes on two cores."""
    out = []
    for spec in SPECS if specs is None else specs:
        if quick and not spec.quick:
            continue
        get = lambda spec=spec: _data.get((spec, device), lambda: _build(spec, device))
        everything = (_spmm_cases(spec, device, get) + _scatter_cases(spec, device, get)
                      + _attention_cases(spec, device, get) + _layer_cases(spec, device, get))
        if spec.name == "ogbn-arxiv" and quick:
            everything = [c for c in everything
                          if c.name.startswith(("spmm sum", "GATConv")) or
                          (c.name.startswith("graph_attention") and c.mode == "fwd")]
            for c in everything:
                if c.name.startswith("spmm sum") and c.mode == "fwd+bwd":
                    c.providers = {k: v for k, v in c.providers.items() if k in ("pykernels", "torch.sparse.mm (CSR)")}
        if spec.name == "ogbn-products":
            # Gather-based baselines need [E, F] messages (25 GB) at this size: only SpMM sum runs.
            everything = [c for c in everything if c.name.startswith("spmm sum")]
            for c in everything:
                c.providers = {k: v for k, v in c.providers.items() if k in ("pykernels", "torch.sparse.mm (CSR)")}
        out += everything
    return out
