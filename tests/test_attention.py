"""Fused attention: every engine against the float64 reference, forward, backward and the head-mean map."""
import pytest
import torch

import pykernels as pk
from pykernels.reference import attention as ref
from pykernels.testing import assert_close, assert_low_precision_error, engines_for, namespaces, runs_interpreted

pytestmark = pytest.mark.attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ENGINES = [pytest.param(d, e, id=f"{d}-{e}", marks=[pytest.mark.cuda] if d == "cuda" else [])
           for d in DEVICES for e in engines_for(d) if e != "reference"]
# (B, H, Hkv, Nq, Nk, D, Dv): odd sizes, cross-attention (4096 x 77 in miniature), GQA, Stable Diffusion's
# head dims 40 and 80, D = 256, single tokens.
SHAPES = [
    (1, 2, 2, 1, 1, 8, 8),
    (2, 4, 2, 7, 77, 40, 40),
    (1, 4, 1, 77, 7, 64, 32),
    (1, 2, 2, 128, 128, 80, 80),
    (1, 1, 1, 33, 65, 256, 256),
    (2, 3, 3, 100, 13, 128, 64),
]
# The Triton interpreter and the CUDA emulator run one thread at a time: they get a smaller set, which keeps CI
# in minutes.
SMALL_SHAPES = [(1, 2, 2, 1, 1, 8, 8), (2, 4, 2, 7, 19, 40, 40), (1, 2, 1, 17, 9, 64, 32)]
LARGE = [(1, 2, 2, 1000, 1000, 64, 64)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


CASES = [pytest.param(p.values[0], p.values[1], shape, id=f"{p.id}-{'x'.join(map(str, shape))}", marks=p.marks)
         for p in ENGINES for shape in (SMALL_SHAPES if runs_interpreted(*p.values) else SHAPES)]


def _inputs(shape, dtype, device, seed=0, bias="none", requires_grad=True):
    b, h, hkv, nq, nk, d, dv = shape
    g = torch.Generator().manual_seed(seed)

    def t(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    q, k, v = t(b, h, nq, d), t(b, hkv, nk, d), t(b, hkv, nk, dv)
    attn_bias = None
    if bias == "full":
        attn_bias = t(b, h, nq, nk)
    elif bias == "broadcast":
        attn_bias = t(b, 1, 1, nk)
    elif bias == "masked":
        attn_bias = t(1, h, nq, nk)
        attn_bias[..., 0, :] = float("-inf")  # the first query of every head sees no key
    tensors = [q, k, v] + ([attn_bias] if attn_bias is not None else [])
    if requires_grad:
        for x in tensors:
            x.requires_grad_()
    return q, k, v, attn_bias


def _reference(q, k, v, bias, causal, dtype=torch.float64):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    b = bias.detach().to(dtype).requires_grad_() if bias is not None else None
    out, mean = ref.attention(*leaves, b, causal, q.size(-1) ** -0.5, return_attn_mean=True)
    return out, mean, leaves + ([b] if b is not None else [])


def _check(actual, expected, eager, dtype, scale=1.0, msg=""):
    if dtype in (torch.float16, torch.bfloat16):
        assert_low_precision_error(actual, expected, eager, msg=msg)
    else:
        assert_close(actual, expected, dtype, scale=scale, msg=msg)


@pytest.mark.parametrize("device,engine,shape", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", ["none", "full", "broadcast", "masked"])
def test_attention_matches_reference(device, engine, shape, dtype, causal, bias):
    q, k, v, attn_bias = _inputs(shape, dtype, device, seed=sum(shape), bias=bias)
    out, mean = pk.fused_attention(q, k, v, attn_bias=attn_bias, causal=causal, return_attn_mean=True,
                                   backend=engine)
    exp_out, exp_mean, leaves64 = _reference(q, k, v, attn_bias, causal)
    eager_out, eager_mean, _ = _reference(q, k, v, attn_bias, causal, dtype)
    assert out.shape == exp_out.shape and out.dtype == dtype and mean.shape == exp_mean.shape
    _check(out, exp_out, eager_out, dtype, scale=4, msg="out")
    _check(mean, exp_mean, eager_mean, dtype, scale=4, msg="map")

    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grad_map = torch.randn(mean.shape, generator=g, dtype=torch.float64)
    inputs = [q, k, v] + ([attn_bias] if attn_bias is not None else [])
    grads = torch.autograd.grad((out, mean), inputs, (grad_out.to(device, dtype), grad_map.to(device, dtype)))
    expected = torch.autograd.grad((exp_out, exp_mean), leaves64, (grad_out.to(device), grad_map.to(device)))
    eager_leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    e_out, e_mean = ref.attention(*eager_leaves[:3], eager_leaves[3] if attn_bias is not None else None, causal,
                                  q.size(-1) ** -0.5, return_attn_mean=True)
    eager = torch.autograd.grad((e_out, e_mean), eager_leaves, (grad_out.to(device, dtype), grad_map.to(device, dtype)))
    for name, got, want, ev in zip("qkvb", grads, expected, eager):
        _check(got, want, ev, dtype, scale=16, msg=f"grad {name}")


@pytest.mark.parametrize("device,engine",
                         [p for p in ENGINES if p.values[1] != "triton" and not runs_interpreted(*p.values)])
def test_attention_long_sequence(device, engine):
    shape = LARGE[0]
    q, k, v, _ = _inputs(shape, torch.float32, device, requires_grad=False)
    out = pk.fused_attention(q, k, v, causal=True, backend=engine)
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close(out, expected, torch.float32, scale=4)


@pytest.mark.parametrize("device,engine", ENGINES)
def test_fully_masked_rows_give_zeros_not_nan(device, engine):
    q, k, v, _ = _inputs((1, 2, 2, 4, 5, 8, 8), torch.float32, device)
    mask = torch.ones(4, 5, dtype=torch.bool, device=device)
    mask[2] = False
    out, mean = pk.fused_attention(q, k, v, attn_bias=mask, return_attn_mean=True, backend=engine)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.equal(mean[:, 2], torch.zeros_like(mean[:, 2]))
    grads = torch.autograd.grad((out.sum(), mean.sum()), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device,engine", ENGINES)
def test_strided_and_expanded_inputs(device, engine):
    base = torch.randn(2, 9, 4, 16, device=device)  # [B, N, H, D] as diffusers lays it out
    q = base.transpose(1, 2)
    k = torch.randn(2, 1, 11, 16, device=device).expand(2, 4, 11, 16)
    v = torch.randn(2, 4, 11, 32, device=device)[..., ::2]
    out = pk.fused_attention(q, k, v, backend=engine)
    expected = ref.attention(q.double(), k.double(), v.double())
    assert_close(out, expected, torch.float32, scale=4)


@pytest.mark.parametrize("device,engine", ENGINES)
def test_nan_propagates_like_the_reference(device, engine):
    q, k, v, _ = _inputs((1, 1, 1, 3, 4, 8, 8), torch.float32, device, requires_grad=False)
    v[0, 0, 1, 0] = float("nan")
    out = pk.fused_attention(q, k, v, backend=engine)
    expected = ref.attention(q, k, v)
    assert torch.equal(out.isnan(), expected.isnan())


@pytest.mark.parametrize("device,engine", ENGINES)
def test_empty_token_counts(device, engine):
    q = torch.randn(1, 2, 0, 8, device=device)
    k = torch.randn(1, 2, 5, 8, device=device)
    assert pk.fused_attention(q, k, k, backend=engine).shape == (1, 2, 0, 8)
    q = torch.randn(1, 2, 3, 8, device=device, requires_grad=True)
    k = torch.randn(1, 2, 0, 8, device=device)
    out, mean = pk.fused_attention(q, k, k, return_attn_mean=True, backend=engine)
    assert torch.equal(out, torch.zeros(1, 2, 3, 8, device=device)) and mean.shape == (1, 3, 0)


def _run_with_grads(q, k, v, bias, causal=False, backend="cpu"):
    out, mean = pk.fused_attention(q, k, v, attn_bias=bias, causal=causal, return_attn_mean=True, backend=backend)
    leaves = [x for x in (q, k, v, bias) if x is not None]
    return (out, mean) + torch.autograd.grad((out.square().sum(), mean.square().sum()), leaves)


@pytest.mark.parametrize("device,engine", ENGINES)
def test_results_are_deterministic(device, engine):
    q, k, v, bias = _inputs((1, 2, 1, 40, 50, 16, 16), torch.float32, device, bias="full")
    first = _run_with_grads(q, k, v, bias, backend=engine)
    assert all(torch.equal(a, b) for a, b in zip(first, _run_with_grads(q, k, v, bias, backend=engine)))


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_results_do_not_depend_on_the_thread_count(causal):
    # One (batch, kv head) pair: one thread runs the one-pass backward, two threads the two-pass one; the
    # two schemes must agree to the bit.
    q, k, v, bias = _inputs((1, 4, 1, 70, 130, 16, 16), torch.float32, "cpu", bias="full")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_with_grads(q, k, v, bias, causal)
        torch.set_num_threads(2)
        two = _run_with_grads(q, k, v, bias, causal)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("nk", [70, 9000])
def test_cpu_long_key_ranges(nk):
    # 9000 keys of D = 64 are too many for per-thread k/v panels: the engine packs them once for all threads.
    q, k, v, bias = _inputs((1, 2, 1, 5, nk, 64, 64), torch.float32, "cpu", bias="broadcast")
    got = _run_with_grads(q, k, v, bias)
    exp_out, exp_mean, leaves64 = _reference(q, k, v, bias, False)
    want = (exp_out, exp_mean) + torch.autograd.grad((exp_out.square().sum(), exp_mean.square().sum()), leaves64)
    for name, a, b in zip(["out", "map", "dq", "dk", "dv", "dbias"], got, want):
        assert_close(a, b, torch.float32, scale=16, msg=name)


@pytest.mark.parametrize("nq,nk", [(70, 77), (70, 300), (5, 8300)])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_with_map_matches_the_two_ops(nq, nk, causal):
    # Up to 8192 float64 keys a query block's scores fit one strip (one fused pass); 8300 do not (forward,
    # then the map kernel). The backward of both outputs together must equal the sum of the two ops'.
    ns = torch.ops.pykernels
    q, k, v, bias = _inputs((2, 4, 2, nq, nk, 40, 24), torch.float64, "cpu", bias="full", requires_grad=False)
    out, lse, attn_mean = ns.attention_with_map(q, k, v, bias, causal, 0.2)
    out2, lse2 = ns.attention(q, k, v, bias, causal, 0.2)
    assert_close(out, out2, torch.float64)
    assert_close(lse, lse2, torch.float64)
    assert_close(attn_mean, ns.attention_map(q, k, bias, lse2, causal, 0.2), torch.float64)
    grad_out, grad_map = torch.randn_like(out), torch.randn_like(attn_mean)
    got = ns.attention_with_map_backward(q, k, v, bias, out, lse, grad_out, grad_map, causal, 0.2, True)
    dq, dk, dv, db = ns.attention_backward(q, k, v, bias, out, lse, grad_out, causal, 0.2, True)
    mq, mk, mb = ns.attention_map_backward(q, k, bias, lse, grad_map, causal, 0.2, True)
    for name, a, b in zip(["dq", "dk", "dv", "dbias"], got, (dq + mq, dk + mk, dv, db + mb)):
        assert_close(a, b, torch.float64, msg=name)


# ----------------------------------------------------------------------------------- opcheck / gradcheck

NAMESPACES = namespaces()


def _op_args(requires_grad):
    q, k, v, bias = _inputs((2, 2, 1, 5, 6, 8, 4), torch.float64, "cpu", bias="full", requires_grad=requires_grad)
    return q, k, v, bias


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(namespace, requires_grad, causal):
    ns = getattr(torch.ops, namespace)
    q, k, v, bias = _op_args(requires_grad)
    torch.library.opcheck(ns.attention.default, (q, k, v, bias, causal, 0.3))
    torch.library.opcheck(ns.attention.default, (q, k, v, None, causal, 0.3))
    with torch.no_grad():
        out, lse = ns.attention(q, k, v, bias, causal, 0.3)
    torch.library.opcheck(ns.attention_map.default, (q, k, bias, lse, causal, 0.3))
    torch.library.opcheck(ns.attention_with_map.default, (q, k, v, bias, causal, 0.3))
    if not requires_grad:
        grad = torch.randn_like(out)
        torch.library.opcheck(ns.attention_backward.default, (q, k, v, bias, out, lse, grad, causal, 0.3, True))
        gmap = torch.randn(2, 5, 6, dtype=torch.float64)
        torch.library.opcheck(ns.attention_map_backward.default, (q, k, bias, lse, gmap, causal, 0.3, True))
        torch.library.opcheck(ns.attention_with_map_backward.default,
                              (q, k, v, bias, out, lse, grad, gmap, causal, 0.3, True))


@pytest.mark.parametrize("engine", [e for e in engines_for("cpu")])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(engine, causal):
    q, k, v, bias = _inputs((1, 2, 1, 4, 5, 3, 2), torch.float64, "cpu", bias="full")
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: pk.fused_attention(q, k, v, attn_bias=b, causal=causal, backend=engine), (q, k, v, bias))
    assert torch.autograd.gradcheck(
        lambda q, k, b: pk.fused_attention(q, k, v.detach(), attn_bias=b, causal=causal, return_attn_mean=True,
                                           backend=engine)[1], (q, k, bias))


@pytest.mark.parametrize("engine", ["cpu"])
def test_compile_fullgraph(engine):
    q, k, v, bias = _inputs((1, 2, 2, 6, 7, 8, 8), torch.float32, "cpu", bias="broadcast")

    def f(q, k, v, bias):
        out, mean = pk.fused_attention(q, k, v, attn_bias=bias, return_attn_mean=True, backend=engine)
        return out.sum() + mean.square().sum() + pk.fused_attention(q, k, v, causal=True, backend=engine).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(q, k, v, bias)
    got = compiled(q, k, v, bias)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v, bias)), torch.autograd.grad(eager, (q, k, v, bias)))


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error():
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"pykernels.fused_attention: batch sizes differ"):
        pk.fused_attention(q, torch.randn(2, 2, 5, 8), v)
    with pytest.raises(ValueError, match=r"the 4 query heads must be a multiple of the 3 key/value heads"):
        pk.fused_attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match=r"q and k head dims differ: 8 and 7"):
        pk.fused_attention(q, torch.randn(1, 2, 5, 7), v)
    with pytest.raises(ValueError, match=r"k and v token counts differ"):
        pk.fused_attention(q, k, torch.randn(1, 2, 6, 8))
    with pytest.raises(ValueError, match=r"attn_bias of shape \[3, 4\] is not broadcastable"):
        pk.fused_attention(q, k, v, attn_bias=torch.zeros(3, 4))
    with pytest.raises(TypeError, match=r"k has dtype torch.float64, q has torch.float32"):
        pk.fused_attention(q, k.double(), v)
    with pytest.raises(TypeError, match=r"attn_bias must be a floating bias or a bool mask"):
        pk.fused_attention(q, k, v, attn_bias=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        pk.fused_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"the head dim must be positive"):
        pk.fused_attention(q[..., :0], k[..., :0], v)
    with pytest.raises(TypeError, match=r"v must be float32, float64, float16 or bfloat16, got torch.int64"):
        pk.fused_attention(q, k, v.long())


