"""2-D neighbourhood attention: the neighbourhood definition against NATTEN's formulas and a hand-written
case, every engine against the float64 masked dense reference (forward and backward), opcheck, gradcheck,
torch.compile, strided inputs and bad input."""
import pytest
import torch

import pykernels._neighborhood_ops  # noqa: F401  (registers the fake kernels and autograd)
from pykernels.neighborhood import neighborhood_attention_2d
from pykernels.reference import neighborhood as ref
from pykernels.testing import assert_close, assert_low_precision_error, engines_for, namespaces, runs_interpreted

pytestmark = pytest.mark.window

ENGINES = [e for e in engines_for("cpu") if e != "reference"]
# The Triton interpreter and the CUDA emulator run one thread at a time: they get SMALL_CASES and skip the large
# map (COMPILED).
COMPILED = [e for e in ENGINES if not runs_interpreted("cpu", e)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (B, heads, H, W, D, Dv, kernel_size, dilation, rpb): kernels 1..13, dilations 1..4, non-square maps and
# kernels, maps whose length is not a multiple of the dilation (sub-grids of unequal lengths), a kernel
# as large as the map (dense attention), head dims 32, 40, 64.
CASES = [
    (1, 2, 9, 14, 32, 32, 3, 1, True),
    (2, 2, 11, 14, 40, 48, 5, 2, False),
    (1, 3, 13, 15, 64, 64, 13, 1, True),
    (1, 2, 14, 9, 32, 16, (3, 5), (3, 1), True),
    (1, 1, 7, 7, 40, 40, 7, 1, True),
    (1, 2, 11, 10, 32, 32, 1, 1, True),
    (1, 2, 22, 21, 40, 40, 7, 3, True),
    (2, 1, 23, 19, 32, 32, (5, 3), (4, 2), False),
]
# Kernel 3 with rpb; a rectangular kernel, dilations (3, 1) and Dv != D; kernel 5 at dilation 2 on a map whose
# sub-axes are shorter than twice the kernel.
SMALL_CASES = [(1, 2, 6, 7, 16, 16, 3, 1, True), (1, 2, 9, 8, 8, 16, (3, 5), (3, 1), True),
               (2, 1, 11, 10, 8, 8, 5, 2, False)]


def _case_id(case):
    b, h, hh, ww, d, dv, k, dil, rpb = case
    return f"{b}x{h}-{hh}x{ww}-D{d}-k{k}-d{dil}" + ("-rpb" if rpb else "")


def _inputs(case, dtype, seed=0, requires_grad=True):
    b, h, hh, ww, d, dv, kernel, _, with_rpb = case
    kh, kw = ref.pair(kernel)
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)

    rpb = t(h, 2 * kh - 1, 2 * kw - 1) if with_rpb else None
    return t(b, h, hh * ww, d), t(b, h, hh * ww, d), t(b, h, hh * ww, dv), rpb


