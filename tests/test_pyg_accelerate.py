"""pk.accelerate on PyG models (the "graph" family): GCN, GAT(v2), GraphSAGE and graph-transformer models against
the same model unaccelerated, a training step at a time; what falls back to PyG's forward, and why."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk
from pykernels.testing import compile_recording, random_graph

gnn = pytest.importorskip("torch_geometric.nn")
pyg_utils = pytest.importorskip("torch_geometric.utils")

pytestmark = pytest.mark.graph

N, E, D = 40, 200, 12
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}

CONVS = {
    "gcn": lambda i, o: gnn.GCNConv(i, o),
    "gcn-improved": lambda i, o: gnn.GCNConv(i, o, improved=True),
    "gat": lambda i, o: gnn.GATConv(i, o // 2, heads=2),
    "gat-dropout-mean": lambda i, o: gnn.GATConv(i, o, heads=3, concat=False, dropout=0.4, residual=True),
    "gat-edge-attr": lambda i, o: gnn.GATConv(i, o // 2, heads=2, edge_dim=3, fill_value="max"),
    "gatv2": lambda i, o: gnn.GATv2Conv(i, o // 2, heads=2),
    "gatv2-dropout-edge-shared": lambda i, o: gnn.GATv2Conv(i, o // 2, heads=2, dropout=0.4, edge_dim=3,
                                                            share_weights=True, residual=True),
    "sage": lambda i, o: gnn.SAGEConv(i, o),
    "sage-max-project": lambda i, o: gnn.SAGEConv(i, o, aggr="max", project=True, normalize=True),
    "transformer": lambda i, o: gnn.TransformerConv(i, o // 2, heads=2),
    "transformer-beta-dropout-edge": lambda i, o: gnn.TransformerConv(i, o // 2, heads=2, beta=True, dropout=0.3,
                                                                      edge_dim=3),
}


class Net(nn.Module):
    def __init__(self, make, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = make(D, 8), make(8, 4)
        self.head = nn.Linear(4, 2)
        # PyG initialises biases and GAT's attention vectors plainly (zeros); random ones would hide their misuse.
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        self.to(dtype)

    def forward(self, x, edge_index, edge_attr=None):
        extra = () if edge_attr is None else (edge_attr,)
        return self.head(self.conv2(F.elu(self.conv1(x, edge_index, *extra)), edge_index, *extra))


def _inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype), random_graph(N, E, seed=seed),
            torch.randn(E, 3, generator=g, dtype=torch.float64).to(dtype))


def _step(model, x, edge_index, edge_attr):
    """Output, input gradient and every parameter after one SGD step, from a fixed RNG state (dropout)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    torch.manual_seed(3)
    out = model(x, edge_index, edge_attr)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return out.detach(), x.grad, grads


def _assert_same_steps(model, reference, x, edge_index, edge_attr, tol, steps=2):
    for _ in range(steps):
        out, x_grad, grads = _step(model, x, edge_index, edge_attr)
        ref_out, ref_x_grad, ref_grads = _step(reference, x, edge_index, edge_attr)
        torch.testing.assert_close(out, ref_out, **tol)
        torch.testing.assert_close(x_grad, ref_x_grad, **tol)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], msg=name, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", list(CONVS))
def test_training_steps_match_pyg(kind, dtype):
    model = Net(CONVS[kind], dtype).train()
    reference = copy.deepcopy(model)
    report = pk.accelerate(model, families="graph")
    assert report.graph == ["conv1", "conv2"] and report.skipped == []
    x, edge_index, edge_attr = _inputs(dtype)
    # In float32 a step's rounding differences grow through the next step's sharper softmaxes: one step there.
    steps = 2 if dtype == torch.float64 else 1
    _assert_same_steps(model, reference, x, edge_index, edge_attr if "edge" in kind else None, TOL[dtype], steps)
    assert dict(report.calls) == {("pyg", "served"): 2 * steps}


def test_parameters_and_class_are_pygs():
    model = Net(CONVS["gat"])
    before = {name: p for name, p in model.named_parameters()}
    pk.accelerate(model, families="graph")
    assert type(model.conv1) is gnn.GATConv and isinstance(model.conv1, gnn.MessagePassing)
    assert all(p is before[name] for name, p in model.named_parameters())


