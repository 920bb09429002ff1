"""Graph ops: every engine against the float64 reference, forward and backward, plus opcheck and gradcheck."""
import itertools

import pytest
import torch

import pykernels as pk
from pykernels.reference import graph as ref
from pykernels.testing import assert_close, engines_for, namespaces, random_graph

pytestmark = pytest.mark.graph

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ENGINE_PARAMS = [pytest.param(d, e, marks=[pytest.mark.cuda] if d == "cuda" else [] +
                              ([pytest.mark.triton] if e == "triton" else []), id=f"{d}-{e}")
                 for d in DEVICES for e in engines_for(d)]
# Odd sizes: single node, no edges, tails, a prime feature width, isolated nodes and duplicates.
GRAPHS = [(1, 0), (1, 3), (7, 20), (40, 150), (5, 0)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _graph(n, e, seed=0, device="cpu"):
    return random_graph(n, e, seed=seed, device=device)


def _rand(*shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _grads(out, inputs, seed=1):
    upstream = _rand(*out.shape, dtype=out.dtype, device=out.device, seed=seed)
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True)


def _low_precision(dtype):
    return dtype in (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("device,engine", ENGINE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,e", GRAPHS)
@pytest.mark.parametrize("heads,feats", [(None, 1), (None, 33), (3, 5)])
@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize("weighted", [False, True])
def test_spmm_matches_reference(device, engine, dtype, n, e, heads, feats, reduce, weighted):
    ei = _graph(n, e, device=device)
    shape = (n, feats) if heads is None else (n, heads, feats)
    x = _rand(*shape, dtype=dtype, device=device, seed=2).requires_grad_()
    w = _rand(e, dtype=dtype, device=device, seed=3).requires_grad_() if weighted else None
    out = pk.spmm(ei, x, w, reduce, backend=engine)
    x64 = x.detach().double().view(n, -1 if heads is None else heads, feats).requires_grad_()
    w64 = w.detach().double().requires_grad_() if weighted else None
    expected, _ = ref.spmm(ei[1], ei[0], n, x64, None if w64 is None else w64.unsqueeze(1), reduce)
    expected = expected.view(shape)
    assert out.shape == expected.shape and out.dtype == dtype
    # Low precision rounds w * x before a max/min comparison differently from float64, so a near-tie may
    # pick the other edge; the value still agrees to the dtype's tolerance, the gradient need not.
    assert_close(out, expected, dtype, scale=4 if reduce in ("sum", "mean") else 1)
    if _low_precision(dtype) and reduce in ("max", "min"):
        return
    inputs = (x,) + ((w,) if weighted else ())
    grads = _grads(out, inputs)
    expected_grads = torch.autograd.grad(expected, (x64,) + ((w64,) if weighted else ()),
                                         _rand(*out.shape, dtype=dtype, device=device, seed=1).double(),
                                         allow_unused=True)
    for g, eg in zip(grads, expected_grads):
        eg = torch.zeros_like(g, dtype=torch.float64) if eg is None else eg
        assert_close(g, eg.view(g.shape), dtype, scale=8)


@pytest.mark.parametrize("device,engine", ENGINE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,e", GRAPHS)
@pytest.mark.parametrize("heads,feats", [(None, 1), (None, 16), (2, 7), (3, 12)])
def test_sddmm_matches_reference(device, engine, dtype, n, e, heads, feats):
    ei = _graph(n, e, seed=4, device=device)
    shape = (n, feats) if heads is None else (n, heads, feats)
    a = _rand(*shape, dtype=dtype, device=device, seed=5).requires_grad_()
    b = _rand(*shape, dtype=dtype, device=device, seed=6).requires_grad_()
    out = pk.sddmm(ei, a, b, backend=engine)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    expected = ref.sddmm(ei[1], ei[0], a64.view(n, -1, feats), b64.view(n, -1, feats))
    expected = expected.view(out.shape)
    assert_close(out, expected, dtype, scale=4)
    grads = _grads(out, (a, b))
    eg = torch.autograd.grad(expected, (a64, b64), _rand(*out.shape, dtype=dtype, device=device, seed=1).double())
    for g, ex in zip(grads, eg):
        assert_close(g, ex, dtype, scale=8)


@pytest.mark.parametrize("device,engine", ENGINE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,e", GRAPHS)
@pytest.mark.parametrize("heads", [None, 4])
def test_edge_softmax_matches_reference(device, engine, dtype, n, e, heads):
    ei = _graph(n, e, seed=7, device=device)
    shape = (e,) if heads is None else (e, heads)
    s = (_rand(*shape, dtype=dtype, device=device, seed=8) * 3).requires_grad_()
    out = pk.edge_softmax(ei, s, num_targets=n, backend=engine)
    s64 = s.detach().double().requires_grad_()
    expected = ref.edge_softmax(ei[1], s64.view(e, heads or 1), n).view(shape)
    assert_close(out, expected, dtype)
    (g,) = _grads(out, (s,))
    (eg,) = torch.autograd.grad(expected, s64, _rand(*shape, dtype=dtype, device=device, seed=1).double())
    assert_close(g, eg, dtype, scale=4)


@pytest.mark.parametrize("device,engine", ENGINE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,e", GRAPHS)
@pytest.mark.parametrize("heads,d,dv", [(1, 8, 8), (3, 5, 7), (2, 64, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_graph_attention_matches_reference(device, engine, dtype, n, e, heads, d, dv, with_bias):
    ei = _graph(n, e, seed=9, device=device)
    q = _rand(n, heads, d, dtype=dtype, device=device, seed=10).requires_grad_()
    k = _rand(n, heads, d, dtype=dtype, device=device, seed=11).requires_grad_()
    v = _rand(n, heads, dv, dtype=dtype, device=device, seed=12).requires_grad_()
    bias = _rand(e, heads, dtype=dtype, device=device, seed=13).requires_grad_() if with_bias else None
    out, weights = pk.graph_attention(ei, q, k, v, edge_bias=bias, return_attention_weights=True, backend=engine)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    bias64 = bias.detach().double().requires_grad_() if with_bias else None
    expected, expected_w = ref.graph_attention(ei[1], ei[0], n, *leaves64, d ** -0.5, bias64)
    assert_close(out, expected, dtype, scale=4)
    assert_close(weights, expected_w, dtype, scale=4)
    inputs = (q, k, v) + ((bias,) if with_bias else ())
    grads = _grads(out, inputs)
    eg = torch.autograd.grad(expected, tuple(leaves64) + ((bias64,) if with_bias else ()),
                             _rand(*out.shape, dtype=dtype, device=device, seed=1).double())
    for g, ex in zip(grads, eg):
        assert_close(g, ex, dtype, scale=16)


@pytest.mark.parametrize("device,engine", ENGINE_PARAMS)
def test_graph_attention_fully_masked_rows_give_zeros(device, engine):
    ei = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2]], device=device)
    q, k, v = (torch.randn(3, 2, 4, device=device, requires_grad=True) for _ in range(3))
    bias = torch.zeros(4, 2, device=device)
    bias[0:2, 0] = float("-inf")  # every edge into node 1, head 0
    out = pk.graph_attention(ei, q, k, v, edge_bias=bias, backend=engine)
    assert torch.equal(out[1, 0], torch.zeros(4, device=device))
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device,engine", ENGINE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_scatter_matches_reference(device, engine, dtype, reduce, dim):
    src = _rand(6, 9, 4, dtype=dtype, device=device, seed=14)
    # Repeated values make ties, which must resolve to the lowest position.
    src = (src * 2).round().requires_grad_()
    size = src.size(dim)
    index = torch.randint(0, 5, (size,), generator=torch.Generator().manual_seed(dim % 3)).to(device)
    result = pk.scatter(src, index, dim=dim, dim_size=6, reduce=reduce, backend=engine)
    moved = src.detach().movedim(dim, 0)
    exp_out, exp_arg = ref.scatter(moved.double(), index, 6, reduce)
    if reduce in ("max", "min"):
        out, arg = result
        assert torch.equal(arg, exp_arg.movedim(0, dim))
    else:
        out = result
    assert_close(out, exp_out.movedim(0, dim), dtype)
    (g,) = _grads(out, (src,))
    src64 = src.detach().double().requires_grad_()
    exp64, _ = ref.scatter(src64.movedim(dim, 0), index, 6, reduce)
    (eg,) = torch.autograd.grad(exp64.movedim(0, dim), src64, _rand(*out.shape, dtype=dtype, device=device,
                                                                     seed=1).double())
    assert_close(g, eg, dtype)


@pytest.mark.parametrize("device,engine", ENGINE_PARAMS)
def test_scatter_empty_groups_and_empty_input(device, engine):
    src = torch.randn(0, 3, device=device)
    index = torch.zeros(0, dtype=torch.long, device=device)
    out, arg = pk.scatter(src, index, dim_size=2, reduce="max", backend=engine)
    assert torch.equal(out, torch.zeros(2, 3, device=device)) and torch.equal(arg, torch.zeros(2, 3, dtype=torch.long, device=device))
    assert pk.scatter(src, index, dim_size=0, backend=engine).shape == (0, 3)


@pytest.mark.parametrize("device,engine", ENGINE_PARAMS)
def test_spmm_nan_propagates_like_torch(device, engine):
    ei = torch.tensor([[0, 1, 2], [0, 0, 0]], device=device)
    x = torch.tensor([[1.0], [float("nan")], [5.0]], device=device)
    for reduce in ("sum", "max", "min"):
        assert torch.isnan(pk.spmm(ei, x, reduce=reduce, backend=engine)[0, 0])


@pytest.mark.parametrize("device,engine", ENGINE_PARAMS)
def test_strided_and_expanded_inputs(device, engine):
    ei = random_graph(9, 30, seed=3, device=device)
    base = torch.randn(9, 2, 12, device=device)
    x = base[:, :, ::2]  # non-contiguous
    w = torch.rand(1, device=device).expand(30)  # expanded, stride 0
    ei_strided = torch.stack([ei[0], ei[1]], dim=1).t()  # [2, E] view with strides (1, 2)
    out = pk.spmm(ei_strided, x, w, backend=engine)
    expected, _ = ref.spmm(ei[1], ei[0], 9, x.contiguous().double(), w.double().unsqueeze(1), "sum")
    assert_close(out, expected, torch.float32)


def test_csr_accepts_int32_and_bipartite():
    ei = torch.tensor([[0, 3, 1, 3], [1, 0, 1, 2]], dtype=torch.int32)
    csr = pk.CSR.from_edge_index(ei, num_nodes=(4, 3))
    assert csr.num_cols == 4 and csr.num_rows == 3
    assert csr.rowptr.tolist() == [0, 1, 3, 4]
    assert csr.col.tolist() == [3, 0, 1, 3] and csr.perm.tolist() == [1, 0, 2, 3]
    # Transpose: sources 0..3 with their targets, perm_t pointing into CSR order.
    assert csr.rowptr_t.tolist() == [0, 1, 2, 2, 4]
    assert csr.col_t.tolist() == [1, 1, 0, 2] and csr.perm_t.tolist() == [1, 2, 0, 3]
    x = torch.randn(4, 5)
    assert_close(pk.spmm(csr, x), ref.spmm(ei[1].long(), ei[0].long(), 3, x.double(), None, "sum")[0],
                 torch.float32)


def test_csr_edge_weight_is_used_and_overridable():
    ei = random_graph(6, 15, seed=1)
    w = torch.rand(15)
    csr = pk.CSR.from_edge_index(ei, 6, edge_weight=w)
    x = torch.randn(6, 3)
    assert_close(pk.spmm(csr, x), ref.spmm(ei[1], ei[0], 6, x.double(), w.double(), "sum")[0],
                 torch.float32)
    assert_close(pk.spmm(csr, x, torch.ones(15)), ref.spmm(ei[1], ei[0], 6, x.double(), None, "sum")[0],
                 torch.float32)


@pytest.mark.parametrize("device,engine", ENGINE_PARAMS)
def test_csr_order_skips_the_reordering_and_nothing_else(device, engine):
    ei = random_graph(9, 40, seed=3, device=device)
    csr = pk.CSR.from_edge_index(ei, 9)
    x, a, b = (_rand(9, 2, 5, dtype=torch.float64, device=device, seed=s).requires_grad_() for s in (1, 2, 3))
    w = _rand(40, 2, dtype=torch.float64, device=device, seed=4).requires_grad_()
    pairs = [
        (pk.spmm(csr, x, w, backend=engine), pk.spmm(csr, x, csr.to_csr_order(w), csr_order=True, backend=engine)),
        (pk.sddmm(csr, a, b, backend=engine),
         csr.to_edge_order(pk.sddmm(csr, a, b, csr_order=True, backend=engine))),
        (pk.edge_softmax(csr, w, backend=engine),
         csr.to_edge_order(pk.edge_softmax(csr, csr.to_csr_order(w), csr_order=True, backend=engine))),
    ]
    for edge_order, csr_order in pairs:
        assert_close(csr_order, edge_order, torch.float64)
        leaves = (x, a, b, w)
        for g1, g2 in zip(_grads(edge_order, leaves), _grads(csr_order, leaves)):
            assert (g1 is None) == (g2 is None)
            if g1 is not None:
                assert_close(g2, g1, torch.float64)
    with pytest.raises(ValueError, match=r"pykernels.sddmm: csr_order=True needs a CSR graph"):
        pk.sddmm(ei, a, b, csr_order=True)


@pytest.mark.parametrize("device,engine", [p for p in ENGINE_PARAMS if p.values[1] != "reference"])
def test_results_are_bitwise_deterministic(device, engine):
    ei = random_graph(50, 400, seed=5, power_law=1.2, device=device)
    x = torch.randn(50, 2, 16, device=device, requires_grad=True)
    q = torch.randn(50, 2, 16, device=device, requires_grad=True)

    def run():
        out = pk.spmm(ei, x, reduce="sum", backend=engine) + pk.graph_attention(ei, q, x, x, backend=engine)
        return (out,) + torch.autograd.grad(out.square().sum(), (x, q))

    first = run()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, run()))


@pytest.mark.parametrize("device,engine", [  # a minute in the emulator: 6.3M emulated threads
    pytest.param(*p.values, id=p.id, marks=[*p.marks, *([pytest.mark.slow] if p.values == ("cpu", "cuda") else [])])
    for p in ENGINE_PARAMS if p.values[1] in ("cpu", "cuda")])
def test_spmm_past_65535_feature_tiles(device, engine):
    # H * F = 32 * 65535 + 3 features take 65536 tiles of 32 lanes on the CUDA engine's scalar path: more than
    # gridDim.y allows (the emulator names the kernel and its grid when a launch exceeds it).
    ei = torch.tensor([[0, 1], [0, 0]], device=device)
    x = torch.randn(2, 1, 32 * 65535 + 3, device=device, requires_grad=True)
    out = pk.spmm(ei, x, reduce="max", backend=engine)[0]  # node 1 receives no edge
    assert torch.equal(out, torch.maximum(x[0], x[1]))
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(grad, torch.stack([x[0] >= x[1], x[0] < x[1]]).to(x.dtype))
    x = x.detach()
    assert torch.equal(pk.spmm(ei, x, backend=engine)[0], x[0] + x[1])


@pytest.mark.slow
def test_index_math_past_2_31_elements():
    # x spans more than 2^31 elements; only the rows the edges read are touched, so the pages stay virtual.
    feats = 64
    rows = (2**31) // feats + 5
    x = torch.empty(rows, feats, dtype=torch.float16)
    far = torch.tensor([rows - 1, rows - 3])
    x[far] = torch.tensor([[1.0], [2.0]], dtype=torch.float16).expand(2, feats)
    ei = torch.stack([far, torch.tensor([0, 0])])
    out = pk.spmm(ei, x, num_targets=1, backend="cpu")
    assert torch.equal(out, torch.full((1, feats), 3.0, dtype=torch.float16))
    assert torch.equal(pk.sddmm(ei, torch.ones(1, feats, dtype=torch.float16), x),
                       torch.tensor([64.0, 128.0], dtype=torch.float16))


# ----------------------------------------------------------------------------------- opcheck / gradcheck


def _kernel_cases(dtype=torch.float64, requires_grad=False):
    ei = random_graph(7, 24, seed=21)
    csr = pk.CSR.from_edge_index(ei, 7)
    args = csr._kernel_args()

    def t(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)

    cases = {
        "coo_to_csr": [(ei[1], ei[0], 7, 7, "test")],
        "spmm": [args + (t(24, 2), t(7, 2, 3), r) for r in ("sum", "mean", "max", "min")] + [args + (None, t(7, 1, 4), "sum")],
        "sddmm": [args + (t(7, 2, 3), t(7, 2, 3))],
        "edge_softmax": [(csr.rowptr, t(24, 2))],
        "graph_attention": [args + (t(7, 2, 4), t(7, 2, 4), t(7, 2, 3), t(24, 2), 0.7),
                            args + (t(7, 1, 4), t(7, 1, 4), t(7, 1, 4), None, 0.5)],
    }
    return csr, cases


OPCHECK_NAMESPACES = namespaces()


@pytest.mark.parametrize("namespace", OPCHECK_NAMESPACES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(namespace, requires_grad):
    _, cases = _kernel_cases(requires_grad=requires_grad)
    for name, arg_lists in cases.items():
        op = getattr(getattr(torch.ops, namespace), name).default
        for args in arg_lists:
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("namespace", OPCHECK_NAMESPACES)
def test_opcheck_backward_ops(namespace):
    csr, _ = _kernel_cases()
    ns = getattr(torch.ops, namespace)
    args = csr._kernel_args()
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    w = torch.randn(24, 2, dtype=torch.float64)
    out, arg = ns.spmm(*args, w, x, "max")
    torch.library.opcheck(ns.spmm_arg_backward.default, args + (w, arg, torch.randn_like(out), x, True))
    torch.library.opcheck(ns.arg_to_source_.default, (arg.clone(), csr.col, 99))
    p = ns.edge_softmax(csr.rowptr, w)
    torch.library.opcheck(ns.edge_softmax_backward.default, (csr.rowptr, p, torch.randn_like(p)))
    q = torch.randn(7, 2, 4, dtype=torch.float64)
    o, lse = ns.graph_attention(*args, q, q, x, w, 0.5)
    torch.library.opcheck(ns.graph_attention_backward.default,
                          args + (q, q, x, w, o, lse, torch.randn_like(o), 0.5, True))


GRADCHECK_ENGINES = [e for e in engines_for("cpu")]


@pytest.mark.parametrize("engine", GRADCHECK_ENGINES)
def test_gradcheck_float64(engine):
    ei = random_graph(6, 18, seed=31)
    csr = pk.CSR.from_edge_index(ei, 6)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, w, q, k, v, b = t(6, 2, 3), t(18, 2), t(6, 2, 4), t(6, 2, 4), t(6, 2, 3), t(18, 2)
    for reduce in ("sum", "mean", "max", "min"):
        assert torch.autograd.gradcheck(lambda x, w: pk.spmm(csr, x, w, reduce, backend=engine), (x, w))
    assert torch.autograd.gradcheck(lambda a, c: pk.sddmm(csr, a, c, backend=engine), (q, k))
    assert torch.autograd.gradcheck(lambda s: pk.edge_softmax(csr, s, backend=engine), (w,))
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: pk.graph_attention(csr, q, k, v, edge_bias=b, backend=engine), (q, k, v, b))
    src = t(10, 3)
    index = torch.tensor([0, 2, 2, 1, 0, 0, 3, 2, 1, 0])
    for reduce in ("sum", "mean"):
        assert torch.autograd.gradcheck(lambda s: pk.scatter(s, index, dim_size=5, reduce=reduce, backend=engine),
                                        (src,))


# ------------------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("engine", [e for e in engines_for("cpu") if e != "triton"])
def test_compile_fullgraph(engine):
    ei = random_graph(8, 30, seed=41)
    csr = pk.CSR.from_edge_index(ei, 8)
    x = torch.randn(8, 2, 4, requires_grad=True)
    w = torch.rand(30, requires_grad=True)

    def f(x, w):
        h = pk.spmm(csr, x, w, "mean", backend=engine) + pk.spmm(ei, x, None, "max", backend=engine)
        s = pk.sddmm(csr, h, x, backend=engine)
        a = pk.edge_softmax(csr, s, backend=engine)
        h = pk.spmm(csr, x, a, backend=engine)
        h = h + pk.graph_attention(csr, h, x, x, edge_bias=w, backend=engine)
        return h + pk.scatter(x, torch.arange(8) % 3, dim_size=8, reduce="sum", backend=engine)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(x, w)
    out = compiled(x, w)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), (x, w)), torch.autograd.grad(eager.sum(), (x, w)))


# ------------------------------------------------------------------------------------------- bad input


def test_bad_edge_index_is_a_clear_error():
    x = torch.randn(4, 3)
    with pytest.raises(IndexError, match=r"pykernels.CSR.from_edge_index: edge_index holds source index 4"):
        pk.spmm(torch.tensor([[4], [0]]), x)
    with pytest.raises(IndexError, match=r"target index -1"):
        pk.spmm(torch.tensor([[0], [-1]]), x)
    with pytest.raises(TypeError, match=r"pykernels.CSR.from_edge_index: edge_index must be int32 or int64"):
        pk.CSR.from_edge_index(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match=r"edge_index must have shape \[2, E\], got \[3, 2\]"):
        pk.CSR.from_edge_index(torch.zeros(3, 2, dtype=torch.long), 4)
    with pytest.raises(IndexError, match=r"out of range for 2 target nodes"):
        pk.CSR.from_edge_index(torch.tensor([[0, 1], [1, 2]]), num_nodes=2)
    with pytest.raises(ValueError, match=r"num_nodes must be non-negative"):
        pk.CSR.from_edge_index(torch.tensor([[0], [0]]), num_nodes=-1)


def test_bad_features_and_weights_are_clear_errors():
    ei = torch.tensor([[0, 1], [1, 0]])
    csr = pk.CSR.from_edge_index(ei, 2)
    with pytest.raises(TypeError, match=r"pykernels.spmm: x must be a floating tensor"):
        pk.spmm(csr, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pykernels.spmm: x must be \[N, F\] or \[N, H, F\]"):
        pk.spmm(csr, torch.ones(2))
    with pytest.raises(ValueError, match=r"has 2 source nodes but the source features have 3 rows"):
        pk.spmm(csr, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"edge_weight must be \[E\] or \[E, H\] with E=2"):
        pk.spmm(csr, torch.ones(2, 4), torch.ones(3))
    with pytest.raises(TypeError, match=r"edge_weight has dtype torch.float64, expected torch.float32"):
        pk.spmm(csr, torch.ones(2, 4), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"reduce must be one of"):
        pk.spmm(csr, torch.ones(2, 4), reduce="prod")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        pk.spmm(csr, torch.ones(2, 4), backend="gpu")
    with pytest.raises(ValueError, match=r"pykernels.sddmm: a and b must agree"):
        pk.sddmm(csr, torch.ones(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"pykernels.graph_attention: q, k, v must agree"):
        pk.graph_attention(csr, torch.ones(2, 2, 4), torch.ones(2, 3, 4), torch.ones(2, 2, 4))
    with pytest.raises(IndexError, match=r"pykernels.scatter: index holds target index 7"):
        pk.scatter(torch.ones(3, 2), torch.tensor([0, 7, 1]), dim_size=3)
    with pytest.raises(TypeError, match=r"pykernels.scatter: index must be int32 or int64"):
        pk.scatter(torch.ones(3, 2), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"pykernels.scatter: index must be 1-D with src.size\(dim\)=3"):
        pk.scatter(torch.ones(3, 2), torch.tensor([0, 1]))


def test_unavailable_engine_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    if "cuda" in engines_for("cpu"):
        pytest.skip("this build runs the CUDA engine on CPU tensors, emulated")
    with pytest.raises(RuntimeError, match=r"pykernels.spmm: backend='cuda' is not available"):
        pk.spmm(torch.tensor([[0], [0]]), torch.ones(1, 2), backend="cuda")


@pytest.mark.parametrize("namespace", OPCHECK_NAMESPACES)
def test_arg_to_source_maps_csr_positions_and_rejects_out_of_range_ones(namespace):
    ns = getattr(torch.ops, namespace)
    col = torch.tensor([4, 2, 7])
    arg = torch.tensor([[2, -1], [0, 1]])
    ns.arg_to_source_(arg, col, 9)
    assert arg.tolist() == [[7, 9], [4, 2]]
    # scatter of an empty index into dim_size > 0 groups: every group is empty and there is no col to read.
    arg = torch.full((2, 3), -1)
    ns.arg_to_source_(arg, col[:0], 0)
    assert arg.tolist() == [[0, 0, 0], [0, 0, 0]]
    for bad, value in (([0, 3], 3), ([0, -2], -2)):
        with pytest.raises(IndexError, match=rf"pykernels.arg_to_source_: arg holds {value} at flat position 1, "
                                             r"out of range for 3 CSR positions"):
            ns.arg_to_source_(torch.tensor(bad), col, 9)
    if namespace != "pykernels_triton":  # only the C++ launchers check the dtypes
        with pytest.raises(RuntimeError, match=r"arg and col must be int64"):
            ns.arg_to_source_(torch.tensor([0], dtype=torch.int32), col, 9)


def test_direct_kernel_calls_are_checked():
    with pytest.raises(RuntimeError, match=r"pykernels.spmm: x must be 3-D"):
        torch.ops.pykernels.spmm(torch.tensor([0, 0]), torch.zeros(0, dtype=torch.long), None, None, None, None,
                                 torch.ones(2), "sum")
    with pytest.raises(RuntimeError, match=r"pykernels.spmm: rowptr must be int64"):
        torch.ops.pykernels.spmm(torch.tensor([0, 0], dtype=torch.int32), torch.zeros(0, dtype=torch.long), None,
                                 None, None, None, torch.ones(1, 1, 2), "sum")