def _reference(case, q, k, v, rpb, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    bias = rpb.detach().to(dtype).requires_grad_() if rpb is not None else None
    out = ref.neighborhood_attention_2d(*leaves, case[2:4], case[6], case[7], bias)
    return out, leaves + ([bias] if bias is not None else [])


def _check(actual, expected, eager, dtype, scale, msg):
    if dtype in (torch.float16, torch.bfloat16):
        assert_low_precision_error(actual, expected, eager, msg=msg)
    else:
        assert_close(actual, expected, dtype, scale=scale, msg=msg)


# ----------------------------------------------------------------------------------- the neighbourhood


def _natten_window_start(index, length, kernel, dilation):
    """NATTEN's piecewise get_window_start (natten_cpu_commons.h), restated here as an independent oracle."""
    half = kernel // 2
    if dilation <= 1:
        start = max(index - half, 0)
        return start + (length - index - half - 1 if index + half >= length else 0)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        residue, whole = index % dilation, length // dilation * dilation
        extra = length - whole
        return length - extra + residue - 2 * half * dilation if residue < extra else whole + residue - kernel * dilation
    return index - half * dilation


def _natten_pb_start(index, length, kernel, dilation):
    half = kernel // 2
    if dilation <= 1:
        return half + (half - index if index < half else 0) + (length - index - 1 - half if index + half >= length else 0)
    if index - half * dilation < 0:
        return kernel - 1 - index // dilation
    if index + half * dilation >= length:
        return (length - index - 1) // dilation
    return half


def test_axis_matches_natten_formulas():
    for length in range(1, 24):
        for kernel in range(1, length + 1, 2):
            for dilation in range(1, length // kernel + 1):
                visible, offset = ref._axis(length, kernel, dilation)
                for p in range(length):
                    start = _natten_window_start(p, length, kernel, dilation)
                    keys = [start + t * dilation for t in range(kernel)]
                    assert visible[p].nonzero().flatten().tolist() == keys, (length, kernel, dilation, p)
                    pb = _natten_pb_start(p, length, kernel, dilation)
                    assert offset[p, keys].tolist() == [pb + t for t in range(kernel)], (length, kernel, dilation, p)


def test_hand_written_neighbourhoods():
    def keys_of(mask, w, y, x):
        return sorted(divmod(j, w) for j in mask[y * w + x].nonzero().flatten().tolist())

    # 5 x 6 map, kernel 3: the corner query's window is shifted inwards, an interior one is centred.
    mask = ref.neighborhood_mask((5, 6), 3)
    assert keys_of(mask, 6, 0, 0) == [(y, x) for y in (0, 1, 2) for x in (0, 1, 2)]
    assert keys_of(mask, 6, 4, 5) == [(y, x) for y in (2, 3, 4) for x in (3, 4, 5)]
    assert keys_of(mask, 6, 2, 3) == [(y, x) for y in (1, 2, 3) for x in (2, 3, 4)]
    # 7 x 6 map, kernel 3, dilation 2: rows split into {0, 2, 4, 6} and {1, 3, 5}, columns into {0, 2, 4}
    # and {1, 3, 5}. Query (6, 4) is at the end of its row sub-grid, so its window is shifted up to {2, 4, 6}.
    mask = ref.neighborhood_mask((7, 6), 3, 2)
    assert keys_of(mask, 6, 0, 1) == [(y, x) for y in (0, 2, 4) for x in (1, 3, 5)]
    assert keys_of(mask, 6, 6, 4) == [(y, x) for y in (2, 4, 6) for x in (0, 2, 4)]
    assert keys_of(mask, 6, 3, 3) == [(y, x) for y in (1, 3, 5) for x in (1, 3, 5)]
    # rpb of query (6, 4) with kernel 3, dilation 2: key (2, 0) is 2 dilated steps up and left -> [0, 0];
    # key (6, 4) is the query itself -> the centre [2, 2].
    rpb = torch.arange(25.0).reshape(1, 5, 5)
    bias = ref.relative_position_bias(rpb, (7, 6), 3, 2)[0, 6 * 6 + 4]
    assert bias[2 * 6 + 0] == 0 and bias[6 * 6 + 4] == 2 * 5 + 2 and bias[4 * 6 + 2] == 1 * 5 + 1


@pytest.mark.parametrize("engine", ENGINES)
def test_each_query_sees_exactly_its_neighbourhood(engine):
    # With v the one-hot token index and equal scores, the output row of a query is 1 / K^2 on exactly the
    # keys it sees: the engine's window, read back.
    hh, ww, kernel, dilation = 9, 11, (3, 5), (2, 2)
    n = hh * ww
    q = torch.zeros(1, 1, n, 4, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64)[None, None]
    out = neighborhood_attention_2d(q, q, v, (hh, ww), kernel, dilation, backend=engine)
    torch.testing.assert_close(out[0, 0] > 0, ref.neighborhood_mask((hh, ww), kernel, dilation), rtol=0, atol=0)
    torch.testing.assert_close(out[0, 0].sum(-1), torch.ones(n, dtype=torch.float64))


# ------------------------------------------------------------------------------------- engines vs reference


@pytest.mark.parametrize("engine,case", [pytest.param(e, case, id=f"{e}-{_case_id(case)}") for e in ENGINES
                                         for case in (CASES if e in COMPILED else SMALL_CASES)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(engine, case, dtype):
    q, k, v, rpb = _inputs(case, dtype, seed=sum(map(int, case[:6])))
    out = neighborhood_attention_2d(q, k, v, case[2:4], case[6], case[7], rpb, backend=engine)
    expected, leaves64 = _reference(case, q, k, v, rpb, torch.float64)
    eager, eager_leaves = _reference(case, q, k, v, rpb, dtype)
    assert out.shape == expected.shape and out.dtype == dtype
    _check(out, expected, eager, dtype, 4, "out")

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    want = torch.autograd.grad(expected, leaves64, grad)
    eager_grads = torch.autograd.grad(eager, eager_leaves, grad.to(dtype))
    for name, g, w, e in zip(("q", "k", "v", "rpb"), got, want, eager_grads):
        _check(g, w, e, dtype, 16, f"grad {name}")


@pytest.mark.parametrize("engine", COMPILED)
def test_large_map(engine):
    case = (1, 1, 56, 56, 32, 32, 7, 1, True)
    q, k, v, rpb = _inputs(case, torch.float32)
    out = neighborhood_attention_2d(q, k, v, (56, 56), 7, rel_pos_bias=rpb, backend=engine)
    expected, leaves64 = _reference(case, q, k, v, rpb, torch.float64)
    assert_close(out, expected, torch.float32, scale=4)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v, rpb), grad.float())
    for g, w in zip(got, torch.autograd.grad(expected, leaves64, grad)):
        assert_close(g, w, torch.float32, scale=64)


@pytest.mark.parametrize("engine", ENGINES)
def test_rpb_gradient_is_deterministic(engine):
    case = (2, 2, 12, 13, 16, 16, 5, (1, 2), True)
    q, k, v, rpb = _inputs(case, torch.float32)
    threads = torch.get_num_threads()

    def grads(num_threads):
        torch.set_num_threads(num_threads)
        try:
            out = neighborhood_attention_2d(q, k, v, case[2:4], case[6], case[7], rpb, backend=engine)
            return torch.autograd.grad(out.square().sum(), (q, k, v, rpb))
        finally:
            torch.set_num_threads(threads)

    first = grads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, grads(threads)))
    assert torch.equal(first[3], grads(1)[3])


