"""Ecosystem round trips: ``torch.export`` of models built on each family's ``pykernels.nn`` layers (the
exported program run here and, saved to disk, in a fresh process that imports pykernels), ``torch.save`` /
``torch.load``, ``copy.deepcopy`` and pickling of the modules and of ``CSR`` graphs, and every family's ops
inside ``torch.compile(dynamic=True)`` with shapes changing across calls."""
import copy
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch.export import Dim

import pykernels as pk
from pykernels.testing import random_graph


class _SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = pk.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        out, weights = self.mha(x, x, x)
        return out, weights


class _Neighborhood(torch.nn.Module):
    """The window family's op without an nn layer of its own, behind a projection."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.rpb = torch.nn.Parameter(torch.randn(2, 5, 5))

    def forward(self, x):
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return pk.neighborhood_attention_2d(q, k, v, (h, w), 3, rel_pos_bias=self.rpb)


class _Flow(torch.nn.Module):
    """The flow family has no nn layer: a learned map chained through the hard and soft (max, min) products
    and ST-Flow, as an explainability head would use them."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(6, 6))

    def forward(self, cross, temporal):
        a = self.logits.softmax(-1)
        hard = pk.maxmin_matmul(a, temporal)
        soft = pk.soft_maxmin_matmul(temporal, a, 0.1)
        return pk.st_flow(cross, [hard, soft]), pk.st_flow(cross, [temporal], temperature=0.05)


class _Graph(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gcn = pk.nn.GCNConv(8, 8)
        self.gat = pk.nn.GATConv(8, 4, heads=2)
        self.sage = pk.nn.SAGEConv(8, 8, aggr="max")
        self.transformer = pk.nn.TransformerConv(8, 4, heads=2)

    def forward(self, x, edge_index):
        h = self.sage(self.gat(self.gcn(x, edge_index), edge_index).relu(), edge_index)
        return self.transformer(h, edge_index)


class _GraphAttention(torch.nn.Module):
    """graph_attention on a CSR built inside the model, so the program holds the CSR construction too."""

    def forward(self, q, k, v, edge_index):
        return pk.graph_attention(pk.CSR.from_edge_index(edge_index, q.size(0)), q, k, v)


def _models():
    """name -> (module in eval mode, example inputs, other inputs of different sizes for the dynamic dims,
    dynamic_shapes)."""
    ei, ei2 = random_graph(10, 30, seed=1), random_graph(10, 41, seed=2)
    mswmsa = pk.nn.MSWMSA(16, 2)
    models = {
        "attention: MultiheadAttention": (
            _SelfAttention(), (torch.randn(2, 8, 16),), (torch.randn(2, 11, 16),), ({1: Dim("tokens", max=64)},)),
        "window: SwinBlock": (
            pk.nn.SwinBlock(16, num_heads=2, window_size=4, shift_size=2), (torch.randn(2, 8, 8, 16),),
            (torch.randn(3, 8, 8, 16),), ({0: Dim("batch", max=8)},)),
        "window: MSWMSA": (
            mswmsa, (torch.randn(2, 8, 8, 16), (1, 1)), (torch.randn(3, 8, 8, 16), (1, 1)),
            ({0: Dim("batch", max=8)}, (None, None))),
        "window: neighborhood": (
            _Neighborhood(), (torch.randn(2, 7, 9, 16),), (torch.randn(3, 7, 9, 16),), ({0: Dim("batch", max=8)},)),
        "flow: maxmin and st_flow": (
            _Flow(), (torch.rand(4, 6, 5), torch.rand(4, 6, 6)), (torch.rand(7, 6, 5), torch.rand(7, 6, 6)),
            ({0: Dim("locations", max=64)}, {0: Dim("locations", max=64)})),
        "graph: GCN, GAT, SAGE, TransformerConv": (
            _Graph(), (torch.randn(10, 8), ei), (torch.randn(10, 8), ei2), (None, {1: Dim("edges", max=1000)})),
        "graph: graph_attention": (
            _GraphAttention(), (*torch.randn(3, 10, 2, 4).unbind(0), ei), (*torch.randn(3, 10, 2, 4).unbind(0), ei2),
            (None, None, None, {1: Dim("edges", max=1000)})),
    }
    for module, *_ in models.values():
        module.eval()
    return models


def _seeded(make):
    """``make()`` under seed 0, leaving the global generator as other test modules expect it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return make()


MODELS = _seeded(_models)


def _run(module, args):
    with torch.no_grad():
        return module(*args)


@pytest.mark.parametrize("name", MODELS)
def test_export_runs_and_matches_eager(name):
    module, args, other_args, dynamic_shapes = MODELS[name]
    program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    torch.testing.assert_close(_run(program.module(), args), _run(module, args), atol=0, rtol=0)
    # The dynamic dims stayed symbolic: another size runs through the same program.
    torch.testing.assert_close(_run(program.module(), other_args), _run(module, other_args), atol=0, rtol=0)
    names = {node.target.name() for node in program.graph.nodes
             if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)}
    assert any(n.startswith("pykernels::") for n in names), f"{name}: no pykernels op in the program: {names}"


_LOAD_AND_COMPARE = """
import sys, torch
import pykernels  # registers the ops the programs call
for path in sys.argv[1:]:
    program = torch.export.load(path + ".pt2")
    args, expected = torch.load(path + ".io", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*args), expected, atol=0, rtol=0)