@pytest.mark.parametrize("dqk, dv", [(264, 8), (8, 264)])
@pytest.mark.parametrize("family", ["attention", "window", "neighborhood"])
def test_triton_refuses_head_dims_its_tiles_cannot_hold(family, dqk, dv):
    # Wider heads need more shared memory than a GPU has (tools/check_triton_kernels.py measured it); the
    # interpreter would run them, so the refusal must not depend on where it runs.
    if "triton" not in engines_for("cpu"):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    q, k, v = torch.randn(1, 1, 9, dqk), torch.randn(1, 1, 9, dqk), torch.randn(1, 1, 9, dv)
    calls = {"attention": lambda: pk.fused_attention(q, k, v, backend="triton"),
             "window": lambda: pk.window_attention(q, k, v, (3, 3), 3, backend="triton"),
             "neighborhood": lambda: pk.neighborhood_attention_2d(q, k, v, (3, 3), 3, backend="triton")}
    with pytest.raises(ValueError, match=rf"the triton engine supports head dims up to 256, got D = {dqk} and "
                                         rf"Dv = {dv}"):
        calls[family]()


@pytest.mark.parametrize("device,engine", ENGINES)
def test_compile_with_strided_inputs(device, engine):
    # Gradients must come back in the layout the fake kernels promise, or compiled backward views break.
    q = torch.randn(1, 6, 2, 8, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 2, 5, 8, device=device, requires_grad=True)
    v = torch.randn(1, 2, 5, 8, device=device, requires_grad=True)

    def f(q, k, v):
        out, mean = pk.fused_attention(q, k, v, return_attn_mean=True, backend=engine)
        return out.square().sum() + mean.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    eager = f(q, k, v)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(eager, (q, k, v)))