@pytest.mark.parametrize("engine", ENGINES)
def test_strided_inputs(engine):
    b, h, hh, ww, d = 2, 3, 6, 7, 16
    q = torch.randn(b, hh * ww, h, d).transpose(1, 2)  # [B, N, heads, D] as projections lay it out
    k = torch.randn(1, h, hh * ww, d).expand(b, h, hh * ww, d)
    v = torch.randn(b, h, hh * ww, 2 * d)[..., ::2]
    rpb = torch.randn(h, 9, 5).transpose(1, 2)  # a non-contiguous [h, 5, 9]
    out = neighborhood_attention_2d(q, k, v, (hh, ww), (3, 5), 1, rpb, backend=engine)
    expected = ref.neighborhood_attention_2d(q.double(), k.double(), v.double(), (hh, ww), (3, 5), 1, rpb.double())
    assert_close(out, expected, torch.float32, scale=4)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", [(0, 2, 12, 8), (1, 0, 12, 8)])
def test_empty_batch_or_heads(engine, shape):
    q = torch.randn(shape, requires_grad=True)
    rpb = torch.randn(shape[1], 5, 5, requires_grad=True)
    out = neighborhood_attention_2d(q, q, q, (3, 4), 3, rel_pos_bias=rpb, backend=engine)
    out.sum().backward()  # an empty grad_out arrives with all strides 0
    assert out.shape == shape and q.grad.shape == shape and torch.equal(rpb.grad, torch.zeros_like(rpb))


# ----------------------------------------------------------------------------------- opcheck / gradcheck / compile

NAMESPACES = namespaces()


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_rpb", [False, True])
def test_opcheck(namespace, requires_grad, with_rpb):
    ns = getattr(torch.ops, namespace)
    case = (2, 2, 5, 6, 8, 4, 3, 1, with_rpb)
    q, k, v, rpb = _inputs(case, torch.float64, requires_grad=requires_grad)
    geometry = ([5, 6], [3, 3], [1, 2])
    torch.library.opcheck(ns.neighborhood_attention_2d.default, (q, k, v, *geometry, rpb, 0.3))
    if not requires_grad:
        out, lse = ns.neighborhood_attention_2d(q, k, v, *geometry, rpb, 0.3)
        grad = torch.randn_like(out)
        torch.library.opcheck(ns.neighborhood_attention_2d_backward.default,
                              (q, k, v, *geometry, rpb, 0.3, out, lse, grad, with_rpb))