print("ok", len(sys.argv) - 1)
"""


def test_saved_programs_run_in_a_fresh_process(tmp_path):
    paths = []
    for i, (module, args, _, dynamic_shapes) in enumerate(MODELS.values()):
        path = str(tmp_path / f"model{i}")
        torch.export.save(torch.export.export(module, args, dynamic_shapes=dynamic_shapes), path + ".pt2")
        torch.save((args, _run(module, args)), path + ".io")
        paths.append(path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", _LOAD_AND_COMPARE, *paths], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", str(len(paths))]


def _round_trips(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    yield "torch.save/torch.load", torch.load(buffer, weights_only=False)
    yield "copy.deepcopy", copy.deepcopy(module)
    yield "pickle", pickle.loads(pickle.dumps(module))
    state = io.BytesIO()
    torch.save(module.state_dict(), state)
    state.seek(0)
    fresh = copy.deepcopy(module)
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    fresh.load_state_dict(torch.load(state))
    yield "state_dict", fresh


@pytest.mark.parametrize("name", MODELS)
def test_modules_survive_save_load_deepcopy_and_pickle(name):
    module, args, _, _ = MODELS[name]
    expected = _run(module, args)
    for how, copied in _round_trips(module):
        assert copied is not module
        torch.testing.assert_close(_run(copied, args), expected, atol=0, rtol=0, msg=lambda m: f"{how}: {m}")


def test_mswmsa_copies_keep_the_generator_state():
    """A copy of a module drawing random shifts draws the same shifts as the original from then on."""
    module = pk.nn.MSWMSA(16, 2, generator=torch.Generator().manual_seed(3)).eval()
    x = torch.randn(1, 8, 8, 16)
    copies = [c for _, c in _round_trips(module)][:3]
    expected = [_run(module, (x,)) for _ in range(4)]
    for copied in copies:
        torch.testing.assert_close([_run(copied, (x,)) for _ in range(4)], expected, atol=0, rtol=0)


def test_cached_gcn_survives_pickling():
    """GCNConv(cached=True) holds a CSR and its normalised weights; the copy keeps using them."""
    layer = pk.nn.GCNConv(8, 4, cached=True)
    x, ei = torch.randn(10, 8), random_graph(10, 30)
    expected = layer(x, ei)
    copied = pickle.loads(pickle.dumps(layer))
    assert copied._cache is not None
    torch.testing.assert_close(copied(x, random_graph(10, 5, seed=9)), expected, atol=0, rtol=0)


def _csr_fields(csr):
    return {f: getattr(csr, f) for f in csr.__dataclass_fields__}


@pytest.mark.parametrize("how", ["torch.load (weights_only default)", "pickle", "copy.deepcopy"])
def test_csr_round_trips(how):
    ei = random_graph(12, 40)
    csr = pk.CSR.from_edge_index(ei, 12, edge_weight=torch.rand(40))
    if how == "pickle":
        copied = pickle.loads(pickle.dumps(csr))
    elif how == "copy.deepcopy":
        copied = copy.deepcopy(csr)
    else:
        buffer = io.BytesIO()
        torch.save({"graph": csr, "step": 3}, buffer)
        buffer.seek(0)
        # A checkpoint holding a graph loads with torch.load's safe default, without weights_only=False.
        copied = torch.load(buffer)["graph"]
    assert type(copied) is pk.CSR
    for field, value in _csr_fields(csr).items():
        other = getattr(copied, field)
        if isinstance(value, torch.Tensor):
            assert other.dtype == value.dtype and torch.equal(other, value), field
        else:
            assert other == value, field
    x = torch.randn(12, 2, 3, requires_grad=True)
    out = pk.spmm(copied, x)
    torch.testing.assert_close(out, pk.spmm(csr, x), atol=0, rtol=0)
    # The cached transpose came along: the backward runs on the copy.
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(pk.spmm(csr, x).sum(), x)[0], atol=0, rtol=0)


# torch.compile(dynamic=True) ------------------------------------------------------------------------------------


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _qkv(*shape):
    return [_rand(*shape) for _ in range(3)]


def _grid(n):
    return (n // 8, 8)


def _graph_inputs(nodes, edges):
    return [random_graph(nodes, edges, seed=edges), *_qkv(nodes, 2, 4)]


COMPILED_OPS = _seeded(lambda: {
    "fused_attention": (lambda q, k, v: pk.fused_attention(q, k, v, causal=True),
                        [_qkv(1, 2, n, 8) for n in (5, 9, 14)]),
    "fused_attention head-mean map": (lambda q, k, v: pk.fused_attention(q, k, v, return_attn_mean=True),
                                      [_qkv(2, 2, n, 8) for n in (5, 9, 14)]),
    "window_attention": (lambda q, k, v: pk.window_attention(q, k, v, _grid(q.size(2)), 4, 2),
                         [_qkv(1, 2, h * 8, 8) for h in (8, 12, 16)]),
    "msw_msa": (lambda q, k, v: pk.msw_msa(q, k, v, _grid(q.size(2)), shift=(1, 1)),
                [_qkv(1, 2, h * 8, 8) for h in (8, 12, 16)]),
    "neighborhood_attention_2d": (lambda q, k, v: pk.neighborhood_attention_2d(q, k, v, _grid(q.size(2)), 3),
                                  [_qkv(1, 2, h * 8, 8) for h in (6, 9, 12)]),
    "maxmin_matmul": (pk.maxmin_matmul, [[_rand(2, m, 7), _rand(2, 7, m + 1)] for m in (3, 5, 9)]),
    "soft_maxmin_matmul": (lambda a, b: pk.soft_maxmin_matmul(a, b, 0.1),
                           [[_rand(2, m, 7), _rand(2, 7, m + 1)] for m in (3, 5, 9)]),
    "st_flow": (lambda c, t: pk.st_flow(c, [t, t]), [[_rand(p, 5, 3), _rand(p, 5, 5)] for p in (2, 4, 7)]),
    "graph_attention": (lambda ei, q, k, v: pk.graph_attention(pk.CSR.from_edge_index(ei, q.size(0)), q, k, v),
                        [_graph_inputs(n, e) for n, e in ((10, 30), (14, 52), (20, 71))]),
    "spmm, sddmm, edge_softmax": (
        lambda ei, q, k, v: pk.spmm(ei, v, pk.edge_softmax(ei, pk.sddmm(ei, q, k), num_targets=q.size(0)),
                                    num_targets=q.size(0)),
        [_graph_inputs(n, e) for n, e in ((10, 30), (14, 52), (20, 71))]),
    "scatter": (lambda ei, q, k, v: pk.scatter(q[ei[0]], ei[1], 0, q.size(0), reduce="max").values,
                [_graph_inputs(n, e) for n, e in ((10, 30), (14, 52), (20, 71))]),
})


def _outputs(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("name", COMPILED_OPS)
def test_compile_dynamic_with_changing_shapes(name):
    fn, calls = COMPILED_OPS[name]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    for args in calls:
        grad_inputs = [a for a in args if a.is_floating_point()]
        out, expected = _outputs(compiled(*args)), _outputs(fn(*args))
        torch.testing.assert_close(out, expected)
        cotangents = [torch.randn_like(e) for e in expected]
        torch.testing.assert_close(torch.autograd.grad(out, grad_inputs, cotangents, allow_unused=True),
                                   torch.autograd.grad(expected, grad_inputs, cotangents, allow_unused=True))
    # Shapes marked dynamic compile once per distinct guard failure at most, never once per call beyond that.
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= frames <= len(calls), f"{name}: {frames} graphs for {len(calls)} calls"
    torch._dynamo.reset()


def test_graph_ops_stay_dynamic_in_the_graph_size():
    fn, calls = COMPILED_OPS["graph_attention"]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend="aot_eager")
    for args in calls:
        compiled(*args)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_scale_computed_from_a_dynamic_shape_compiles():
    """Model code often writes ``scale=head_dim ** -0.5`` with head_dim read from a tensor's shape."""
    fn = lambda q, k, v: pk.fused_attention(q, k, v, scale=q.size(-1) ** -0.5)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend="aot_eager")
    for d in (8, 16):
        q, k, v = _qkv(1, 2, 5, d)
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
