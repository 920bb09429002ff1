"""Every public op as a ``pykernels.selftest.Case``, for the tests that call all of them the same way
(tests/test_concurrency.py, tests/test_leaks.py).

``SELFTEST``: the selftest's cases (its ``small`` and ``medium`` sizes) plus the flow ops it does not cover.
``TINY``: the same ops on inputs of a few elements, for many repeated calls and for the interpreted Triton
engine, where each kernel runs one program at a time.
"""
import torch

import pykernels as pk
from pykernels.selftest import CASES, Case
from pykernels.testing import random_graph


def _flow_cases():
    def st_flow_make(size, g):
        p, f, t = (6, 5, 4) if size == "small" else (64, 16, 77)
        return [torch.rand(p, f, t, generator=g, dtype=torch.float64),
                torch.rand(p, f, f, generator=g, dtype=torch.float64)], []

    def max_flow_make(size, g):
        nodes, edges = (30, 120) if size == "small" else (300, 3000)
        return [], [random_graph(nodes, edges, seed=3), torch.rand(edges, generator=g, dtype=torch.float64),
                    nodes]

    def layered_make(size, g):
        layers, tokens = (3, 9) if size == "small" else (4, 50)
        return [], [torch.rand(layers, 2, tokens, tokens, generator=g, dtype=torch.float64).softmax(-1)]

    return (
        Case("flow", "st_flow", st_flow_make,
             lambda c, t, *, backend: pk.st_flow(c, [t, t], temperature=0.1, backend=backend)),
        # The exact max-flows run the C++ engine whatever the backend.
        Case("flow", "max_flow", max_flow_make,
             lambda ei, cap, n, *, backend: pk.max_flow(ei, cap, torch.arange(5), torch.arange(n - 5, n))),
        Case("flow", "max_flow_layered", layered_make, lambda maps, *, backend: pk.max_flow_layered(list(maps))),
    )


SELFTEST = {f"{c.family}: {c.name}": c for c in (*CASES, *_flow_cases())}


def _t(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)


def _graph():
    return random_graph(6, 14, seed=5)


def _tiny(family, name, make, run):
    return Case(family, name, lambda size, g: make(), run)


def _spmm(reduce):
    return _tiny("graph", f"spmm {reduce}", lambda: ([_t(6, 2, 3), _t(14, 2).abs()], [_graph()]),
                 lambda x, w, ei, *, backend: pk.spmm(ei, x, w if reduce == "sum" else None, reduce=reduce,
                                                      backend=backend))


def _scatter(reduce):
    return _tiny("graph", f"scatter {reduce}", lambda: ([_t(9, 3)], [torch.tensor([0, 2, 2, 1, 0, 4, 2, 1, 1]), 5]),
                 lambda src, index, n, *, backend: pk.scatter(src, index, 0, n, reduce=reduce, backend=backend))