@pytest.mark.parametrize("engine", ENGINES + ["reference"])
@pytest.mark.parametrize("spatial,kernel,dilation", [((4, 5), (3, 5), 1), ((6, 5), 3, (2, 1))])
def test_gradcheck_float64(engine, spatial, kernel, dilation):
    q, k, v, rpb = _inputs((1, 2, *spatial, 3, 2, kernel, dilation, True), torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: neighborhood_attention_2d(q, k, v, spatial, kernel, dilation, b, backend=engine),
        (q, k, v, rpb), fast_mode=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_compile_fullgraph(engine):
    # A strided q: gradients must come back in the layout the fake kernels promise.
    q = torch.randn(1, 12, 2, 8).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 2, 12, 8, requires_grad=True)
    v = torch.randn(1, 2, 12, 8, requires_grad=True)
    rpb = torch.randn(2, 5, 1, requires_grad=True)

    def f(q, k, v, rpb):
        return neighborhood_attention_2d(q, k, v, (4, 3), (3, 1), 1, rpb, backend=engine).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, eager = compiled(q, k, v, rpb), f(q, k, v, rpb)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v, rpb)), torch.autograd.grad(eager, (q, k, v, rpb)))


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error():
    q = torch.randn(1, 2, 30, 8)
    rpb = torch.randn(2, 5, 5)
    call = neighborhood_attention_2d
    op = r"pykernels.neighborhood_attention_2d: "
    with pytest.raises(ValueError, match=op + r"kernel_size must be odd and positive, got \(4, 4\)"):
        call(q, q, q, (5, 6), 4)
    with pytest.raises(ValueError, match=op + r"kernel_size \* dilation along the height \(3 \* 2\) must not exceed"):
        call(q, q, q, (5, 6), 3, 2)
    with pytest.raises(ValueError, match=op + r"kernel_size \* dilation along the width \(7 \* 1\)"):
        call(q, q, q, (5, 6), (5, 7))
    with pytest.raises(ValueError, match=op + r"spatial_shape \(5, 5\) has 25 cells but q has 30 tokens"):
        call(q, q, q, (5, 5), 3)
    with pytest.raises(ValueError, match=op + r"rel_pos_bias must be \[heads, 2\*kh - 1, 2\*kw - 1\] = \[2, 5, 1\], got \[2, 5, 5\]"):
        call(q, q, q, (5, 6), (3, 1), rel_pos_bias=rpb)
    with pytest.raises(ValueError, match=op + r"dilation must be positive"):
        call(q, q, q, (5, 6), 3, 0)
    with pytest.raises(TypeError, match=op + r"kernel_size must be an int or a pair of ints"):
        call(q, q, q, (5, 6), (3, 3, 3))
    with pytest.raises(TypeError, match=op + r"k has dtype torch.float64, q has torch.float32"):
        call(q, q.double(), q, (5, 6), 3)
    with pytest.raises(TypeError, match=op + r"rel_pos_bias must be a floating tensor"):
        call(q, q, q, (5, 6), 3, rel_pos_bias=rpb.long())
    with pytest.raises(ValueError, match=op + r"k must have q's shape"):
        call(q, q[:, :1], q, (5, 6), 3)
    with pytest.raises(ValueError, match=op + r"v must be \[B, heads, H \* W, Dv\]"):
        call(q, q, q[:, :, :29], (5, 6), 3)
    with pytest.raises(ValueError, match=op + r"q must be 4-D"):
        call(q[0], q, q, (5, 6), 3)
    with pytest.raises(TypeError, match=op + r"v must be float32, float64, float16 or bfloat16"):
        call(q, q, q.long(), (5, 6), 3)
    if "cuda" not in ENGINES:  # an emulation build runs the CUDA engine on CPU tensors
        with pytest.raises(RuntimeError, match=op + r"backend='cuda' is not available"):
            call(q, q, q, (5, 6), 3, backend="cuda")


def test_direct_op_calls_are_checked():
    q = torch.randn(1, 2, 30, 8)
    op = torch.ops.pykernels.neighborhood_attention_2d
    with pytest.raises(RuntimeError, match=r"neighborhood_attention_2d: kernel_size width must be odd"):
        op(q, q, q, [5, 6], [3, 2], [1, 1], None, 1.0)
    with pytest.raises(RuntimeError, match=r"kernel_size \* dilation along height \(3 \* 2\) exceeds"):
        op(q, q, q, [5, 6], [3, 3], [2, 1], None, 1.0)
    with pytest.raises(RuntimeError, match=r"spatial_shape \[5, 5\] holds 25 tokens, q has 30"):
        op(q, q, q, [5, 5], [3, 3], [1, 1], None, 1.0)
    with pytest.raises(RuntimeError, match=r"rpb must have shape \[2, 5, 5\]"):
        op(q, q, q, [5, 6], [3, 3], [1, 1], torch.randn(2, 3, 5), 1.0)
    out, lse = op(q, q, q, [5, 6], [3, 3], [1, 1], None, 1.0)
    with pytest.raises(RuntimeError, match=r"neighborhood_attention_2d_backward: rpb_grad needs an rpb"):
        torch.ops.pykernels.neighborhood_attention_2d_backward(q, q, q, [5, 6], [3, 3], [1, 1], None, 1.0, out, lse,
                                                               out, True)
