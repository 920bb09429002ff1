"""Graph layers against torch_geometric: load the PyG layer's state_dict, compare outputs and all gradients."""
import pytest
import torch

import pykernels as pk
from pykernels import nn as pknn
from pykernels.testing import TOLERANCES, random_graph

pyg = pytest.importorskip("torch_geometric.nn")
pyg_utils = pytest.importorskip("torch_geometric.utils")

pytestmark = pytest.mark.graph

DTYPES = [torch.float64, torch.float32]


def _handmade():
    # A duplicate edge (0 -> 2 twice), a doubled self loop on 3, a single one on 5, isolated node 6.
    return 7, torch.tensor([[0, 0, 1, 3, 3, 2, 4, 5, 1], [2, 2, 2, 3, 3, 1, 3, 5, 4]])


GRAPHS = {
    "handmade": _handmade,
    "random": lambda: (23, random_graph(23, 70, seed=5)),
    "one-node": lambda: (1, torch.zeros(2, 0, dtype=torch.long)),
    "no-edges": lambda: (5, torch.zeros(2, 0, dtype=torch.long)),
    "one-loop": lambda: (1, torch.zeros(2, 1, dtype=torch.long)),
}


def _rand(*shape, dtype, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(*shape, generator=g, dtype=torch.float64) + 0.1 if positive else \
        torch.randn(*shape, generator=g, dtype=torch.float64)
    return t.to(dtype).requires_grad_()


def _pair(pyg_cls, our_cls, dtype, *args, **kwargs):
    """The PyG layer with random parameters (biases included) and ours loaded from its state_dict."""
    torch.manual_seed(0)
    theirs = pyg_cls(*args, **kwargs).to(dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ours = our_cls(*args, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _outputs_and_grads(layer, call, inputs):
    out = call(layer)
    params = dict(layer.named_parameters())
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, list(inputs) + list(params.values()), upstream, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, list(inputs) + list(params.values()))]
    names = [f"input {i}" for i in range(len(inputs))] + list(params)
    return out, dict(zip(names, grads))


def _compare(ours, theirs, call, inputs, dtype, fix_expected=None):
    atol, rtol = TOLERANCES[dtype]
    out, grads = _outputs_and_grads(ours, call, inputs)
    expected, expected_grads = _outputs_and_grads(theirs, call, inputs)
    if fix_expected is not None:
        fix_expected(expected_grads)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------- GCNConv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"improved": True}, {"add_self_loops": False}, {"bias": False},
                                    {"normalize": False}], ids=str)
def test_gcn_matches_pyg(dtype, graph, weighted, kwargs):
    n, ei = GRAPHS[graph]()
    x = _rand(n, 6, dtype=dtype, seed=1)
    w = _rand(ei.size(1), dtype=dtype, seed=2, positive=True) if weighted else None
    ours, theirs = _pair(pyg.GCNConv, pknn.GCNConv, dtype, 6, 4, **kwargs)
    adds_loops = kwargs.get("add_self_loops", kwargs.get("normalize", True))
    _compare(ours, theirs, lambda m: m(x, ei, w), [x] + ([w] if weighted else []), dtype,
             _drop_shadowed_loops(ei) if weighted and adds_loops else None)


def _drop_shadowed_loops(ei):
    """Zeroes PyG's weight gradient of self loops followed by another on the same node.

    PyG keeps the last such loop's weight, yet its gradient (index assignment's backward) also reaches the
    shadowed ones, which do not affect the output: ours is the exact gradient there (see the gradcheck).
    """
    loop = ei[0] == ei[1]
    later = loop.unsqueeze(0) & (ei[0].unsqueeze(0) == ei[0].unsqueeze(1)) & torch.ones(
        loop.numel(), loop.numel(), dtype=torch.bool).triu(1)
    return lambda grads: grads["input 1"].masked_fill_(loop & later.any(1), 0.0)


def test_gcn_edge_weight_gradient_is_exact():
    n, ei = GRAPHS["handmade"]()
    x = _rand(n, 3, dtype=torch.float64, seed=1)
    w = _rand(ei.size(1), dtype=torch.float64, seed=2, positive=True)
    layer = pknn.GCNConv(3, 2, improved=True).double()
    assert torch.autograd.gradcheck(lambda x, w: layer(x, ei, w), (x, w))