TINY = {f"{c.family}: {c.name}": c for c in (
    _spmm("sum"), _spmm("mean"), _spmm("max"), _spmm("min"),
    _tiny("graph", "sddmm", lambda: ([_t(6, 2, 3), _t(6, 2, 3)], [_graph()]),
          lambda a, b, ei, *, backend: pk.sddmm(ei, a, b, backend=backend)),
    _tiny("graph", "edge_softmax", lambda: ([_t(14, 2)], [_graph()]),
          lambda s, ei, *, backend: pk.edge_softmax(ei, s, num_targets=6, backend=backend)),
    _tiny("graph", "graph_attention", lambda: ([_t(6, 1, 4), _t(6, 1, 4), _t(6, 1, 4), _t(14, 1)], [_graph()]),
          lambda q, k, v, b, ei, *, backend: pk.graph_attention(ei, q, k, v, edge_bias=b, backend=backend)),
    _scatter("sum"), _scatter("max"),
    _tiny("attention", "fused_attention causal GQA", lambda: ([_t(1, 2, 5, 8), _t(1, 1, 5, 8), _t(1, 1, 5, 8)], []),
          lambda q, k, v, *, backend: pk.fused_attention(q, k, v, causal=True, backend=backend)),
    _tiny("attention", "fused_attention bias",
          lambda: ([_t(1, 2, 5, 8), _t(1, 2, 6, 8), _t(1, 2, 6, 8), _t(1, 1, 5, 6)], []),
          lambda q, k, v, b, *, backend: pk.fused_attention(q, k, v, attn_bias=b, backend=backend)),
    _tiny("attention", "fused_attention head-mean map", lambda: ([_t(1, 2, 5, 8), _t(1, 1, 6, 8), _t(1, 1, 6, 8)], []),
          lambda q, k, v, *, backend: pk.fused_attention(q, k, v, return_attn_mean=True, backend=backend)),
    _tiny("window", "window_attention shifted",
          lambda: ([_t(1, 1, 16, 8), _t(1, 1, 16, 8), _t(1, 1, 16, 8), _t(9, 1)], []),
          lambda q, k, v, table, *, backend: pk.window_attention(q, k, v, (4, 4), 2, 1, table, backend=backend)),
    _tiny("window", "msw_msa", lambda: ([_t(1, 1, 16, 8), _t(1, 1, 16, 8), _t(1, 1, 16, 8)], []),
          lambda q, k, v, *, backend: pk.msw_msa(q, k, v, (4, 4), shift=(1, 1), backend=backend)),
    _tiny("window", "neighborhood_attention_2d",
          lambda: ([_t(1, 1, 20, 8), _t(1, 1, 20, 8), _t(1, 1, 20, 8), _t(1, 5, 5)], []),
          lambda q, k, v, rpb, *, backend: pk.neighborhood_attention_2d(q, k, v, (4, 5), 3, rel_pos_bias=rpb,
                                                                        backend=backend)),
    _tiny("flow", "maxmin_matmul", lambda: ([_t(2, 3, 4), _t(4, 5)], []),
          lambda a, b, *, backend: pk.maxmin_matmul(a, b, backend=backend)),
    _tiny("flow", "soft_maxmin_matmul", lambda: ([_t(2, 3, 4), _t(4, 5)], []),
          lambda a, b, *, backend: pk.soft_maxmin_matmul(a, b, 0.1, backend=backend)),
    _tiny("flow", "st_flow", lambda: ([_t(3, 4, 2).sigmoid(), _t(3, 4, 4).softmax(-1)], []),
          lambda c, t, *, backend: pk.st_flow(c, [t, t], temperature=0.1, backend=backend)),
    _tiny("flow", "max_flow", lambda: ([], [_graph(), _t(14).abs()]),
          lambda ei, cap, *, backend: pk.max_flow(ei, cap, torch.tensor([0, 1]), torch.tensor([4, 5]))),
    _tiny("flow", "max_flow_layered", lambda: ([], [_t(3, 4, 4).softmax(-1)]),
          lambda maps, *, backend: pk.max_flow_layered(list(maps))),
)}


def inputs(case, dtype, size="small"):
    """``case``'s inputs: those that get gradients (in ``dtype``), and the rest."""
    grad_inputs, rest = case.make(size, torch.Generator().manual_seed(0))
    return [t.to(dtype) for t in grad_inputs], rest


def call(case, grad_inputs, rest, backend):
    """Outputs and input gradients of one forward and backward, under fixed cotangents."""
    grad_inputs = [t.detach().clone().requires_grad_() for t in grad_inputs]
    outs = case.run(*grad_inputs, *rest, backend=backend)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    floats = [o for o in outs if o.is_floating_point() and o.requires_grad]
    grads = []
    if floats:
        g = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in floats]
        grads = torch.autograd.grad(floats, grad_inputs, cotangents, allow_unused=True)
    return [o.detach() for o in outs] + [gr for gr in grads if gr is not None]
