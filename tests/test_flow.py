"""Attention flow: the (max, min) products of every engine against the broadcast references, rollout, flow,
ST-Flow, and bad input."""
import pytest
import torch

import pykernels as pk
from pykernels import _backend
from pykernels.reference import flow as ref
from pykernels.testing import (TOLERANCES, assert_close, assert_low_precision_error, engines_for, namespaces,
                               runs_interpreted)

pytestmark = pytest.mark.flow

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ENGINES = [pytest.param(d, e, id=f"{d}-{e}", marks=[pytest.mark.cuda] if d == "cuda" else [])
           for d in DEVICES for e in engines_for(d) if e != "reference"]
# (a shape, b shape): single elements, odd sizes and tails, Vico's 16 x 16 @ 16 x 77 per location, batch
# dimensions that broadcast, several row blocks and column panels.
SHAPES = [
    ((1, 1), (1, 1)),
    ((3, 7, 5), (3, 5, 33)),
    ((6, 16, 16), (6, 16, 77)),
    ((2, 1, 9, 4), (3, 4, 17)),
    ((40, 130), (130, 47)),
    ((70, 3), (3, 200)),
]
SMALL_SHAPES = SHAPES[:4]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TEMPERATURES = [1e-4, 0.01, 1.0]

CASES = [pytest.param(p.values[0], p.values[1], shapes, id=f"{p.id}-{i}", marks=p.marks)
         for p in ENGINES for i, shapes in enumerate(SMALL_SHAPES if runs_interpreted(*p.values) else SHAPES)]


def _maps(shape_a, shape_b, dtype, device="cpu", seed=0, levels=None, requires_grad=False):
    """Random operands in [0, 1); with ``levels`` drawn from that many values, so ties are everywhere."""
    g = torch.Generator().manual_seed(seed)

    def t(shape):
        x = torch.rand(shape, generator=g, dtype=torch.float64)
        if levels:
            x = (x * levels).floor() / levels
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return t(shape_a), t(shape_b)


def _broadcast_formula(a, b):
    return torch.minimum(a.unsqueeze(-1), b.unsqueeze(-3)).amax(-2)