@pytest.mark.parametrize("out_channels", [3, 9])
def test_gcn_linear_before_or_after_spmm(out_channels):
    n, ei = GRAPHS["random"]()
    x = _rand(n, 6, dtype=torch.float64, seed=1)
    ours, theirs = _pair(pyg.GCNConv, pknn.GCNConv, torch.float64, 6, out_channels, improved=True)
    w = _rand(ei.size(1), dtype=torch.float64, seed=2, positive=True)
    _compare(ours, theirs, lambda m: m(x, ei, w), [x, w], torch.float64, _drop_shadowed_loops(ei))


def test_gcn_cached_reuses_the_first_graph():
    n, ei = GRAPHS["handmade"]()
    x = _rand(n, 5, dtype=torch.float64, seed=1)
    ours, theirs = _pair(pyg.GCNConv, pknn.GCNConv, torch.float64, 5, 4, cached=True)
    first = ours(x, ei)
    other = ei[:, :3]
    torch.testing.assert_close(ours(x, other), first)
    torch.testing.assert_close(ours(x, other), theirs(x, ei))
    ours.reset_parameters()
    assert ours._cache is None


def test_gcn_csr_with_self_loops_matches_pyg():
    n, ei = GRAPHS["handmade"]()
    x = _rand(n, 5, dtype=torch.float64, seed=1)
    w = _rand(ei.size(1), dtype=torch.float64, seed=2, positive=True)
    ours, theirs = _pair(pyg.GCNConv, pknn.GCNConv, torch.float64, 5, 4, improved=True)
    loops, loop_w = pyg_utils.add_remaining_self_loops(ei, w, 2.0, n)
    csr = pk.CSR.from_edge_index(loops, n)
    torch.testing.assert_close(ours(x, csr, loop_w), theirs(x, ei, w))
    csr_weighted = pk.CSR.from_edge_index(loops, n, edge_weight=loop_w)
    torch.testing.assert_close(ours(x, csr_weighted), theirs(x, ei, w))


# ------------------------------------------------------------------------------------------------- GATConv


