"""Exact attention flow (max-flow on the layered DAG of attention maps): pykernels against networkx and
scipy's Dinic.

Every provider starts from the same raw attention maps (softmax of N(0, 2²) logits, fixed seed, residual 0.5)
and answers the same (source, sink) queries; each one's timed call includes its own setup: applying the
residual and building its graph (ours: float64 copies and the implicit layered network; scipy: a CSR matrix
with integer capacities; networkx: a DiGraph), so the ratios compare what a user would run end to end. networkx's Edmonds-Karp is timed at n = 20 only (it
needs ~25 s per query at n = 64).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pykernels._max_flow import max_flow_layered
from pykernels.reference.flow import with_residual

from .cases import Case, LazyData

FAMILY = "flow"
RESIDUAL = 0.5
# scipy's max-flow is integer only: capacities (<= 1 after the residual) become round(c * 2^20).
SCIPY_SCALE = 2**20


@dataclass(frozen=True)
class FlowSpec:
    layers: int
    tokens: int
    queries: int  # the query set every provider of the comparison case answers
    nx_queries: int  # the smaller query set of the case that includes networkx
    quick: bool = True

    @property
    def label(self) -> str:
        return f"L={self.layers}, n={self.tokens}"


SPECS = [
    FlowSpec(12, 20, 400, 4),
    FlowSpec(12, 64, 64, 2),
    FlowSpec(12, 128, 32, 1, quick=False),
]

_data = LazyData()


def _build(spec: FlowSpec):
    g = torch.Generator().manual_seed(0)
    maps = [torch.softmax(2 * torch.randn(spec.tokens, spec.tokens, generator=g), -1) for _ in range(spec.layers)]
    src = torch.randint(0, spec.tokens, (spec.queries,), generator=g)
    snk = torch.randint(0, spec.tokens, (spec.queries,), generator=g)
    return maps, src, snk


def _layered_edges(maps):
    """Edges (l, j) -> (l + 1, i) of the residual-applied maps as (tail, head, capacity) numpy arrays."""
    tails, heads, caps = [], [], []
    for l, a in enumerate(maps):
        c = with_residual(a.double(), RESIDUAL).numpy()
        n_out, n_in = c.shape
        i, j = np.meshgrid(np.arange(n_out), np.arange(n_in), indexing="ij")
        tails.append(l * n_in + j.ravel())
        heads.append((l + 1) * n_in + i.ravel())
        caps.append(c.ravel())
    return np.concatenate(tails), np.concatenate(heads), np.concatenate(caps)


def _scipy_dinic(maps, src, snk):
    import scipy.sparse as sp
    from scipy.sparse.csgraph import maximum_flow

    n, last = maps[0].size(-1), len(maps) * maps[0].size(-1)
    tails, heads, caps = _layered_edges(maps)
    num_nodes = last + n
    graph = sp.csr_matrix((np.round(caps * SCIPY_SCALE).astype(np.int32), (tails, heads)),
                          shape=(num_nodes, num_nodes))
    return [maximum_flow(graph, int(s), last + int(t), method="dinic").flow_value / SCIPY_SCALE
            for s, t in zip(src.tolist(), snk.tolist())]


def _networkx(maps, src, snk, algorithm: str):
    import networkx as nx
    from networkx.algorithms import flow

    n, last = maps[0].size(-1), len(maps) * maps[0].size(-1)
    tails, heads, caps = _layered_edges(maps)
    graph = nx.DiGraph()
    graph.add_weighted_edges_from(zip(tails.tolist(), heads.tolist(), caps.tolist()), weight="capacity")
    func = getattr(flow, algorithm)
    return [nx.maximum_flow_value(graph, int(s), last + int(t), flow_func=func)
            for s, t in zip(src.tolist(), snk.tolist())]


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def cases(device: torch.device, quick: bool) -> list[Case]:
    """CPU only: max-flow has no GPU engine (GPU maps are copied to the host), so the device is ignored."""
    out = []
    for spec in SPECS:
        if quick and not spec.quick:
            continue

        def get(spec=spec):
            return _data.get(spec, lambda: _build(spec))

        def ours(k=None, get=get):
            maps, src, snk = get()
            return max_flow_layered(maps, src[:k], snk[:k], residual=RESIDUAL)

        queries = f"{spec.queries} random (source, sink) queries"
        scipy_note = f"scipy: Dinic on integer capacities round(c * 2^{SCIPY_SCALE.bit_length() - 1})"
        if _have("scipy"):
            out.append(Case(FAMILY, f"exact attention flow · {spec.label}, {queries}", "fwd", {
                "pykernels": lambda ours=ours: ours(),
                "scipy maximum_flow (dinic)": lambda get=get: _scipy_dinic(*get()),
            }, notes={"queries": f"all providers answer the same {queries}", "setup": "inside every timed call",
                      "scipy": scipy_note}))
        if _have("networkx"):
            k = spec.nx_queries

            def first(get=get, k=k):
                maps, src, snk = get()
                return maps, src[:k], snk[:k]

            providers = {"pykernels": lambda ours=ours, k=k: ours(k)}
            for algorithm in ("preflow_push", "edmonds_karp") if spec.tokens <= 32 else ("preflow_push",):
                providers[f"networkx {algorithm}"] = lambda first=first, a=algorithm: _networkx(*first(), a)
            out.append(Case(FAMILY, f"exact attention flow · {spec.label}, {k} queries (networkx-sized)", "fwd",
                            providers, notes={"queries": f"all providers answer the same first {k} of the queries",
                                              "setup": "inside every timed call; at so few queries our fixed "
                                                       "per-call setup (a few ms) is a large part of our time"}))

        def all_pairs(get=get):
            return max_flow_layered(get()[0], residual=RESIDUAL)

        out.append(Case(FAMILY, f"exact attention flow · {spec.label}, all {spec.tokens ** 2} pairs", "fwd",
                        {"pykernels": all_pairs},
                        notes={"what": "every (source, sink) pair: what attention_flow(maps, mode='exact') computes; "
                                       "timed for pykernels only (scipy needs ~2 ms per pair at n = 64)"}))
    return out