def test_report_names_exactly_the_modules_changed():
    class MyGAT(gnn.GATConv):
        pass

    model = nn.ModuleDict({"gcn": gnn.GCNConv(D, 8), "mine": MyGAT(D, 8), "lin": nn.Linear(D, 8),
                           "inner": nn.ModuleDict({"sage": gnn.SAGEConv(D, 8)})})
    report = pk.accelerate(model, families="graph")
    assert report.graph == ["gcn", "inner.sage"]
    assert report.skipped == [("mine", "subclass MyGAT of PyG's GATConv")]
    assert "forward" not in model["mine"].__dict__
    assert "  graph    inner.sage: PyG conv on pykernels graph kernels" in str(report)
    assert pk.accelerate(model, families="attention").graph == []


def test_restore_gives_back_pygs_behaviour():
    model = Net(CONVS["sage"])
    reference = copy.deepcopy(model)
    report = pk.accelerate(model, families="graph")
    pk.restore(model)
    assert all("forward" not in m.__dict__ and "__prepare_scriptable__" not in m.__dict__ for m in model.modules())
    x, edge_index, _ = _inputs(torch.float64)
    torch.testing.assert_close(model(x, edge_index), reference(x, edge_index), atol=0, rtol=0)
    assert report.calls == {}


def test_accelerate_is_idempotent_and_the_report_live():
    model = Net(CONVS["gcn"])
    first = pk.accelerate(model, families="graph")
    second = pk.accelerate(model, families="graph")
    assert second.graph == [] and second.skipped == [("conv1", "already runs on pykernels"),
                                                     ("conv2", "already runs on pykernels")]
    x, edge_index, _ = _inputs(torch.float64)
    model(x, edge_index)
    assert first.calls is second.calls and first.served("pyg") == 2


def test_a_layer_accelerated_as_the_root():
    conv = gnn.GATConv(D, 4, heads=2).double()
    reference = copy.deepcopy(conv)
    report = pk.accelerate(conv)
    x, edge_index, _ = _inputs(torch.float64)
    torch.testing.assert_close(conv(x, edge_index), reference(x, edge_index), **TOL[torch.float64])
    assert report.graph == [""] and report.served("pyg") == 1
    pk.restore(conv)
    assert "forward" not in conv.__dict__


def _layer(make, dtype=torch.float64):
    torch.manual_seed(0)
    conv = make().to(dtype)
    accelerated = copy.deepcopy(conv)
    return conv, accelerated, pk.accelerate(accelerated, families="graph")


def _same(a, b):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    else:
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)


def _sparse(edge_index):
    return pyg_utils.to_torch_csc_tensor(edge_index, torch.ones(E, dtype=torch.float64), size=(N, N)).t()


FALLBACKS = {
    "sparse adjacency": (lambda: gnn.GCNConv(D, 8), lambda x, ei: (x, _sparse(ei))),
    "flow='target_to_source'": (lambda: gnn.GCNConv(D, 8, flow="target_to_source"), lambda x, ei: (x, ei)),
    "aggregation 'lstm'": (lambda: gnn.SAGEConv(D, 8, aggr="lstm"),
                           lambda x, ei: (x, ei[:, torch.argsort(ei[1], stable=True)])),
    "aggregation ['mean', 'max']": (lambda: gnn.SAGEConv(D, 8, aggr=["mean", "max"]), lambda x, ei: (x, ei)),
    "x_dst is None": (lambda: gnn.GATConv(D, 8), lambda x, ei: ((x, None), ei)),
    "decomposed_layers > 1": (lambda: gnn.GCNConv(D, 8, decomposed_layers=2), lambda x, ei: (x, ei)),
    "edge_index is a tensor subclass (EdgeIndex)": (
        lambda: gnn.SAGEConv(D, 8), lambda x, ei: (x, __import__("torch_geometric").EdgeIndex(ei, sparse_size=(N, N)))),
    "node features not 2-D": (lambda: gnn.GCNConv(D, 8), lambda x, ei: (x.expand(2, N, D), ei)),
}


@pytest.mark.parametrize("reason", list(FALLBACKS))
def test_unserved_forms_run_pygs_forward_and_are_counted(reason):
    make, arguments = FALLBACKS[reason]
    conv, accelerated, report = _layer(make)
    x, edge_index, _ = _inputs(torch.float64)
    args = arguments(x, edge_index)
    _same(accelerated(*args), conv(*args))
    assert dict(report.calls) == {("pyg", reason): 1}