GAT_CONFIGS = [
    dict(heads=1),
    dict(heads=3),
    dict(heads=3, concat=False),
    dict(heads=2, add_self_loops=False),
    dict(heads=2, residual=True, bias=False),
    dict(heads=3, edge_dim=4),
    dict(heads=2, edge_dim=4, fill_value=0.5, concat=False),
    dict(heads=2, edge_dim=4, fill_value="max"),
    dict(heads=2, edge_dim=4, fill_value="add", add_self_loops=False),
    dict(heads=2, edge_dim=1, fill_value=torch.tensor([0.25])),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("kwargs", GAT_CONFIGS, ids=str)
def test_gat_matches_pyg(dtype, graph, kwargs):
    n, ei = GRAPHS[graph]()
    x = _rand(n, 5, dtype=dtype, seed=1)
    inputs = [x]
    attr = None
    if kwargs.get("edge_dim"):
        shape = (ei.size(1),) if kwargs["edge_dim"] == 1 else (ei.size(1), kwargs["edge_dim"])
        attr = _rand(*shape, dtype=dtype, seed=3)
        inputs.append(attr)
    ours, theirs = _pair(pyg.GATConv, pknn.GATConv, dtype, 5, 4, **kwargs)
    _compare(ours, theirs, lambda m: m(x, ei, attr), inputs, dtype)


@pytest.mark.parametrize("in_channels", [5, (5, 3)], ids=["shared-lin", "lin-src-dst"])
@pytest.mark.parametrize("sizes", [(9, 6), (6, 9)], ids=["more-sources", "more-targets"])
def test_gat_bipartite_matches_pyg(in_channels, sizes):
    n_src, n_dst = sizes
    ei = random_graph(n_src, 30, num_targets=n_dst, seed=7)
    dst_channels = 5 if isinstance(in_channels, int) else 3
    x_src = _rand(n_src, 5, dtype=torch.float64, seed=1)
    x_dst = _rand(n_dst, dst_channels, dtype=torch.float64, seed=2)
    attr = _rand(30, 2, dtype=torch.float64, seed=3)
    # PyG's 'mean' fill scatters into min(n_src, n_dst) groups, so it fails when targets outnumber sources.
    fill = 0.3 if n_dst > n_src else "mean"
    ours, theirs = _pair(pyg.GATConv, pknn.GATConv, torch.float64, in_channels, 4, heads=2, edge_dim=2,
                         residual=True, fill_value=fill)
    _compare(ours, theirs, lambda m: m((x_src, x_dst), ei, attr), [x_src, x_dst, attr], torch.float64)


@pytest.mark.parametrize("graph", ["handmade", "random", "one-loop"])
def test_gat_attention_weights_match_pyg(graph):
    n, ei = GRAPHS[graph]()
    x = _rand(n, 5, dtype=torch.float64, seed=1)
    ours, theirs = _pair(pyg.GATConv, pknn.GATConv, torch.float64, 5, 4, heads=3)
    out, (edges, alpha) = ours(x, ei, return_attention_weights=True)
    expected, (expected_edges, expected_alpha) = theirs(x, ei, return_attention_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(edges, expected_edges)
    torch.testing.assert_close(alpha, expected_alpha)


def test_gat_csr_with_self_loops_matches_pyg():
    n, ei = GRAPHS["handmade"]()
    x = _rand(n, 5, dtype=torch.float64, seed=1)
    ours, theirs = _pair(pyg.GATConv, pknn.GATConv, torch.float64, 5, 4, heads=2)
    loops, _ = pyg_utils.add_self_loops(pyg_utils.remove_self_loops(ei)[0], num_nodes=n)
    csr = pk.CSR.from_edge_index(loops, n)
    out, (graph, alpha) = ours(x, csr, return_attention_weights=True)
    expected, (_, expected_alpha) = theirs(x, ei, return_attention_weights=True)
    assert graph is csr
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(alpha, expected_alpha)


# ------------------------------------------------------------------------------------------------ SAGEConv


SAGE_CONFIGS = [
    dict(aggr="mean"),
    dict(aggr="max"),
    dict(aggr="sum", normalize=True),
    dict(aggr="mean", project=True, bias=False),
    dict(aggr="max", root_weight=False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("out_channels", [3, 8])
@pytest.mark.parametrize("kwargs", SAGE_CONFIGS, ids=str)
def test_sage_matches_pyg(dtype, graph, out_channels, kwargs):
    n, ei = GRAPHS[graph]()
    x = _rand(n, 6, dtype=dtype, seed=1)
    ours, theirs = _pair(pyg.SAGEConv, pknn.SAGEConv, dtype, 6, out_channels, **kwargs)
    _compare(ours, theirs, lambda m: m(x, ei), [x], dtype)


@pytest.mark.parametrize("aggr", ["mean", "max"])
def test_sage_bipartite_matches_pyg(aggr):
    ei = random_graph(9, 30, num_targets=4, seed=7)
    x_src, x_dst = _rand(9, 5, dtype=torch.float64, seed=1), _rand(4, 3, dtype=torch.float64, seed=2)
    ours, theirs = _pair(pyg.SAGEConv, pknn.SAGEConv, torch.float64, (5, 3), 4, aggr=aggr, project=True)
    _compare(ours, theirs, lambda m: m((x_src, x_dst), ei), [x_src, x_dst], torch.float64)


@pytest.mark.parametrize("aggr", ["mean", "sum", "max"])
def test_sage_edge_weight_scales_messages(aggr):
    n, ei = GRAPHS["handmade"]()
    x = _rand(n, 6, dtype=torch.float64, seed=1)
    w = _rand(ei.size(1), dtype=torch.float64, seed=2)
    layer = pknn.SAGEConv(6, 4, aggr=aggr).double()
    messages = (x[ei[0]] * w.unsqueeze(1)).detach()
    reduced = torch.zeros(n, 6, dtype=torch.float64).scatter_reduce(
        0, ei[1].view(-1, 1).expand(-1, 6), messages, {"mean": "mean", "sum": "sum", "max": "amax"}[aggr],
        include_self=False)
    expected = layer.lin_l(reduced) + layer.lin_r(x)
    torch.testing.assert_close(layer(x, ei, w), expected)


# ---------------------------------------------------------------------------------------- TransformerConv


TRANSFORMER_CONFIGS = [
    dict(heads=1),
    dict(heads=3),
    dict(heads=3, concat=False, beta=True),
    dict(heads=2, beta=True),
    dict(heads=2, root_weight=False, bias=False),
    dict(heads=3, edge_dim=4),
    dict(heads=2, edge_dim=4, concat=False, beta=True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("kwargs", TRANSFORMER_CONFIGS, ids=str)
def test_transformer_matches_pyg(dtype, graph, kwargs):
    n, ei = GRAPHS[graph]()
    x = _rand(n, 5, dtype=dtype, seed=1)
    inputs, attr = [x], None
    if kwargs.get("edge_dim"):
        attr = _rand(ei.size(1), kwargs["edge_dim"], dtype=dtype, seed=3)
        inputs.append(attr)
    ours, theirs = _pair(pyg.TransformerConv, pknn.TransformerConv, dtype, 5, 4, **kwargs)
    _compare(ours, theirs, lambda m: m(x, ei, attr), inputs, dtype)


@pytest.mark.parametrize("edge_dim", [None, 2])
def test_transformer_bipartite_and_attention_weights_match_pyg(edge_dim):
    ei = random_graph(9, 30, num_targets=4, seed=7)
    x_src, x_dst = _rand(9, 5, dtype=torch.float64, seed=1), _rand(4, 3, dtype=torch.float64, seed=2)
    attr = _rand(30, 2, dtype=torch.float64, seed=3) if edge_dim else None
    ours, theirs = _pair(pyg.TransformerConv, pknn.TransformerConv, torch.float64, (5, 3), 4, heads=2, beta=True,
                         edge_dim=edge_dim)
    inputs = [x_src, x_dst] + ([attr] if edge_dim else [])
    _compare(ours, theirs, lambda m: m((x_src, x_dst), ei, attr), inputs, torch.float64)
    out, (edges, alpha) = ours((x_src, x_dst), ei, attr, return_attention_weights=False)
    expected, (_, expected_alpha) = theirs((x_src, x_dst), ei, attr, return_attention_weights=False)
    assert edges is ei
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(alpha, expected_alpha)


# ------------------------------------------------------------------------------------------ all the layers


def _layers(**kwargs):
    """One small configuration of each layer, with a call taking (layer, x, edge_index, edge_attr)."""
    return {
        "gcn": (lambda: pknn.GCNConv(5, 4, improved=True, **kwargs), lambda m, x, ei, a: m(x, ei, a[:, 0].abs())),
        "gat": (lambda: pknn.GATConv(5, 4, heads=3, edge_dim=2, residual=True, **kwargs),
                lambda m, x, ei, a: m(x, ei, a)),
        "sage-mean": (lambda: pknn.SAGEConv(5, 4, project=True, **kwargs), lambda m, x, ei, a: m(x, ei)),
        "sage-max": (lambda: pknn.SAGEConv(5, 4, aggr="max", **kwargs), lambda m, x, ei, a: m(x, ei)),
        "transformer": (lambda: pknn.TransformerConv(5, 4, heads=2, beta=True, **kwargs),
                        lambda m, x, ei, a: m(x, ei)),
        "transformer-edge": (lambda: pknn.TransformerConv(5, 4, heads=2, edge_dim=2, **kwargs),
                             lambda m, x, ei, a: m(x, ei, a)),
    }


LAYERS = list(_layers())


@pytest.mark.parametrize("name", LAYERS)
def test_reference_backend_matches_default(name):
    n, ei = GRAPHS["handmade"]()
    x = _rand(n, 5, dtype=torch.float64, seed=1)
    attr = _rand(ei.size(1), 2, dtype=torch.float64, seed=3)
    make, call = _layers()[name]
    torch.manual_seed(0)
    ours = make().double()
    reference = make().double()
    reference.load_state_dict(ours.state_dict())
    reference.backend = "reference"
    _compare(ours, reference, lambda m: call(m, x, ei, attr), [x, attr], torch.float64)


@pytest.mark.parametrize("name", ["gat", "transformer", "transformer-edge"])
def test_attention_dropout(name):
    n, ei = GRAPHS["random"]()
    x = _rand(n, 5, dtype=torch.float64, seed=1)
    attr = _rand(ei.size(1), 2, dtype=torch.float64, seed=3)
    make, call = _layers(dropout=0.5)[name]
    torch.manual_seed(0)
    layer = make().double()
    plain = make().double()
    plain.load_state_dict(layer.state_dict())
    plain.dropout = 0.0
    expected = call(plain, x, ei, attr)
    torch.testing.assert_close(call(layer.eval(), x, ei, attr), expected)
    assert not torch.allclose(call(layer.train(), x, ei, attr), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYERS)
def test_compile_fullgraph_matches_eager(name):
    n, ei = GRAPHS["handmade"]()
    x = _rand(n, 5, dtype=torch.float32, seed=1)
    attr = _rand(ei.size(1), 2, dtype=torch.float32, seed=3)
    make, call = _layers()[name]
    torch.manual_seed(0)
    layer = make()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)
    eager = call(layer, x, ei, attr)
    out = call(compiled, x, ei, attr)
    torch.testing.assert_close(out, eager)
    inputs = [x, attr] + list(layer.parameters())
    grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
    expected = torch.autograd.grad(eager.sum(), inputs, allow_unused=True)
    for g, e in zip(grads, expected):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e)