def _grads(out, inputs, seed=1, rounded_to=None):
    """Gradients for a fixed random output gradient, optionally first rounded to a lower dtype."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, inputs, g.to(rounded_to or out.dtype).to(out.dtype))


# ------------------------------------------------------------------------------------------- hard product


@pytest.mark.parametrize("device,engine,shapes", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_product_is_bitwise_the_broadcast_formula(device, engine, shapes, dtype):
    a, b = _maps(*shapes, dtype, device)
    got = pk.maxmin_matmul(a, b, backend=engine)
    assert got.dtype == dtype and got.shape == _broadcast_formula(a, b).shape
    assert torch.equal(got, _broadcast_formula(a, b))


@pytest.mark.parametrize("device,engine,shapes", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_product_gradients(device, engine, shapes, dtype):
    a, b = _maps(*shapes, dtype, device, requires_grad=True)
    got = _grads(pk.maxmin_matmul(a, b, backend=engine), (a, b))
    a64, b64 = (x.detach().double().requires_grad_() for x in (a, b))
    expected = _grads(ref.maxmin_matmul(a64, b64), (a64, b64), rounded_to=dtype)
    for x, y in zip(got, expected):
        assert x.dtype == dtype
        assert_close(x, y, msg=f"{engine} {dtype}")


@pytest.mark.parametrize("device,engine", ENGINES)
def test_ties_go_to_the_lowest_k_and_to_a(device, engine):
    # Values from 3 levels: most outputs have several maximising k and many a == b.
    a, b = _maps((4, 9, 12), (4, 12, 10), torch.float64, device, levels=3, requires_grad=True)
    out, argk = getattr(torch.ops, _backend.namespace(engine, torch.device(device))).maxmin_matmul(a, b)
    mins = torch.minimum(a.unsqueeze(-1), b.unsqueeze(-3))
    assert (mins == out.unsqueeze(-2)).sum(-2).gt(1).any(), "the test needs ties"
    assert torch.equal(argk.long(), mins.argmax(-2))
    got = _grads(pk.maxmin_matmul(a, b, backend=engine), (a, b))
    expected = _grads(ref.maxmin_matmul(a, b), (a, b))
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,engine", ENGINES)
def test_hard_product_nan_and_infinities(device, engine):
    a, b = _maps((2, 5, 6), (2, 6, 7), torch.float32, device)
    a[0, 2, 3] = float("nan")
    b[1, 1, 4] = float("nan")
    a[1, 0, :] = float("-inf")
    b[0, :, 0] = float("inf")
    ns = getattr(torch.ops, _backend.namespace(engine, torch.device(device)))
    out, argk = ns.maxmin_matmul(a, b)
    expected = _broadcast_formula(a, b)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(argk.long(), torch.minimum(a.unsqueeze(-1), b.unsqueeze(-3)).argmax(-2))


# ------------------------------------------------------------------------------------------- soft product


@pytest.mark.parametrize("device,engine,shapes", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_soft_product_matches_reference(device, engine, shapes, dtype, temperature):
    a, b = _maps(*shapes, dtype, device, requires_grad=True)
    out = pk.soft_maxmin_matmul(a, b, temperature, backend=engine)
    grads = _grads(out, (a, b))
    a64, b64 = (x.detach().double().requires_grad_() for x in (a, b))
    expected = ref.soft_maxmin_matmul(a64, b64, temperature)
    expected_grads = _grads(expected, (a64, b64), rounded_to=dtype)
    assert out.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        assert_close(out, expected)
        for x, y in zip(grads, expected_grads):
            assert_close(x, y, scale=10)
    else:
        # Judged against Vico's formula evaluated eagerly in the same dtype.
        ae, be = (x.detach().requires_grad_() for x in (a, b))
        eager = ref.soft_maxmin_matmul(ae, be, temperature)
        assert_low_precision_error(out, expected, eager.detach(), msg="soft out")
        for x, y, e in zip(grads, expected_grads, _grads(eager, (ae, be))):
            assert_low_precision_error(x, y, e, atol=TOLERANCES[dtype][0], msg="soft grad")


@pytest.mark.parametrize("device,engine", ENGINES)
def test_soft_product_is_stable_and_tends_to_the_hard_one(device, engine):
    a, b = _maps((3, 20, 31), (3, 31, 9), torch.float32, device, requires_grad=True)
    hard = _broadcast_formula(a, b)
    for temperature in (1e-4, 1e-3):
        soft = pk.soft_maxmin_matmul(a, b, temperature, backend=engine)
        grads = _grads(soft, (a, b))
        assert torch.isfinite(soft).all() and all(torch.isfinite(g).all() for g in grads)
        # Each soft minimum lies within t log 2 below the hard one, and k = 31 terms at most add t log 31.
        slack = torch.log(torch.tensor([2.0, 31.0])) * temperature
        assert (soft >= hard - slack[0] - 1e-6).all() and (soft <= hard + slack[1] + 1e-6).all()


@pytest.mark.parametrize("device,engine", ENGINES)
def test_soft_product_nan_propagates(device, engine):
    a, b = _maps((1, 4, 5), (1, 5, 3), torch.float32, device)
    a[0, 1, 2] = float("nan")
    out = pk.soft_maxmin_matmul(a, b, 0.01, backend=engine)
    assert out[0, 1].isnan().all() and not out[0, [0, 2, 3]].isnan().any()


# -------------------------------------------------------------------------------- layouts, sizes, threads


@pytest.mark.parametrize("device,engine", ENGINES)
@pytest.mark.parametrize("soft", [False, True])
def test_strided_and_broadcast_operands(device, engine, soft):
    a_t, b = _maps((3, 11, 8), (8, 13), torch.float32, device)
    a = a_t.transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major a
    b_strided = torch.rand(8, 26, device=device)[:, ::2]
    b_strided.copy_(b)
    leaves = [x.clone().requires_grad_() for x in (a, b_strided)]
    product = (lambda x, y: pk.soft_maxmin_matmul(x, y, 0.05, backend=engine)) if soft else \
        (lambda x, y: pk.maxmin_matmul(x, y, backend=engine))
    reference = (lambda x, y: ref.soft_maxmin_matmul(x, y, 0.05)) if soft else ref.maxmin_matmul
    got = product(*leaves)
    expected = reference(a.contiguous(), b)
    assert_close(got, expected)
    grads = _grads(got, leaves)
    expected_leaves = [x.detach().clone().requires_grad_() for x in (a, b)]
    for x, y in zip(grads, _grads(reference(*expected_leaves), expected_leaves)):
        assert_close(x, y)
    assert grads[1].shape == (8, 13)  # b was broadcast over the batch: its gradient is summed back


@pytest.mark.parametrize("device,engine", ENGINES)
@pytest.mark.parametrize("shapes", [((0, 4), (4, 5)), ((3, 4), (4, 0)), ((0, 3, 4), (0, 4, 5))])
def test_empty_outputs(device, engine, shapes):
    a, b = _maps(*shapes, torch.float32, device, requires_grad=True)
    for product in (lambda: pk.maxmin_matmul(a, b, backend=engine),
                    lambda: pk.soft_maxmin_matmul(a, b, 0.1, backend=engine)):
        out = product()
        assert out.shape == _broadcast_formula(a, b).shape
        grads = torch.autograd.grad(out.sum(), (a, b))
        assert all(g.shape == x.shape and not g.any() for g, x in zip(grads, (a, b)))


def test_results_do_not_depend_on_the_thread_count():
    a, b = _maps((5, 37, 23), (5, 23, 41), torch.float32, requires_grad=True)
    before = torch.get_num_threads()

    def run():
        hard = pk.maxmin_matmul(a, b, backend="cpu")
        soft = pk.soft_maxmin_matmul(a, b, 0.02, backend="cpu")
        return (hard, soft) + _grads(hard, (a, b)) + _grads(soft, (a, b))

    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(2)
        assert all(torch.equal(x, y) for x, y in zip(single, run()))
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ opcheck, gradcheck, compile

NAMESPACES = namespaces()


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(namespace, requires_grad):
    ns = getattr(torch.ops, namespace)
    a, b = _maps((2, 5, 6), (2, 6, 7), torch.float64, requires_grad=requires_grad)
    b_broadcast = torch.rand(1, 6, 7, dtype=torch.float64).expand(2, 6, 7)
    torch.library.opcheck(ns.maxmin_matmul.default, (a, b))
    torch.library.opcheck(ns.maxmin_matmul.default, (a, b_broadcast))
    torch.library.opcheck(ns.soft_maxmin_matmul.default, (a, b, 0.1))
    if not requires_grad:
        out, argk = ns.maxmin_matmul(a, b)
        grad = torch.randn_like(out)
        torch.library.opcheck(ns.maxmin_matmul_backward.default, (a, b, argk, grad, True, True))
        torch.library.opcheck(ns.maxmin_matmul_backward.default, (a, b, argk, grad, False, True))
        out, hard, total = ns.soft_maxmin_matmul(a, b, 0.1)
        torch.library.opcheck(ns.soft_maxmin_matmul_backward.default, (a, b, hard, total, grad, 0.1, True, True))


@pytest.mark.parametrize("engine", engines_for("cpu"))
def test_gradcheck_float64(engine):
    # Distinct values (even sixtieths in a, odd ones in b) keep the hard product away from ties, where it
    # is not differentiable.
    a = (torch.randperm(20, dtype=torch.float64) * 2 / 60).view(1, 4, 5).requires_grad_()
    b = ((torch.randperm(30, dtype=torch.float64) * 2 + 1) / 60).view(1, 5, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: pk.maxmin_matmul(x, y, backend=engine), (a, b), atol=1e-8)
    for temperature in (0.05, 1.0):
        assert torch.autograd.gradcheck(
            lambda x, y: pk.soft_maxmin_matmul(x, y, temperature, backend=engine), (a, b), atol=1e-8)


def test_compile_fullgraph():
    a, b = _maps((3, 6, 5), (3, 5, 7), torch.float32, requires_grad=True)
    maps = [torch.softmax(torch.randn(2, 6, 6), -1) for _ in range(3)]

    def f(a, b):
        return (pk.maxmin_matmul(a, b).sum() + pk.soft_maxmin_matmul(a, b, 0.1).square().sum()
                + pk.attention_flow([m * a[0, 0, 0] for m in maps], mode="soft").sum())

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(a, b)
    got = compiled(a, b)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(torch.autograd.grad(got, (a, b)), torch.autograd.grad(eager, (a, b)))


# ------------------------------------------------------------------------------ rollout, flow, ST-Flow


def _attention_maps(layers, n, batch=(), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(*batch, n, n, generator=g, dtype=dtype) * 3, -1) for _ in range(layers)]


def test_rollout_matches_the_reference_chain():
    maps = _attention_maps(4, 9, batch=(2,))
    expected = maps[0] * 0.7 + 0.3 * torch.eye(9)
    for a in maps[1:]:
        expected = (a * 0.7 + 0.3 * torch.eye(9)) @ expected
    torch.testing.assert_close(pk.attention_rollout(maps, residual=0.3), expected)
    torch.testing.assert_close(pk.attention_rollout(maps, residual=0.3).sum(-1), torch.ones(2, 9, dtype=torch.float64))


@pytest.mark.parametrize("engine", engines_for("cpu"))
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_attention_flow_matches_reference(engine, mode):
    maps = [m.float().requires_grad_() for m in _attention_maps(3, 7, batch=(2,))]
    got = pk.attention_flow(maps, mode=mode, residual=0.4, temperature=0.02, backend=engine)
    expected = ref.attention_flow([m.double() for m in maps], mode=mode, residual=0.4, temperature=0.02)
    assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), maps)
    expected_grads = torch.autograd.grad(expected.sum(), maps)
    for x, y in zip(grads, expected_grads):
        assert_close(x, y)


def test_hard_flow_never_exceeds_the_exact_max_flow():
    for seed in range(3):
        maps = _attention_maps(4, 6, seed=seed)
        hard = pk.attention_flow(maps, mode="hard")
        exact = pk.attention_flow(maps, mode="exact")
        assert exact.shape == hard.shape == (6, 6)
        assert (hard <= exact + 1e-9).all()


@pytest.mark.parametrize("engine", engines_for("cpu"))
@pytest.mark.parametrize("temperature", [None, 0.01])
def test_st_flow_is_vicos_chain(engine, temperature):
    g = torch.Generator().manual_seed(3)
    cross = torch.softmax(torch.randn(10, 8, 77, generator=g), -1).requires_grad_()
    temporal = [torch.softmax(torch.randn(10, 8, 8, generator=g), -1).requires_grad_() for _ in range(2)]
    got = pk.st_flow(cross, temporal, temperature=temperature, backend=engine)
    # Written out as Vico's released code does it: (T2~ (x) T1~) (x) C with T~ = (T + I) / 2.
    eye = torch.eye(8)
    t1, t2 = ((t.double() + eye) / 2 for t in temporal)
    product = ref.maxmin_matmul if temperature is None else (lambda x, y: ref.soft_maxmin_matmul(x, y, temperature))
    expected = product(product(t2, t1), cross.double())
    assert got.shape == (10, 8, 77)
    assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), [cross] + temporal)
    for x, y in zip(grads, torch.autograd.grad(expected.sum(), [cross] + temporal)):
        assert_close(x, y)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error():
    a, b = torch.rand(2, 3, 4), torch.rand(2, 4, 5)
    with pytest.raises(ValueError, match=r"pykernels.maxmin_matmul: inner sizes differ"):
        pk.maxmin_matmul(a, torch.rand(2, 5, 5))
    with pytest.raises(ValueError, match=r"batch dimensions \[2\] and \[3\] do not broadcast"):
        pk.maxmin_matmul(a, torch.rand(3, 4, 5))
    with pytest.raises(TypeError, match=r"b must be float32, float64, float16 or bfloat16, got torch.int64"):
        pk.soft_maxmin_matmul(a, b.long(), 0.1)
    with pytest.raises(TypeError, match=r"a is torch.float32 but b is torch.float64"):
        pk.maxmin_matmul(a, b.double())
    with pytest.raises(ValueError, match=r"a must have at least 2 dimensions"):
        pk.maxmin_matmul(torch.rand(4), b)
    with pytest.raises(ValueError, match=r"the inner size k must be at least 1"):
        pk.maxmin_matmul(torch.rand(3, 0), torch.rand(0, 5))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"pykernels.soft_maxmin_matmul: temperature must be a finite number > 0"):
            pk.soft_maxmin_matmul(a, b, bad)
    with pytest.raises(TypeError, match=r"temperature must be a Python number"):
        pk.soft_maxmin_matmul(a, b, torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        pk.maxmin_matmul(a, b, backend="gpu")
    maps = _attention_maps(2, 4)
    with pytest.raises(ValueError, match=r"pykernels.attention_flow: mode must be 'hard', 'soft' or 'exact'"):
        pk.attention_flow(maps, mode="max")
    with pytest.raises(ValueError, match=r"maps\[1\] takes 4 tokens but maps\[0\] gives 3"):
        pk.attention_flow([torch.rand(3, 4), torch.rand(5, 4)], residual=0.0)
    with pytest.raises(ValueError, match=r"a residual needs square maps"):
        pk.attention_rollout([torch.rand(3, 4)])
    with pytest.raises(ValueError, match=r"maps must hold at least one attention map"):
        pk.attention_flow([])
    with pytest.raises(ValueError, match=r"temporal_maps\[0\] must be \[\.\.\., 8, 8\]"):
        pk.st_flow(torch.rand(2, 8, 5), [torch.rand(2, 7, 7)])
    with pytest.raises(ValueError, match=r"st_flow: temperature must be a finite number > 0"):
        pk.st_flow(torch.rand(2, 8, 5), [torch.rand(2, 8, 8)], temperature=0.0)


def test_direct_op_calls_check_their_inputs():
    ops = torch.ops.pykernels
    with pytest.raises(RuntimeError, match=r"pykernels.maxmin_matmul: a and b must have the same batch size"):
        ops.maxmin_matmul(torch.rand(2, 3, 4), torch.rand(3, 4, 5))
    with pytest.raises(RuntimeError, match=r"pykernels.maxmin_matmul: the inner size k must be at least 1"):
        ops.maxmin_matmul(torch.rand(1, 3, 0), torch.rand(1, 0, 5))
    a, b = torch.rand(1, 3, 4), torch.rand(1, 4, 5)
    out, argk = ops.maxmin_matmul(a, b)
    with pytest.raises(RuntimeError, match=r"argk must be Int"):
        ops.maxmin_matmul_backward(a, b, argk.long(), out, True, True)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[1, 3, 5\]"):
        ops.maxmin_matmul_backward(a, b, argk, out[:, :2], True, True)
    with pytest.raises(RuntimeError, match=r"soft_maxmin_matmul: temperature must be finite and > 0"):
        ops.soft_maxmin_matmul(a, b, -1.0)


@pytest.mark.parametrize("device,engine", ENGINES)
def test_hard_product_gradient_at_a_nan_pair_reaches_both(device, engine):
    a, b = _maps((1, 3, 4), (1, 4, 2), torch.float64, device)
    a[0, 1, 2] = float("nan")
    a, b = a.requires_grad_(), b.requires_grad_()
    got = _grads(pk.maxmin_matmul(a, b, backend=engine), (a, b))
    expected = _grads(ref.maxmin_matmul(a, b), (a, b))
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, equal_nan=True)
