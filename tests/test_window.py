"""Windowed attention: every engine against the float64 reference (Swin's copies), and MSW-MSA against
HiDiffusion's roll/partition/attention/reverse sequence."""
import pytest
import torch

import pykernels.window as pkw
from pykernels.reference import window as ref
from pykernels.testing import assert_close, assert_low_precision_error, engines_for, runs_interpreted

pytestmark = pytest.mark.window

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ENGINES = [pytest.param(d, e, id=f"{d}-{e}", marks=[pytest.mark.cuda] if d == "cuda" else [])
           for d in DEVICES for e in engines_for(d) if e != "reference"]
# The Triton interpreter and the CUDA emulator run one thread at a time: on CPU tensors they get SMALL_CASES and
# skip the large, repeated and gradcheck tests (COMPILED), which keeps each one's share of CI near a minute.
INTERPRETED = [p for p in ENGINES if runs_interpreted(*p.values)]
COMPILED = [p for p in ENGINES if p not in INTERPRETED]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (spatial_shape, window, shift, D, bias, pad_kv): windows 1, 2, 7, 8, 12 and a rectangle; shifts 0, 1 and
# half the window; grids that windows do not divide; a window larger than the grid on one axis (timm clamps
# it and drops that axis's shift); 12 x 12 windows span several query and key blocks.
CASES = [
    ((5, 6), 1, 0, 32, "none", False),
    ((7, 9), 2, 1, 40, "table", True),
    ((14, 14), 7, 3, 32, "table", False),
    ((15, 17), 7, 1, 64, "dense", True),
    ((16, 16), 8, 4, 32, "none", True),
    ((20, 13), 8, 0, 40, "table", True),
    ((25, 30), 12, 6, 32, "table", True),
    ((13, 22), (6, 8), (3, 1), 40, "dense", False),
    ((5, 9), 7, 3, 32, "table", True),
]
# A window of one tile (fused backward) with the table; a rectangle of two query and key blocks in fp32 and
# fp64 with the dense bias and pad tokens.
SMALL_CASES = [((5, 7), 3, 1, 16, "table", True), ((7, 9), (6, 7), (3, 2), 16, "dense", True)]


def _case_id(case):
    shape, window, shift, d, bias, pad = case
    return f"{shape[0]}x{shape[1]}-w{window}-s{shift}-d{d}-{bias}{'-pad' if pad else ''}".replace(" ", "")