def test_size_equal_to_the_node_counts_is_served_and_any_other_runs_pyg():
    conv, accelerated, report = _layer(lambda: gnn.SAGEConv((D, 5), 8))
    x, _, _ = _inputs(torch.float64)
    x_dst = torch.randn(7, 5, dtype=torch.float64)
    edge_index = random_graph(N, 30, num_targets=7, seed=2)
    _same(accelerated((x, x_dst), edge_index, (N, 7)), conv((x, x_dst), edge_index, (N, 7)))
    assert dict(report.calls) == {("pyg", "served"): 1}
    # PyG checks size against the features and raises its own error.
    with pytest.raises(ValueError, match="expected size 6"):
        accelerated((x, x_dst), edge_index, (N, 6))
    assert report.fallbacks("pyg") == {"size argument other than the node counts": 1}


def test_hooks_and_explain_mode_run_pygs_forward():
    conv, accelerated, report = _layer(lambda: gnn.SAGEConv(D, 8))
    x, edge_index, _ = _inputs(torch.float64)
    seen = []
    handle = accelerated.register_message_forward_hook(lambda module, inputs, out: seen.append(out.shape))
    accelerated(x, edge_index)
    assert seen == [(E, D)]
    handle.remove()
    from torch_geometric.explain.algorithm.utils import clear_masks, set_masks

    mask = torch.rand(E, dtype=torch.float64)
    for module in (conv, accelerated):
        set_masks(module, mask, edge_index, apply_sigmoid=True)
    _same(accelerated(x, edge_index), conv(x, edge_index))
    for module in (conv, accelerated):
        clear_masks(module)
    _same(accelerated(x, edge_index), conv(x, edge_index))
    assert dict(report.calls) == {("pyg", "message-passing hooks"): 1, ("pyg", "explain mode"): 1,
                                  ("pyg", "served"): 1}


def test_lazy_layer_falls_back_until_initialised():
    conv, accelerated, report = _layer(lambda: gnn.SAGEConv(-1, 8))
    x, edge_index, _ = _inputs(torch.float64)
    accelerated(x, edge_index)
    conv.load_state_dict(accelerated.state_dict())
    _same(accelerated(x, edge_index), conv(x, edge_index))
    assert dict(report.calls) == {("pyg", "lazy parameters not initialised"): 1, ("pyg", "served"): 1}


def test_gcn_cache_follows_pygs_attributes():
    conv, accelerated, report = _layer(lambda: gnn.GCNConv(D, 8, cached=True))
    x, edge_index, _ = _inputs(torch.float64)
    other = random_graph(N, E, seed=7)
    results = {}
    for name, module in (("pyg", conv), ("pk", accelerated)):
        first = module(x, edge_index)
        stale = module(x, other)  # PyG keeps the first graph's normalisation until its cache is reset
        module._cached_edge_index = None
        fresh = module(x, other)
        results[name] = (first, stale, fresh)
    _same(results["pk"], results["pyg"])
    assert not torch.allclose(results["pyg"][1], results["pyg"][2])
    assert accelerated._cached_edge_index is not None and report.served("pyg") == 3


def test_graph_structure_is_rebuilt_after_in_place_changes():
    model = Net(CONVS["gat"])
    reference = copy.deepcopy(model)
    pk.accelerate(model, families="graph")
    x, edge_index, _ = _inputs(torch.float64)
    torch.testing.assert_close(model(x, edge_index), reference(x, edge_index), **TOL[torch.float64])
    edge_index[0, :50] = torch.arange(50) % N
    torch.testing.assert_close(model(x, edge_index), reference(x, edge_index), **TOL[torch.float64])


def test_return_attention_weights_as_pyg():
    x, edge_index, edge_attr = _inputs(torch.float64)
    for make, extra in ((lambda: gnn.GATConv(D, 4, heads=2, edge_dim=3), (edge_attr,)),
                        (lambda: gnn.GATv2Conv(D, 4, heads=2), ()),
                        (lambda: gnn.TransformerConv(D, 4, heads=2), ())):
        conv, accelerated, report = _layer(make)
        _same(accelerated(x, edge_index, *extra, return_attention_weights=True),
              conv(x, edge_index, *extra, return_attention_weights=True))
        assert report.served("pyg") == 1