def _inputs(case, dtype, device="cpu", batch=2, heads=2, seed=0):
    shape, window, shift, d, bias, pad = case
    (wh, ww), _ = pkw.swin_window_shift(shape, window, shift)
    g = torch.Generator().manual_seed(seed)

    def t(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    n = shape[0] * shape[1]
    q, k, v = t(batch, heads, n, d), t(batch, heads, n, d), t(batch, heads, n, d)
    rel = None
    if bias == "table":
        rel = t((2 * wh - 1) * (2 * ww - 1), heads)
    elif bias == "dense":
        rel = t(heads, wh * ww, wh * ww)
    pad_kv = t(2, heads, d) if pad else None
    for x in (q, k, v, rel, pad_kv):
        if x is not None:
            x.requires_grad_()
    return q, k, v, rel, pad_kv


def _reference(case, q, k, v, rel, pad_kv, dtype):
    """The reference output and its leaves: q, k, v, then the bias and pad_kv where given."""
    shape, window, shift, *_ = case
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    bias, pad = (x.detach().to(dtype).requires_grad_() if x is not None else None for x in (rel, pad_kv))
    out = pkw.window_attention(*leaves, shape, window, shift, rel_pos_bias=bias, pad_kv=pad, backend="reference")
    return out, leaves + [x for x in (bias, pad) if x is not None]


def _check(actual, expected, eager, dtype, scale=1.0, msg=""):
    if dtype in (torch.float16, torch.bfloat16):
        assert_low_precision_error(actual, expected, eager, msg=msg)
    else:
        assert_close(actual, expected, dtype, scale=scale, msg=msg)


@pytest.mark.parametrize("device,engine,case", [
    pytest.param(*p.values, case, id=f"{p.id}-{_case_id(case)}", marks=p.marks)
    for p in ENGINES for case in (SMALL_CASES if p in INTERPRETED else CASES)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_window_attention_matches_reference(device, engine, case, dtype):
    shape, window, shift, *_ = case
    q, k, v, rel, pad_kv = _inputs(case, dtype, device)
    out = pkw.window_attention(q, k, v, shape, window, shift, rel_pos_bias=rel, pad_kv=pad_kv, backend=engine)
    expected, leaves64 = _reference(case, q, k, v, rel, pad_kv, torch.float64)
    eager, eager_leaves = _reference(case, q, k, v, rel, pad_kv, dtype)
    assert out.shape == expected.shape and out.dtype == dtype
    _check(out, expected, eager, dtype, scale=4, msg="out")

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)
    inputs = [x for x in (q, k, v, rel, pad_kv) if x is not None]
    names = [name for name, x in zip(("q", "k", "v", "bias", "pad_kv"), (q, k, v, rel, pad_kv)) if x is not None]
    grads = torch.autograd.grad(out, inputs, grad.to(dtype))
    want = torch.autograd.grad(expected, leaves64, grad)
    eager_grads = torch.autograd.grad(eager, eager_leaves, grad.to(dtype))
    for name, got, w, e in zip(names, grads, want, eager_grads):
        assert got.shape == w.shape and got.dtype == dtype
        _check(got, w, e, dtype, scale=16, msg=f"grad {name}")


@pytest.mark.parametrize("device,engine", ENGINES)
def test_table_and_dense_bias_agree(device, engine):
    case = ((10, 11), 4, 2, 32, "table", False)
    q, k, v, table, _ = _inputs(case, torch.float64, device)
    dense = ref.table_to_dense(table, (4, 4)).detach().requires_grad_()
    a = pkw.window_attention(q, k, v, (10, 11), 4, 2, rel_pos_bias=table, backend=engine)
    b = pkw.window_attention(q, k, v, (10, 11), 4, 2, rel_pos_bias=dense, backend=engine)
    torch.testing.assert_close(a, b)
    (d_table,) = torch.autograd.grad(a.square().sum(), table)
    (d_dense,) = torch.autograd.grad(b.square().sum(), dense)
    (expected,) = torch.autograd.grad(ref.table_to_dense(table, (4, 4)), table, d_dense)
    torch.testing.assert_close(d_table, expected)


@pytest.mark.parametrize("device,engine", ENGINES)
def test_window_larger_than_the_grid_follows_timm(device, engine):
    q, k, v, _, _ = _inputs(((3, 10), 7, 3, 32, "none", False), torch.float64, device)
    # timm's _calc_window_shift: window (3, 7), and no shift along the 3-row axis.
    out = pkw.window_attention(q, k, v, (3, 10), 7, 3, backend=engine)
    expected = ref.window_attention(q, k, v, (3, 10), (3, 7), (0, 3))
    assert_close(out, expected, torch.float64)
    assert pkw.swin_window_shift((3, 10), 7, 3) == ((3, 7), (0, 3))
    assert pkw.swin_window_shift((56, 56), 7, 3) == ((7, 7), (3, 3))
    assert pkw.swin_window_shift((7, 7), 7, 3) == ((7, 7), (0, 0))


@pytest.mark.parametrize("device,engine", COMPILED)
def test_large_windows(device, engine):
    # MSW-MSA's geometry in miniature: 2 x 2 windows of 40 x 40 tokens, 25 query blocks x 13 key blocks each.
    case = ((80, 80), 40, 20, 40, "none", False)
    q, k, v, _, _ = _inputs(case, torch.float32, device, batch=1, heads=1)
    out = pkw.window_attention(q, k, v, (80, 80), 40, 20, shift_mask=False, backend=engine)
    expected = ref.window_attention(q.double(), k.double(), v.double(), (80, 80), (40, 40), (20, 20),
                                    shift_mask=False)
    assert_close(out, expected, torch.float32, scale=4)


@pytest.mark.parametrize("device,engine", ENGINES)
def test_strided_inputs(device, engine):
    b, heads, h, w, d = 2, 3, 9, 10, 16
    q = torch.randn(b, h * w, heads, d, device=device).transpose(1, 2)  # [B, N, heads, D] as diffusers has it
    k = torch.randn(b, 1, h * w, d, device=device).expand(b, heads, h * w, d)
    v = torch.randn(b, heads, h * w, 2 * d, device=device)[..., ::2]
    table = torch.randn(heads, 49, device=device).t()
    out = pkw.window_attention(q, k, v, (h, w), 4, 2, rel_pos_bias=table, backend=engine)
    expected = ref.window_attention(q.double(), k.double(), v.double(), (h, w), (4, 4), (2, 2),
                                    bias_table=table.double())
    assert_close(out, expected, torch.float32, scale=4)


@pytest.mark.parametrize("device,engine", COMPILED)
@pytest.mark.parametrize("window", [7, 12])
def test_results_are_deterministic_for_any_thread_count(device, engine, window):
    case = ((21, 21), window, window // 2, 32, "table", True)
    q, k, v, table, pad_kv = _inputs(case, torch.float32, device, batch=3)

    def run():
        out = pkw.window_attention(q, k, v, (21, 21), window, window // 2, rel_pos_bias=table, pad_kv=pad_kv,
                                   backend=engine)
        return (out,) + torch.autograd.grad(out.square().sum(), (q, k, v, table, pad_kv))

    threads = torch.get_num_threads()
    first = run()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, run()))
    assert all(torch.equal(a, b) for a, b in zip(first, single))


# ------------------------------------------------------------------------------------------- MSW-MSA

MSW_SHAPES = [(16, 16), (12, 20), (9, 14), (7, 7), (2, 6)]


@pytest.mark.parametrize("device,engine", COMPILED)
@pytest.mark.parametrize("spatial", MSW_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("quarter", [0, 1, 2, 3])
def test_msw_msa_matches_hidiffusion(device, engine, spatial, quarter):
    wh, ww = ref.msw_msa_window(spatial)
    shift = (wh // 4 * quarter, ww // 4 * quarter)
    g = torch.Generator().manual_seed(quarter)
    q, k, v = (torch.randn(2, 2, spatial[0] * spatial[1], 40, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out = pkw.msw_msa(q, k, v, spatial, shift=shift, backend=engine)
    expected = ref.msw_msa(q, k, v, spatial, shift)
    assert_close(out, expected, torch.float64)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        assert_close(got, want, torch.float64)


@pytest.mark.parametrize("device,engine", ENGINES)
def test_msw_msa_skips_the_roll_without_a_vertical_shift(device, engine):
    q, k, v = (torch.randn(1, 2, 6 * 16, 8, dtype=torch.float64, device=device) for _ in range(3))
    out = pkw.msw_msa(q, k, v, (6, 16), shift=(0, 4), backend=engine)
    assert_close(out, ref.msw_msa(q, k, v, (6, 16), (0, 0)), torch.float64)


def test_msw_msa_draws_hidiffusions_shifts():
    # HiDiffusion: rand_num = torch.rand(1); quarters (0, 1/4, 1/2, 3/4 of the window) by thresholds.
    torch.manual_seed(3)
    u = torch.rand(1).item()
    torch.manual_seed(3)
    drawn = pkw.msw_msa_shift((128, 96))
    i = 0 if u <= 0.25 else 1 if u <= 0.5 else 2 if u <= 0.75 else 3
    assert drawn == (64 // 4 * i, 48 // 4 * i)
    shifts = [pkw.msw_msa_shift((128, 96), torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(shifts) == {(0, 0), (16, 12), (32, 24), (48, 36)}
    assert shifts == [pkw.msw_msa_shift((128, 96), torch.Generator().manual_seed(s)) for s in range(40)]
    q = torch.randn(1, 2, 16 * 16, 8)
    a = pkw.msw_msa(q, q, q, (16, 16), generator=torch.Generator().manual_seed(5))
    b = pkw.msw_msa(q, q, q, (16, 16), shift=pkw.msw_msa_shift((16, 16), torch.Generator().manual_seed(5)))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- opcheck / gradcheck


def _op_args(bias, requires_grad):
    q, k, v, rel, pad_kv = _inputs(((5, 7), (2, 3), (1, 2), 8, bias, True), torch.float64, batch=2, heads=2)
    for x in (q, k, v, rel, pad_kv):
        if x is not None:
            x.requires_grad_(requires_grad)
    table, dense = (rel, None) if bias == "table" else (None, rel)
    return (q, k, v, [5, 7], [2, 3], [1, 2], table, dense, pad_kv)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("bias", ["table", "dense", "none"])
@pytest.mark.parametrize("shift_mask", [True, False])
def test_opcheck(requires_grad, bias, shift_mask):
    ns = torch.ops.pykernels
    args = _op_args(bias, requires_grad)
    torch.library.opcheck(ns.window_attention.default, args + (shift_mask, 0.3))
    if not requires_grad:
        out, lse = ns.window_attention(*args, shift_mask, 0.3)
        grad = torch.randn_like(out)
        torch.library.opcheck(ns.window_attention_backward.default,
                              args + (shift_mask, 0.3, out, lse, grad, bias != "none"))


@pytest.mark.parametrize("device,engine", COMPILED)
@pytest.mark.parametrize("bias", ["table", "dense"])
def test_gradcheck_float64(device, engine, bias):
    q, k, v, rel, pad_kv = _inputs(((4, 5), 3, 1, 3, bias, True), torch.float64, device, batch=1, heads=2)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b, pad: pkw.window_attention(q, k, v, (4, 5), 3, 1, rel_pos_bias=b, pad_kv=pad,
                                                     backend=engine), (q, k, v, rel, pad_kv))


def test_compile_fullgraph():
    q, k, v, table, pad_kv = _inputs(((9, 10), 4, 2, 8, "table", True), torch.float32)

    def f(q, k, v, table, pad_kv):
        swin = pkw.window_attention(q, k, v, (9, 10), 4, 2, rel_pos_bias=table, pad_kv=pad_kv)
        hidiffusion = pkw.msw_msa(q, k, v, (9, 10), shift=(1, 1))
        return swin.square().sum() + hidiffusion.sum()

    leaves = (q, k, v, table, pad_kv)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(*leaves)
    got = compiled(*leaves)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(torch.autograd.grad(got, leaves), torch.autograd.grad(eager, leaves))


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error():
    q = torch.randn(1, 2, 30, 8)
    op = r"pykernels.window_attention: "
    with pytest.raises(ValueError, match=op + r"spatial_shape \(5, 7\) has 35 cells but q has 30 tokens"):
        pkw.window_attention(q, q, q, (5, 7), 3)
    with pytest.raises(ValueError, match=op + r"shift_size \(3, 3\) must be smaller than window_size \(3, 3\)"):
        pkw.window_attention(q, q, q, (5, 6), 3, 3)
    with pytest.raises(ValueError, match=op + r"window_size must be >= 1"):
        pkw.window_attention(q, q, q, (5, 6), 0)
    with pytest.raises(TypeError, match=op + r"window_size must be an int or a pair of ints"):
        pkw.window_attention(q, q, q, (5, 6), (2, 2, 2))
    with pytest.raises(ValueError, match=op + r"a relative-position table for window \(3, 3\) and 2 heads must be "
                                              r"\[25, 2\], got \[24, 2\]"):
        pkw.window_attention(q, q, q, (5, 6), 3, rel_pos_bias=torch.zeros(24, 2))
    with pytest.raises(ValueError, match=r"clamped from \(7, 7\) to the \(5, 6\) grid"):
        pkw.window_attention(q, q, q, (5, 6), 7, rel_pos_bias=torch.zeros(169, 2))
    with pytest.raises(ValueError, match=op + r"a dense rel_pos_bias for window \(3, 3\) and 2 heads must be "
                                              r"\[2, 9, 9\]"):
        pkw.window_attention(q, q, q, (5, 6), 3, rel_pos_bias=torch.zeros(2, 9, 8))
    with pytest.raises(TypeError, match=op + r"k has dtype torch.float64, q has torch.float32"):
        pkw.window_attention(q, q.double(), q, (5, 6), 3)
    with pytest.raises(TypeError, match=op + r"v must be float32, float64, float16 or bfloat16, got torch.int64"):
        pkw.window_attention(q, q, q.long(), (5, 6), 3)
    with pytest.raises(ValueError, match=op + r"q must be 4-D"):
        pkw.window_attention(q[0], q, q, (5, 6), 3)
    with pytest.raises(ValueError, match=op + r"pad_kv must be \[2, heads, D\] = \[2, 2, 8\], got \[2, 8\]"):
        pkw.window_attention(q, q, q, (5, 6), 3, pad_kv=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"pykernels.msw_msa: shift \(4, 1\) must be smaller than the window \(3, 3\)"):
        pkw.msw_msa(q, q, q, (5, 6), shift=(4, 1))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        pkw.window_attention(q, q, q, (5, 6), 3, backend="gpu")


def test_direct_op_calls_are_checked():
    q = torch.randn(1, 2, 30, 8)
    ns = torch.ops.pykernels
    with pytest.raises(RuntimeError, match=r"pykernels.window_attention: shift \[3, 1\] must be smaller than window"):
        ns.window_attention(q, q, q, [5, 6], [3, 3], [3, 1], None, None, None, True, 1.0)
    with pytest.raises(RuntimeError, match=r"pykernels.window_attention: bias_table must have shape \[25, 2\]"):
        ns.window_attention(q, q, q, [5, 6], [3, 3], [1, 1], torch.zeros(24, 2), None, None, True, 1.0)
    with pytest.raises(RuntimeError, match=r"spatial_shape \[5, 7\] has 35 cells but q has 30 tokens"):
        ns.window_attention(q, q, q, [5, 7], [3, 3], [1, 1], None, None, None, True, 1.0)