def test_gcn_with_edge_weight_and_without_normalisation():
    x, edge_index, _ = _inputs(torch.float64)
    weight = torch.rand(E, dtype=torch.float64, requires_grad=True)
    for make in (lambda: gnn.GCNConv(D, 8, improved=True), lambda: gnn.GCNConv(D, 8, normalize=False)):
        conv, accelerated, report = _layer(make)
        outs = [m(x, edge_index, weight) for m in (accelerated, conv)]
        _same(outs[0], outs[1])
        grads = [torch.autograd.grad(o.sum(), weight)[0] for o in outs]
        _same(grads[0], grads[1])
        assert report.served("pyg") == 1


def test_copies_scripting_and_pickling():
    model = Net(CONVS["gcn"])
    reference = copy.deepcopy(model)
    report = pk.accelerate(model, families="graph")
    x, edge_index, _ = _inputs(torch.float64)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x, edge_index), reference(x, edge_index), **TOL[torch.float64])
    assert report.served("pyg") == 0 and isinstance(twin.conv1.__dict__["forward"], type(model.conv1.forward))
    unpickled = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(unpickled(x, edge_index), reference(x, edge_index), **TOL[torch.float64])
    # TorchScript compiles PyG's own forward of a copy sharing the Parameters; the layer stays accelerated.
    scripted = torch.jit.script(model.conv1)
    torch.testing.assert_close(scripted(x, edge_index), reference.conv1(x, edge_index), **TOL[torch.float64])
    assert isinstance(model.conv1.__dict__["forward"], type(twin.conv1.forward))


@pytest.mark.parametrize("kind", ["gcn", "gat", "gatv2", "sage", "transformer"])
def test_compile_fullgraph(kind):
    model = Net(CONVS[kind]).eval()
    reference = copy.deepcopy(model)
    report = pk.accelerate(model, families="graph")
    graphs = []
    compiled = compile_recording(model, graphs)
    x, edge_index, _ = _inputs(torch.float64)
    torch.testing.assert_close(compiled(x, edge_index), reference(x, edge_index), **TOL[torch.float64])
    assert len(graphs) == 1
    assert "pykernels.spmm" in graphs[0].code or "pykernels.graph_attention" in graphs[0].code
    assert dict(report.calls) == {("pyg", "served"): 2}


def test_inference_mode_then_training():
    model = Net(CONVS["gcn"])
    reference = copy.deepcopy(model)
    pk.accelerate(model, families="graph")
    x, edge_index, _ = _inputs(torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x, edge_index), reference(x, edge_index), **TOL[torch.float64])
    _assert_same_steps(model, reference, x, edge_index, None, TOL[torch.float64], steps=1)


def test_to_hetero_copies_stay_accelerated():
    class Hetero(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = gnn.SAGEConv((5, 5), 8), gnn.GATConv((8, 8), 4, add_self_loops=False)

        def forward(self, x, edge_index):
            return self.conv2(self.conv1(x, edge_index).relu(), edge_index)

    metadata = (["a", "b"], [("a", "to", "b"), ("b", "to", "a")])
    x = {"a": torch.randn(30, 5, dtype=torch.float64), "b": torch.randn(20, 5, dtype=torch.float64)}
    edge_index = {("a", "to", "b"): random_graph(30, 90, num_targets=20, seed=1),
                  ("b", "to", "a"): random_graph(20, 70, num_targets=30, seed=2)}
    torch.manual_seed(0)
    model = Hetero().double()
    reference = gnn.to_hetero(copy.deepcopy(model), metadata)
    pk.accelerate(model, families="graph")
    hetero = gnn.to_hetero(model, metadata)
    served = type(model.conv1.forward)
    convs = [m for m in hetero.modules() if isinstance(m, gnn.MessagePassing)]
    assert len(convs) == 4 and all(isinstance(m.__dict__.get("forward"), served) for m in convs)
    reference.load_state_dict(hetero.state_dict())
    out, expected = hetero(x, edge_index), reference(x, edge_index)
    for node_type in ("a", "b"):
        torch.testing.assert_close(out[node_type], expected[node_type], **TOL[torch.float64])
