"""One hypothesis strategy and one case builder per public op and nn layer.

A strategy (parent process) draws the plain-data ``params`` of a case and, sometimes, one ``invalid`` mutation
from the op's list; the builder (worker process) turns the case into tensors, the call and the expected
outcome. Every invalid mutation names the exception type the op documents and the argument its message must
name.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from fuzz_core import DTYPES, LAYOUTS, VALUES, Built

# Shapes: empty, one, primes, powers of two and their tails (one past a tile).
SIZES = (0, 1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 32, 33)
TINY = (0, 1, 2, 3, 5)
HEAD_DIMS = (1, 2, 3, 8, 13, 16, 32, 33, 64)
TINY_HEAD_DIMS = (1, 2, 3, 8)


@dataclass
class OpSpec:
    public: str                     # the name error messages must carry
    params: object                  # (engine) -> strategy of params
    build: object                   # (case, maker) -> Built
    invalid: tuple = ()             # names of invalid mutations
    engines: tuple = ("cpu", "triton")
    dtypes: tuple = tuple(DTYPES)
    values: tuple = VALUES
    layouts: tuple = LAYOUTS
    budget: dict = field(default_factory=lambda: {"cpu": 180, "triton": 8})  # CI draws per engine
    known: dict = field(default_factory=dict)  # label -> (engines, context manager giving its semantics)


@contextlib.contextmanager
def _nan_rows_as_masked():
    """Known defect C1 (CPU engine): a softmax row whose state turns NaN is read as a fully masked row.
    csrc/attention/flash_cpu.h fold_row takes its max with max_lanes, which skips NaN, so a query whose
    scores are all NaN (or NaN and masked) outputs 0; csrc/common/online_softmax.h lse()/inv_sum() test
    ``sum > 0``, false for a NaN sum, so the attention map row of such a query (or of one with a +inf score)
    is 0. The reference gives NaN for both."""
    orig = torch.softmax

    def softmax(x, dim, **kw):
        # The engines' running sum turns NaN there too (a +inf score gives exp(inf - inf)), and a NaN sum
        # reads as "no key": the map row (and, for an all-NaN row, the output) becomes 0.
        empty = (x.isnan() | x.isneginf()).all(dim, keepdim=True)
        p = orig(x.masked_fill(empty, 0.0), dim, **kw).masked_fill(empty, 0.0)
        return p.masked_fill(p.isnan().any(dim, keepdim=True), 0.0)
    torch.softmax = softmax
    try:
        yield
    finally:
        torch.softmax = orig


@contextlib.contextmanager
def _soft_inf_is_nan():
    """Known defect C2 (CPU and Triton engines, csrc/flow/maxmin.h soft_exponent and pykernels/triton/flow.py):
    where the hard product is +inf (a pair a = b = +inf), the soft product is NaN ((h - x) / t = inf - inf)
    instead of the reference's +inf."""
    from pykernels.reference import flow as rflow
    orig = rflow.soft_maxmin_matmul

    def soft(a, b, temperature):
        out = orig(a, b, temperature)
        return out.masked_fill(rflow.maxmin_matmul(a, b) == math.inf, math.nan)
    rflow.soft_maxmin_matmul = soft
    try:
        yield
    finally:
        rflow.soft_maxmin_matmul = orig


@contextlib.contextmanager
def _inf_score_is_one_hot():
    """Known defect C3 (CPU engine, csrc/common/online_softmax.h OnlineSoftmax::update): graph_attention's
    online softmax takes a single +inf score as the new max with weight 1 and rescales the rest by
    exp(max - inf) = 0, so the target outputs that edge's value (the one-hot limit); the reference, torch's
    softmax and the weights return_attention_weights gives (edge_softmax) are NaN there."""
    from pykernels.reference import graph as rgraph
    orig = rgraph.edge_softmax

    def edge_softmax(target, scores, num_targets):
        w = orig(target, scores, num_targets)
        idx = target.view(-1, 1).expand_as(scores)
        infs = torch.zeros(num_targets, scores.size(1), dtype=scores.dtype).scatter_add(
            0, idx, scores.isposinf().to(scores.dtype)).gather(0, idx)
        one_hot = infs == 1
        return torch.where(one_hot, scores.isposinf().to(w.dtype), w)
    rgraph.edge_softmax = edge_softmax
    try:
        yield
    finally:
        rgraph.edge_softmax = orig


@contextlib.contextmanager
def _nan_weights_as_zero():
    """Known defect C1 in the graph engine's softmax (csrc/graph/edge_softmax_cpu.cpp, graph_attention_cpu.cpp
    through csrc/common/online_softmax.h inv_sum(): ``sum > 0`` is false for a NaN sum): the weights of a
    target with a NaN score come out 0 where the reference's are NaN."""
    from pykernels.reference import graph as rgraph
    orig = rgraph.edge_softmax

    def edge_softmax(target, scores, num_targets):
        w = orig(target, scores, num_targets)
        return w.masked_fill(w.isnan(), 0.0)
    rgraph.edge_softmax = edge_softmax
    try:
        yield
    finally:
        rgraph.edge_softmax = orig


C1 = {"C1": (("cpu",), _nan_rows_as_masked)}
# Known divergence M1 (CPU and Triton engines of the windowed family): a query whose every score in its
# window is -inf (a -inf relative-position bias) outputs 0, fused_attention's documented rule for a fully
# masked query; the window and neighbourhood references run torch.softmax, which gives NaN.
C1M1 = {"C1": (("cpu",), _nan_rows_as_masked), "M1": (("triton",), _nan_rows_as_masked)}
C3 = {"C3": (("cpu",), _inf_score_is_one_hot), "C1": (("cpu",), _nan_weights_as_zero)}
C2 = {"C2": (("cpu", "triton"), _soft_inf_is_nan)}


def _sizes(engine):
    return TINY if engine == "triton" else SIZES


def _dims(engine):
    return TINY_HEAD_DIMS if engine == "triton" else HEAD_DIMS


@st.composite
def case_strategy(draw, name, spec, engine):
    invalid = None
    if spec.invalid and draw(st.integers(0, 3)) == 0:
        invalid = draw(st.sampled_from(spec.invalid))
    return {
        "op": name, "engine": engine, "seed": draw(st.integers(0, 2 ** 31 - 1)),
        "dtype": draw(st.sampled_from(spec.dtypes)),
        "layout": draw(st.sampled_from(spec.layouts)),
        "values": draw(st.sampled_from(("normal",) * 3 + tuple(spec.values))),
        "params": draw(spec.params(engine)),
        "invalid": invalid,
    }


def _norm(mk, reduce_len=1):
    return mk.magnitude(reduce_len) if mk.values in ("huge", "large") else 1.0


def _bad_dtype(t):
    return (t * 0).to(torch.int32) if t.is_floating_point() else t.float()


def _other_device(t):
    return t.detach().to("meta")


# --------------------------------------------------------------------------------------------- attention
@st.composite
def _attention_params(draw, engine):
    s = _sizes(engine)
    return {"b": draw(st.sampled_from((0, 1, 2) if engine == "cpu" else (1, 2))),
            "hkv": draw(st.sampled_from((1, 2))), "group": draw(st.sampled_from((1, 2, 3))),
            "nq": draw(st.sampled_from(s)), "nk": draw(st.sampled_from(s)),
            "d": draw(st.sampled_from(_dims(engine))), "dv": draw(st.sampled_from(_dims(engine))),
            "bias": draw(st.sampled_from(("none", "full", "broadcast", "bool", "bool_rows_masked", "neg_inf"))),
            "causal": draw(st.booleans()), "scale": draw(st.sampled_from((None, 0.5, -1.0, 0.0))),
            "attn_mean": draw(st.booleans())}


def _build_attention(case, mk):
    import pykernels as pk
    p = case["params"]
    b, hkv, h, nq, nk, d, dv = p["b"], p["hkv"], p["hkv"] * p["group"], p["nq"], p["nk"], p["d"], p["dv"]
    inputs = {"q": mk.tensor((b, h, nq, d), special="logits"), "k": mk.tensor((b, hkv, nk, d), special="logits"),
              "v": mk.tensor((b, hkv, nk, dv), special="finite", reduce_len=nk)}
    bias = None
    if p["bias"] == "full":
        bias = mk.tensor((b, h, nq, nk), special="logits")
    elif p["bias"] == "broadcast":
        bias = mk.tensor((b, 1, 1, nk), special="logits", layout=False)
    elif p["bias"] == "bool":
        bias = mk.rand(1, h, nq, nk) < 0.7
    elif p["bias"] == "bool_rows_masked":
        bias = (mk.rand(b, 1, nq, nk) < 0.5) & (torch.arange(nq).view(1, 1, nq, 1) % 2 == 0)
    elif p["bias"] == "neg_inf":
        bias = torch.where(mk.rand(1, 1, nq, nk) < 0.5, -math.inf, 0.0).to(mk.dtype)
    inputs["attn_bias"] = bias
    kw = {"causal": p["causal"], "scale": p["scale"], "return_attn_mean": p["attn_mean"]}
    expect = None
    inv = case.get("invalid")
    if inv == "q_int":
        inputs["q"], expect = _bad_dtype(inputs["q"]), ((TypeError,), "q")
    elif inv == "k_dtype":
        other = torch.float64 if mk.dtype != torch.float64 else torch.float32
        inputs["k"], expect = inputs["k"].to(other), ((TypeError,), "k")
    elif inv == "q_rank":
        inputs["q"], expect = inputs["q"].flatten(0, 1), ((ValueError,), "q")
    elif inv == "v_device":
        inputs["v"], expect = _other_device(inputs["v"]), ((ValueError,), "v")
    elif inv == "heads":
        inputs["k"] = mk.tensor((b, h + 1, nk, d))
        inputs["v"] = mk.tensor((b, h + 1, nk, dv))
        expect = ((ValueError,), "heads")
    elif inv == "head_dim":
        inputs["k"], expect = mk.tensor((b, hkv, nk, d + 1)), ((ValueError,), "head dims")
    elif inv == "bias_shape":
        inputs["attn_bias"], expect = mk.tensor((b, h, nq + 2, nk + 3)), ((ValueError,), "attn_bias")
    elif inv == "bias_int":
        inputs["attn_bias"], expect = torch.zeros(1, 1, nq, nk, dtype=torch.int64), ((TypeError,), "attn_bias")
    elif inv == "scale_str":
        kw["scale"], expect = "0.5", ((TypeError,), "scale")
    elif inv == "scale_nan":
        kw["scale"], expect = math.nan, ((ValueError,), "scale")
    elif inv == "backend":
        kw["backend_override"], expect = "fast", ((ValueError,), "backend")

    def call(engine, t):
        backend = kw.get("backend_override", engine)
        return pk.fused_attention(t["q"], t["k"], t["v"], attn_bias=t["attn_bias"], causal=kw["causal"],
                                  scale=kw["scale"], return_attn_mean=kw["return_attn_mean"], backend=backend)
    return Built(inputs, call, expect=expect, scale=4, norm=_norm(mk, nk))


# --------------------------------------------------------------------------------------------- window
@st.composite
def _window_params(draw, engine):
    s = (1, 2, 3, 5, 7) if engine == "triton" else (1, 2, 3, 4, 5, 7, 8, 11, 14)
    wins = draw(st.sampled_from(((1, 1), (2, 2), (3, 3), (4, 4), (7, 7), (2, 3), (3, 5), (16, 16))))
    return {"b": draw(st.sampled_from((1, 2))), "heads": draw(st.sampled_from((1, 2, 3))),
            "H": draw(st.sampled_from(s)), "W": draw(st.sampled_from(s)),
            "d": draw(st.sampled_from(_dims(engine))), "dv_same": draw(st.booleans()),
            "window": list(wins), "shift": [draw(st.integers(0, wins[0] - 1)), draw(st.integers(0, wins[1] - 1))],
            "bias": draw(st.sampled_from(("none", "table", "dense"))), "shift_mask": draw(st.booleans()),
            "pad_kv": draw(st.booleans()), "scale": draw(st.sampled_from((None, 0.3)))}


def _build_window(case, mk):
    import pykernels as pk
    from pykernels.window import swin_window_shift
    p = case["params"]
    b, heads, H, W, d = p["b"], p["heads"], p["H"], p["W"], p["d"]
    dv = d if p["dv_same"] or p["pad_kv"] else max(1, d // 2 + 1)
    n = H * W
    win, _ = swin_window_shift((H, W), p["window"], p["shift"])
    inputs = {"q": mk.tensor((b, heads, n, d), special="logits"), "k": mk.tensor((b, heads, n, d), special="logits"),
              "v": mk.tensor((b, heads, n, dv), special="finite", reduce_len=win[0] * win[1])}
    rows = (2 * win[0] - 1) * (2 * win[1] - 1)
    inputs["rel_pos_bias"] = {"none": None, "table": mk.tensor((rows, heads), special="logits", layout=False),
                              "dense": mk.tensor((heads, win[0] * win[1], win[0] * win[1]), special="logits",
                                                 layout=False)}[p["bias"]]
    inputs["pad_kv"] = mk.tensor((2, heads, d), special=False, layout=False) if p["pad_kv"] else None
    kw = {"spatial": [H, W], "window": p["window"], "shift": p["shift"], "scale": p["scale"]}
    expect = None
    inv = case.get("invalid")
    if inv == "window_zero":
        kw["window"], expect = [0, p["window"][1]], ((ValueError,), "window_size")
    elif inv == "window_float":
        kw["window"], expect = 2.5, ((TypeError,), "window_size")
    elif inv == "shift_ge_window":
        kw["shift"], expect = [p["window"][0], 0], ((ValueError,), "shift_size")
    elif inv == "shift_negative":
        kw["shift"], expect = [-1, 0], ((ValueError,), "shift_size")
    elif inv == "spatial_mismatch":
        kw["spatial"], expect = [H + 1, W], ((ValueError,), "spatial_shape")
    elif inv == "bias_shape":
        inputs["rel_pos_bias"], expect = mk.tensor((rows + 1, heads), layout=False), ((ValueError,), "rel_pos_bias")
    elif inv == "pad_kv_shape":
        inputs["pad_kv"] = mk.tensor((2, heads + 1, d), special=False, layout=False)
        inputs["v"] = mk.tensor((b, heads, n, d))
        expect = ((ValueError,), "pad_kv")
    elif inv == "scale_str":
        kw["scale"], expect = "x", ((TypeError,), "scale")
    elif inv == "k_shape":
        inputs["k"], expect = mk.tensor((b, heads, n, d + 1)), ((ValueError,), "k")
    elif inv == "q_int":
        inputs["q"], expect = _bad_dtype(inputs["q"]), ((TypeError,), "q")

    def call(engine, t):
        return pk.window_attention(t["q"], t["k"], t["v"], kw["spatial"], kw["window"], kw["shift"],
                                   rel_pos_bias=t["rel_pos_bias"], shift_mask=p["shift_mask"], scale=kw["scale"],
                                   pad_kv=t["pad_kv"], backend=engine)
    return Built(inputs, call, expect=expect, scale=4, norm=_norm(mk, win[0] * win[1]))


@st.composite
def _msw_params(draw, engine):
    s = (2, 3, 4) if engine == "triton" else (1, 2, 3, 4, 5, 6, 8, 9)
    H, W = draw(st.sampled_from(s)), draw(st.sampled_from(s))
    wh, ww = (H + 1) // 2, (W + 1) // 2
    return {"b": draw(st.sampled_from((1, 2))), "heads": draw(st.sampled_from((1, 2))), "H": H, "W": W,
            "d": draw(st.sampled_from(_dims(engine))), "shift": [draw(st.integers(0, wh - 1)),
                                                                 draw(st.integers(0, ww - 1))]}


def _build_msw(case, mk):
    import pykernels as pk
    p = case["params"]
    b, heads, H, W, d = p["b"], p["heads"], p["H"], p["W"], p["d"]
    n = H * W
    # HiDiffusion resamples odd grids bicubically: special values there spread by design, so keep them finite.
    odd = H % 2 or W % 2
    special = not odd
    inputs = {"q": mk.tensor((b, heads, n, d), special=special and "logits"),
              "k": mk.tensor((b, heads, n, d), special=special and "logits"),
              "v": mk.tensor((b, heads, n, d), special=special and "finite", reduce_len=n)}
    kw = {"spatial": [H, W], "shift": p["shift"]}
    expect = None
    inv = case.get("invalid")
    if inv == "shift_ge_window":
        kw["shift"], expect = [(H + 1) // 2, 0], ((ValueError,), "shift")
    elif inv == "shift_negative":
        kw["shift"], expect = [0, -1], ((ValueError,), "shift")
    elif inv == "spatial_mismatch":
        kw["spatial"], expect = [H, W + 1], ((ValueError,), "spatial_shape")
    elif inv == "spatial_zero":
        kw["spatial"], expect = [0, W], ((ValueError,), "spatial_shape")

    def call(engine, t):
        return pk.msw_msa(t["q"], t["k"], t["v"], kw["spatial"], kw["shift"], backend=engine)
    return Built(inputs, call, expect=expect, scale=4, norm=_norm(mk, n) if special else 1.0)


@st.composite
def _na_params(draw, engine):
    s = (1, 2, 3, 5, 7) if engine == "triton" else (1, 2, 3, 5, 7, 8, 11, 13)
    H, W = draw(st.sampled_from(s)), draw(st.sampled_from(s))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh_max, kw_max = H // dh, W // dw
    kh = draw(st.sampled_from([k for k in (1, 3, 5, 7) if k <= kh_max] or [1]))
    kw = draw(st.sampled_from([k for k in (1, 3, 5, 7) if k <= kw_max] or [1]))
    if kh * dh > H:
        dh = 1
    if kw * dw > W:
        dw = 1
    return {"b": draw(st.sampled_from((1, 2))), "heads": draw(st.sampled_from((1, 2))), "H": H, "W": W,
            "d": draw(st.sampled_from(_dims(engine))), "kernel": [kh, kw], "dilation": [dh, dw],
            "rpb": draw(st.booleans()), "scale": draw(st.sampled_from((None, 0.7)))}


def _build_na(case, mk):
    import pykernels as pk
    p = case["params"]
    b, heads, H, W, d = p["b"], p["heads"], p["H"], p["W"], p["d"]
    (kh, kw), n = p["kernel"], H * W
    inputs = {"q": mk.tensor((b, heads, n, d), special="logits"), "k": mk.tensor((b, heads, n, d), special="logits"),
              "v": mk.tensor((b, heads, n, d), special="finite", reduce_len=kh * kw),
              "rpb": mk.tensor((heads, 2 * kh - 1, 2 * kw - 1), special="logits", layout=False) if p["rpb"] else None}
    kw_ = {"spatial": [H, W], "kernel": p["kernel"], "dilation": p["dilation"]}
    expect = None
    inv = case.get("invalid")
    if inv == "kernel_even":
        kw_["kernel"], expect = [2, 1], ((ValueError,), "kernel_size")
    elif inv == "kernel_larger_than_map":
        kw_["kernel"], kw_["dilation"] = [H + 2 if H % 2 else H + 1, 1], [1, 1]
        inputs["rpb"] = None
        expect = ((ValueError,), "kernel_size")
    elif inv == "dilation_zero":
        kw_["dilation"], expect = [0, 1], ((ValueError,), "dilation")
    elif inv == "kernel_negative":
        kw_["kernel"], expect = [-1, 1], ((ValueError,), "kernel_size")
    elif inv == "rpb_shape":
        inputs["rpb"], expect = mk.tensor((heads, 2 * kh, 2 * kw - 1), layout=False), ((ValueError,), "rel_pos_bias")
    elif inv == "spatial_mismatch":
        kw_["spatial"], expect = [H, W + 1], ((ValueError,), "spatial_shape")
    elif inv == "v_tokens":
        inputs["v"], expect = mk.tensor((b, heads, n + 1, d)), ((ValueError,), "v")

    def call(engine, t):
        return pk.neighborhood_attention_2d(t["q"], t["k"], t["v"], kw_["spatial"], kw_["kernel"], kw_["dilation"],
                                            rel_pos_bias=t["rpb"], scale=p["scale"], backend=engine)
    return Built(inputs, call, expect=expect, scale=4, norm=_norm(mk, kh * kw))


# --------------------------------------------------------------------------------------------- flow
@st.composite
def _maxmin_params(draw, engine):
    s = _sizes(engine)
    batch_a = draw(st.sampled_from(((), (1,), (2,), (3,), (2, 1), (1, 3))))
    batch_b = draw(st.sampled_from(((), (1,), batch_a[-1:] if batch_a else (), (2, 3) if len(batch_a) == 2 else ())))
    return {"batch_a": list(batch_a), "batch_b": list(batch_b), "m": draw(st.sampled_from(s)),
            "k": draw(st.sampled_from([x for x in s if x] or [1])), "n": draw(st.sampled_from(s)),
            "temperature": draw(st.sampled_from((1e-4, 1e-2, 0.3, 1.0)))}


def _flow_invalid(case, mk, inputs, kw, soft):
    inv = case.get("invalid")
    if inv == "a_int":
        inputs["a"] = _bad_dtype(inputs["a"])
        return (TypeError,), "a"
    if inv == "b_dtype":
        inputs["b"] = inputs["b"].to(torch.float64 if mk.dtype != torch.float64 else torch.float32)
        return (TypeError,), "b"
    if inv == "a_1d":
        inputs["a"] = inputs["a"].reshape(-1)[:3].contiguous()
        return (ValueError,), "a"
    if inv == "inner_mismatch":
        inputs["b"] = mk.tensor(tuple(inputs["b"].shape[:-2]) + (inputs["b"].size(-2) + 1, inputs["b"].size(-1)))
        return (ValueError,), "k"
    if inv == "inner_zero":
        inputs["a"] = mk.tensor(tuple(inputs["a"].shape[:-1]) + (0,))
        inputs["b"] = mk.tensor(tuple(inputs["b"].shape[:-2]) + (0, inputs["b"].size(-1)))
        return (ValueError,), "k"
    if inv == "batch_mismatch":
        inputs["a"] = mk.tensor((4, 2) + tuple(inputs["a"].shape[-2:]))
        inputs["b"] = mk.tensor((3,) + tuple(inputs["b"].shape[-2:]))
        return (ValueError,), "batch"
    if soft and inv in ("tau_zero", "tau_negative", "tau_nan", "tau_inf"):
        kw["temperature"] = {"tau_zero": 0.0, "tau_negative": -0.1, "tau_nan": math.nan, "tau_inf": math.inf}[inv]
        return (ValueError,), "temperature"
    if soft and inv == "tau_tensor":
        kw["temperature"] = torch.tensor(0.1)
        return (TypeError,), "temperature"
    return None


def _build_maxmin(case, mk, soft=False):
    import pykernels as pk
    p = case["params"]
    a_shape = tuple(p["batch_a"]) + (p["m"], p["k"])
    b_shape = tuple(p["batch_b"]) + (p["k"], p["n"])
    # The soft product's reference forms x / t: huge values overflow it (the engines' h + t log(sum) does not).
    special = "logits" if soft else True
    inputs = {"a": mk.tensor(a_shape, special=special), "b": mk.tensor(b_shape, special=special)}
    kw = {"temperature": p["temperature"]}
    expect = _flow_invalid(case, mk, inputs, kw, soft)

    def call(engine, t):
        if soft:
            return pk.soft_maxmin_matmul(t["a"], t["b"], kw["temperature"], backend=engine)
        return pk.maxmin_matmul(t["a"], t["b"], backend=engine)
    # The hard product is bitwise the broadcast formula's; the soft one is held to the flow tests' x10.
    # Known defect T1: the interpreted Triton engine orders bfloat16 subnormals as if they were 0 (it picks
    # another subnormal or ±0), so its denormal draws are held to the tolerance instead.
    exact = not soft and not (case["engine"] == "triton" and mk.values == "denormal")
    return Built(inputs, call, expect=expect, scale=10, exact=exact, norm=_norm(mk) if soft else 1.0)


@st.composite
def _flow_params(draw, engine):
    s = (1, 2, 3, 5) if engine == "triton" else (1, 2, 3, 5, 7, 8, 13, 17)
    n = draw(st.sampled_from(s))
    return {"layers": draw(st.integers(1, 4)), "n": n, "batch": list(draw(st.sampled_from(((), (1,), (2,))))),
            "mode": draw(st.sampled_from(("hard", "soft", "exact"))),
            "residual": draw(st.sampled_from((0.0, 0.5, 1.0, 0.25))),
            "temperature": draw(st.sampled_from((1e-3, 0.05, 1.0)))}


def _flow_maps(mk, p, special=True):
    if special and p["mode"] == "soft":
        special = "logits"
    return [mk.tensor(tuple(p["batch"]) + (p["n"], p["n"]), positive=True, special=special)
            for _ in range(p["layers"])]


def _maps_invalid(case, mk, inputs, kw, p):
    inv = case.get("invalid")
    if inv == "residual_range":
        kw["residual"] = 1.5
        return (ValueError,), "residual"
    if inv == "maps_empty":
        inputs["maps"] = []
        return (ValueError,), "maps"
    if inv == "maps_chain":
        inputs["maps"] = inputs["maps"] + [mk.tensor((p["n"] + 1, p["n"] + 1), positive=True)]
        return (ValueError,), f"maps[{len(inputs['maps']) - 1}]"
    if inv == "maps_int":
        inputs["maps"] = [(m * 0).long() for m in inputs["maps"]]
        return (TypeError,), "maps[0]"
    if inv == "maps_dtype_mixed":
        other = torch.float64 if mk.dtype != torch.float64 else torch.float32
        inputs["maps"] = inputs["maps"] + [mk.tensor((p["n"], p["n"]), positive=True, dtype=other)]
        kw["mode"] = "hard"
        return (TypeError,), f"maps[{len(inputs['maps']) - 1}]"
    if inv == "maps_1d":
        inputs["maps"] = [mk.tensor((p["n"],), positive=True)]
        return (TypeError, ValueError), "maps[0]"
    return None


def _build_flow(case, mk):
    import pykernels as pk
    p = case["params"]
    exact = p["mode"] == "exact"
    if exact:
        p = dict(p, n=min(p["n"], 7))  # networkx's all-pairs oracle grows as n^4
    inputs = {"maps": _flow_maps(mk, p, special=not exact)}
    kw = {"mode": p["mode"], "residual": p["residual"], "temperature": p["temperature"]}
    expect = _maps_invalid(case, mk, inputs, kw, p)
    inv = case.get("invalid")
    if inv == "mode":
        kw["mode"], expect = "medium", ((ValueError,), "mode")
    elif inv == "tau_zero":
        kw["mode"], kw["temperature"], expect = "soft", 0.0, ((ValueError,), "temperature")
    elif inv == "exact_negative":
        kw["mode"] = "exact"
        inputs["maps"] = [m - 2 for m in inputs["maps"]]
        expect = ((ValueError,), "maps[0]")

    def call(engine, t):
        if engine == "reference" and kw["mode"] == "exact":
            return _layered_flow_networkx(t["maps"], kw["residual"])
        return pk.attention_flow(t["maps"], kw["mode"], kw["residual"], kw["temperature"], backend=engine)
    # exact always returns float64: compare it as such.
    return Built(inputs, call, expect=expect, scale=10)


def _layered_flow_networkx(maps, residual, sources=None, sinks=None):
    """All-pairs (or listed pairs) max-flow through the layered DAG, by networkx (float64 capacities)."""
    import networkx as nx
    from pykernels.reference.flow import with_residual
    caps = [with_residual(m.detach().double(), residual) for m in maps]
    batch_shape = caps[0].shape[:-2]
    caps = [c.reshape(-1, c.size(-2), c.size(-1)) for c in caps]
    n0, nl = caps[0].size(-1), caps[-1].size(-2)
    if sources is None:
        pairs = [(j, i) for i in range(nl) for j in range(n0)]
        qshape = (nl, n0)
    else:
        pairs = list(zip(sources, sinks))
        qshape = (len(pairs),)
    outs = []
    for bi in range(caps[0].size(0)):
        g = nx.DiGraph()
        for layer, c in enumerate(caps):
            for i in range(c.size(-2)):
                for j in range(c.size(-1)):
                    if c[bi, i, j] > 0:
                        g.add_edge((layer, j), (layer + 1, i), capacity=float(c[bi, i, j]))
        vals = []
        for s, t in pairs:
            src, dst = (0, s), (len(caps), t)
            vals.append(nx.maximum_flow_value(g, src, dst) if src in g and dst in g else 0.0)
        outs.append(torch.tensor(vals, dtype=torch.float64))
    out = torch.stack(outs) if outs else torch.empty(0, len(pairs), dtype=torch.float64)
    return out.reshape(tuple(batch_shape) + qshape)


def _build_rollout(case, mk):
    import pykernels as pk
    p = case["params"]
    inputs = {"maps": _flow_maps(mk, p)}
    kw = {"residual": p["residual"], "mode": "hard", "temperature": 0.1}
    expect = _maps_invalid(case, mk, inputs, kw, p)

    def call(engine, t):
        # attention_rollout has one engine (plain PyTorch): its draws judge validation and dtype handling.
        return pk.attention_rollout(t["maps"], kw["residual"])
    return Built(inputs, call, expect=expect, scale=4)


@st.composite
def _st_flow_params(draw, engine):
    s = (1, 2, 3) if engine == "triton" else (1, 2, 3, 5, 8, 13)
    return {"P": draw(st.sampled_from((1, 2, 3))), "F": draw(st.sampled_from(s)), "T": draw(st.sampled_from(s)),
            "layers": draw(st.integers(0, 3)), "temperature": draw(st.sampled_from((None, 1e-3, 0.1, 1.0)))}


def _build_st_flow(case, mk):
    import pykernels as pk
    p = case["params"]
    P, F, T = p["P"], p["F"], p["T"]
    special = "logits" if p["temperature"] is not None else True
    inputs = {"cross": mk.tensor((P, F, T), positive=True, special=special),
              "temporal": [mk.tensor((P, F, F), positive=True, special=special) for _ in range(p["layers"])]}
    kw = {"temperature": p["temperature"]}
    expect = None
    inv = case.get("invalid")
    if inv == "temporal_frames":
        inputs["temporal"] = [mk.tensor((P, F + 1, F + 1), positive=True)]
        expect = ((ValueError,), "temporal_maps[0]")
    elif inv == "cross_1d":
        inputs["cross"], expect = mk.tensor((F,), positive=True), ((TypeError, ValueError), "cross_map")
    elif inv == "tau_negative":
        kw["temperature"], expect = -1.0, ((ValueError,), "temperature")
    elif inv == "cross_int":
        inputs["cross"] = (inputs["cross"] * 0).long()
        inputs["temporal"] = inputs["temporal"] or [mk.tensor((P, F, F), positive=True)]
        expect = ((TypeError,), "cross_map")
    elif inv == "temporal_dtype":
        other = torch.float64 if mk.dtype != torch.float64 else torch.float32
        inputs["temporal"] = [mk.tensor((P, F, F), positive=True, dtype=other)]
        expect = ((TypeError,), "temporal_maps[0]")

    def call(engine, t):
        if engine == "reference":
            from pykernels.reference import flow as rflow
            return rflow.st_flow(t["cross"], t["temporal"], kw["temperature"])
        return pk.st_flow(t["cross"], t["temporal"], kw["temperature"], backend=engine)
    return Built(inputs, call, expect=expect, scale=10, exact=p["temperature"] is None, norm=1.0)


@st.composite
def _max_flow_params(draw, engine):
    n = draw(st.sampled_from((1, 2, 3, 5, 8, 13)))
    return {"n": n, "e": draw(st.sampled_from((0, 1, 3, 8, 20, 40))), "queries": draw(st.integers(0, 4)),
            "scalar": draw(st.booleans()), "idx": draw(st.sampled_from(("int32", "int64"))),
            "zero_frac": draw(st.sampled_from((0.0, 0.3))), "num_nodes_given": draw(st.booleans())}


def _build_max_flow(case, mk):
    import networkx as nx
    import pykernels as pk
    p = case["params"]
    n, e = p["n"], p["e"]
    idx_dtype = getattr(torch, p["idx"])
    ei = mk.randint(0, n, (2, e)).to(idx_dtype)
    cap = mk.tensor((e,), positive=True, special=mk.values in ("huge", "denormal"))
    cap = torch.where(mk.rand(e) < p["zero_frac"], torch.zeros((), dtype=cap.dtype), cap)
    if n < 2:
        n = 2
    src = mk.randint(0, n, (max(p["queries"], 1),))
    dst = (src + mk.randint(1, n, src.shape)) % n
    if p["scalar"]:
        src, dst = int(src[0]), int(dst[0])
    inputs = {"ei": ei, "cap": cap, "s": src, "t": dst}
    kw = {"num_nodes": n if p["num_nodes_given"] else None}
    expect = None
    inv = case.get("invalid")
    if inv == "capacity_negative" and e:
        cap = cap.clone()
        cap[0] = -1.0
        inputs["cap"], expect = cap, ((ValueError,), "capacity")
    elif inv == "capacity_nan" and e:
        cap = cap.clone()
        cap[-1] = math.nan
        inputs["cap"], expect = cap, ((ValueError,), "capacity")
    elif inv == "capacity_inf" and e:
        cap = cap.clone()
        cap[-1] = math.inf
        inputs["cap"], expect = cap, ((ValueError,), "capacity")
    elif inv == "capacity_int":
        inputs["cap"], expect = (cap * 0).long(), ((TypeError,), "capacity")
    elif inv == "capacity_length":
        inputs["cap"], expect = mk.tensor((e + 1,), positive=True), ((ValueError,), "capacity")
    elif inv == "source_eq_sink":
        inputs["t"], expect = inputs["s"], ((ValueError,), "source")
    elif inv == "source_range":  # with num_nodes inferred, the queries count too: give it
        inputs["s"], kw["num_nodes"], expect = n + 3, n, ((IndexError,), "source")
    elif inv == "sink_negative":
        inputs["t"], expect = -1, ((IndexError,), "sink")
    elif inv == "num_nodes_small" and e:
        ei = ei.clone()
        ei[1, 0] = n - 1
        inputs["ei"], kw["num_nodes"], expect = ei, n - 1, ((IndexError,), "edge_index")
        inputs["s"], inputs["t"] = 0, 1 if n - 1 > 1 else 0
        if n - 1 <= 1:
            expect = ((IndexError, ValueError), "edge_index")
    elif inv == "edge_negative" and e:
        ei = ei.clone()
        ei[0, -1] = -2
        inputs["ei"], expect = ei, ((IndexError,), "edge_index")
    elif inv == "edge_float":
        inputs["ei"], expect = ei.float(), ((TypeError,), "edge_index")
    elif inv == "num_nodes_negative":
        kw["num_nodes"], expect = -1, ((ValueError,), "num_nodes")
    elif inv == "queries_length" and not p["scalar"]:
        inputs["t"], expect = torch.cat([inputs["t"], inputs["t"]]), ((ValueError,), "sinks")
    if case.get("invalid") and expect is None:  # the drawn mutation needs edges there are none of
        kw["num_nodes"], expect = -1, ((ValueError,), "num_nodes")

    def call(engine, t):
        if engine != "reference":
            return pk.max_flow(t["ei"], t["cap"], t["s"], t["t"], num_nodes=kw["num_nodes"])
        g = nx.DiGraph()
        ends = [x.reshape(-1) if isinstance(x, torch.Tensor) else torch.tensor([x]) for x in (t["ei"], t["s"], t["t"])]
        inferred = int(torch.cat([e.long() for e in ends]).max()) + 1
        g.add_nodes_from(range(kw["num_nodes"] if kw["num_nodes"] is not None else inferred))
        for (u, v), c in zip(t["ei"].long().t().tolist(), t["cap"].double().tolist()):
            if u != v:
                g.add_edge(u, v, capacity=g.get_edge_data(u, v, {"capacity": 0.0})["capacity"] + c)
        s_list = [t["s"]] if isinstance(t["s"], int) else t["s"].tolist()
        t_list = [t["t"]] if isinstance(t["t"], int) else t["t"].tolist()
        if len(s_list) == 1 and len(t_list) > 1:
            s_list = s_list * len(t_list)
        if len(t_list) == 1 and len(s_list) > 1:
            t_list = t_list * len(s_list)
        vals = torch.tensor([nx.maximum_flow_value(g, a, b) for a, b in zip(s_list, t_list)], dtype=torch.float64)
        return vals.reshape(()) if isinstance(t["s"], int) and isinstance(t["t"], int) else vals
    largest = float(cap.double().max()) if cap.numel() else 1.0
    return Built(inputs, call, expect=expect, scale=10, norm=max(largest, 1e-300) if largest > 1 else 1.0,
                 to64=lambda v: v)


def _build_max_flow_layered(case, mk):
    import pykernels as pk
    p = dict(case["params"], n=min(case["params"]["n"], 7))  # networkx's all-pairs oracle grows as n^4
    maps = [mk.tensor(tuple(p["batch"]) + (p["n"], p["n"]), positive=True, special=False)
            for _ in range(p["layers"])]
    queries = None
    if p["mode"] == "soft":  # reuse of the flow params: "soft" draws ask for listed queries
        qn = 3
        queries = (mk.randint(0, p["n"], (qn,)).tolist(), mk.randint(0, p["n"], (qn,)).tolist())
    inputs = {"maps": maps}
    kw = {"residual": p["residual"], "queries": queries}
    expect = None
    inv = case.get("invalid")
    if inv == "sources_range":
        kw["queries"], expect = ([p["n"]], [0]), ((IndexError,), "sources")
    elif inv == "sinks_negative":
        kw["queries"], expect = ([0], [-1]), ((IndexError,), "sinks")
    elif inv == "maps_negative":
        inputs["maps"] = [m - 2 for m in maps]
        expect = ((ValueError,), "maps[0]")
    elif inv == "maps_nan":
        inputs["maps"] = [m.clone() for m in maps]
        inputs["maps"][-1].view(-1)[0] = math.nan
        expect = ((ValueError,), f"maps[{len(maps) - 1}]")
    elif inv == "residual_range":
        kw["residual"], expect = -0.1, ((ValueError,), "residual")
    elif inv == "only_sources":
        kw["queries"], expect = ([0], None), ((ValueError,), "sinks")
    elif inv == "maps_int":
        inputs["maps"] = [(m * 0).long() for m in maps]
        expect = ((TypeError,), "maps[0]")

    def call(engine, t):
        q = kw["queries"]
        if engine == "reference":
            return _layered_flow_networkx(t["maps"], kw["residual"], *(q or (None, None)))
        if q is None:
            return pk.max_flow_layered(t["maps"], residual=kw["residual"])
        s = torch.tensor(q[0]) if q[0] is not None else None
        d = torch.tensor(q[1]) if q[1] is not None else None
        return pk.max_flow_layered(t["maps"], s, d, residual=kw["residual"])
    return Built(inputs, call, expect=expect, scale=10)


# --------------------------------------------------------------------------------------------- graph
@st.composite
def _graph_params(draw, engine):
    s = TINY if engine == "triton" else SIZES
    n_src, n_dst = draw(st.sampled_from(s)), draw(st.sampled_from(s))
    e = draw(st.sampled_from((0, 1, 2, 7, 13, 33, 64) if engine == "cpu" else (0, 1, 3, 7)))
    if n_src == 0 or n_dst == 0:
        e = 0
    return {"n_src": n_src, "n_dst": n_dst, "e": e, "heads": draw(st.sampled_from((None, 1, 2, 3))),
            "f": draw(st.sampled_from((1, 2, 3, 8, 17, 32) if engine == "cpu" else (1, 2, 3))),
            "idx": draw(st.sampled_from(("int32", "int64"))), "as_csr": draw(st.booleans()),
            "weight": draw(st.sampled_from(("none", "edge", "heads"))),
            "reduce": draw(st.sampled_from(("sum", "mean", "max", "min"))),
            "power_law": draw(st.sampled_from((None, 1.5)))}


def _edge_index(mk, p):
    n_src, n_dst, e = p["n_src"], p["n_dst"], p["e"]
    if p["power_law"] and n_dst and e:
        ranks = torch.arange(1, n_dst + 1, dtype=torch.float64).pow(-p["power_law"])
        target = torch.multinomial(ranks / ranks.sum(), e, replacement=True, generator=mk.g)
    else:
        target = mk.randint(0, max(n_dst, 1), (e,))
    source = mk.randint(0, max(n_src, 1), (e,))
    return torch.stack([source, target]).to(getattr(torch, p["idx"]))


def _features(mk, n, p, reduce_len=1, special=True):
    shape = (n, p["f"]) if p["heads"] is None else (n, p["heads"], p["f"])
    return mk.tensor(shape, reduce_len=reduce_len, special=special)


def _graph_invalid(case, mk, p, inputs, kw, feature):
    """Mutations every graph op shares; returns the expectation or None."""
    inv = case.get("invalid")
    ei = inputs["ei"]
    if inv == "index_out_of_range" and ei.size(1):
        ei = ei.clone()
        ei[0, ei.size(1) // 2] = max(p["n_src"], p["n_dst"]) + 5
        inputs["ei"], kw["as_csr"] = ei, False
        return (IndexError,), "edge_index"
    if inv == "index_negative" and ei.size(1):
        ei = ei.clone()
        ei[1, -1] = -1
        inputs["ei"], kw["as_csr"] = ei, False
        return (IndexError,), "edge_index"
    if inv == "edge_index_float":
        inputs["ei"], kw["as_csr"] = ei.float(), False
        return (TypeError,), "edge_index"
    if inv == "edge_index_shape":
        inputs["ei"], kw["as_csr"] = torch.cat([ei, ei[:1]]), False
        return (ValueError,), "edge_index"
    if inv == "feature_int":
        inputs[feature] = _bad_dtype(inputs[feature])
        return (TypeError,), feature
    if inv == "feature_rank":
        inputs[feature] = inputs[feature].reshape(-1)
        return (ValueError,), feature
    if inv == "feature_device":
        inputs[feature] = _other_device(inputs[feature])
        return (ValueError,), (feature, "the features", "where the graph is")
    if inv == "backend":
        kw["backend"] = "gpu-please"
        return (ValueError,), "backend"
    return None


GRAPH_INVALID = ("index_out_of_range", "index_negative", "edge_index_float", "edge_index_shape", "feature_int",
                 "feature_rank", "feature_device", "backend")


def _graph_of(t, kw, n_src, n_dst):
    from pykernels import CSR
    if kw["as_csr"]:
        return CSR.from_edge_index(t["ei"], num_nodes=(n_src, n_dst))
    return t["ei"]


def _build_spmm(case, mk):
    import pykernels as pk
    p = case["params"]
    inputs = {"ei": _edge_index(mk, p), "x": _features(mk, p["n_src"], p, reduce_len=p["e"])}
    heads = p["heads"] or 1
    inputs["w"] = {"none": None, "edge": mk.tensor((p["e"],), special=False),
                   "heads": mk.tensor((p["e"], heads), special=False) if p["heads"] else None}[p["weight"]]
    kw = {"as_csr": p["as_csr"], "reduce": p["reduce"], "backend": None, "num_targets": p["n_dst"]}
    expect = _graph_invalid(case, mk, p, inputs, kw, "x")
    inv = case.get("invalid")
    if inv == "weight_length":
        inputs["w"], expect = mk.tensor((p["e"] + 1,)), ((ValueError,), "edge_weight")
    elif inv == "weight_heads" and p["heads"]:
        inputs["w"], expect = mk.tensor((p["e"], heads + 1)), ((ValueError,), "edge_weight")
    elif inv == "reduce":
        kw["reduce"], expect = "prod", ((ValueError,), "reduce")
    elif inv == "x_rows" and p["e"]:
        inputs["x"] = _features(mk, max(0, int(inputs["ei"][0].max())), p)
        kw["as_csr"] = False
        expect = ((IndexError,), "edge_index")
    elif inv and expect is None:
        kw["reduce"], expect = "prod", ((ValueError,), "reduce")

    def call(engine, t):
        g = _graph_of(t, kw, p["n_src"], p["n_dst"])
        return pk.spmm(g, t["x"], t["w"], kw["reduce"], num_targets=kw["num_targets"],
                       backend=kw["backend"] or engine)
    return Built(inputs, call, expect=expect, scale=4, norm=_norm(mk, p["e"]), low_rule=False)


def _build_sddmm(case, mk):
    import pykernels as pk
    p = case["params"]
    # b stays plain: with both operands scaled, products overflow the dtype before the sum is formed.
    inputs = {"ei": _edge_index(mk, p), "a": _features(mk, p["n_dst"], p, reduce_len=p["f"]),
              "b": _features(mk, p["n_src"], p, special=False)}
    kw = {"as_csr": p["as_csr"], "backend": None}
    expect = _graph_invalid(case, mk, p, inputs, kw, "a")
    if case.get("invalid") == "features_differ":
        wider = (p["n_src"], p["f"] + 1) if p["heads"] is None else (p["n_src"], p["heads"], p["f"] + 1)
        inputs["b"] = mk.tensor(wider)
        expect = ((ValueError,), "b")
    elif case.get("invalid") == "b_dtype" or (case.get("invalid") and expect is None):
        other = torch.float64 if mk.dtype != torch.float64 else torch.float32
        inputs["b"], expect = inputs["b"].to(other), ((TypeError,), "b")

    def call(engine, t):
        return pk.sddmm(_graph_of(t, kw, p["n_src"], p["n_dst"]), t["a"], t["b"], backend=kw["backend"] or engine)
    return Built(inputs, call, expect=expect, scale=4, norm=_norm(mk, p["f"]) ** 2 if mk.values == "large" else 1.0,
                 low_rule=False)


def _build_edge_softmax(case, mk):
    import pykernels as pk
    p = case["params"]
    shape = (p["e"],) if p["heads"] is None else (p["e"], p["heads"])
    ei = _edge_index(mk, p)
    if not p["as_csr"]:  # an edge_index with num_targets is a square graph of num_targets nodes
        ei[0] %= max(p["n_dst"], 1)
    inputs = {"ei": ei, "s": mk.tensor(shape, special="finite")}
    kw = {"as_csr": p["as_csr"], "backend": None, "num_targets": p["n_dst"]}
    expect = _graph_invalid(case, mk, p, inputs, kw, "scores")
    inv = case.get("invalid")
    if inv == "scores_length":
        inputs["s"], expect = mk.tensor((p["e"] + 1,)), ((ValueError,), "scores")
    elif inv == "scores_int":
        inputs["s"], expect = _bad_dtype(inputs["s"]), ((TypeError,), "scores")
    elif inv == "no_num_targets":
        kw["as_csr"], kw["num_targets"], expect = False, None, ((ValueError,), "num_targets")
    elif inv and expect is None:
        inputs["s"], expect = mk.tensor((p["e"] + 2,)), ((ValueError,), "scores")

    def call(engine, t):
        g = _graph_of(t, kw, p["n_src"], p["n_dst"])
        return pk.edge_softmax(g, t["s"], num_targets=kw["num_targets"], backend=kw["backend"] or engine)
    return Built(inputs, call, expect=expect, scale=4, low_rule=False)


def _build_graph_attention(case, mk):
    import pykernels as pk
    p = case["params"]
    heads = p["heads"] or 1
    inputs = {"ei": _edge_index(mk, p), "q": _features(mk, p["n_dst"], p, special="finite_logits"),
              "k": _features(mk, p["n_src"], p, special="finite_logits"),
              "v": _features(mk, p["n_src"], p, reduce_len=p["e"], special="finite")}
    inputs["bias"] = {"none": None, "edge": mk.tensor((p["e"],)),
                      "heads": mk.tensor((p["e"], heads)) if p["heads"] else None}[p["weight"]]
    kw = {"as_csr": p["as_csr"], "backend": None, "weights": p["reduce"] in ("max", "min")}
    expect = _graph_invalid(case, mk, p, inputs, kw, "q")
    inv = case.get("invalid")
    if inv == "kv_rows":
        inputs["v"], expect = _features(mk, p["n_src"] + 1, p), ((ValueError,), "v")
    elif inv == "bias_length":
        inputs["bias"], expect = mk.tensor((p["e"] + 1,)), ((ValueError,), "edge_bias")
    elif inv == "k_dim":
        inputs["k"] = mk.tensor((p["n_src"], p["f"] + 1) if p["heads"] is None else (p["n_src"], heads, p["f"] + 1))
        expect = ((ValueError,), "k")
    elif inv == "scale_str" or (inv and expect is None):
        kw["scale"], expect = "big", ((TypeError,), "scale")

    def call(engine, t):
        g = _graph_of(t, kw, p["n_src"], p["n_dst"])
        return pk.graph_attention(g, t["q"], t["k"], t["v"], kw.get("scale"), t["bias"],
                                  return_attention_weights=kw["weights"], backend=kw["backend"] or engine)
    return Built(inputs, call, expect=expect, scale=4, norm=_norm(mk, p["e"]), low_rule=False)


@st.composite
def _scatter_params(draw, engine):
    s = TINY if engine == "triton" else SIZES
    rank = draw(st.integers(1, 3))
    shape = [draw(st.sampled_from(s)) for _ in range(rank)]
    return {"shape": shape, "dim": draw(st.integers(-rank, rank - 1)), "dim_size": draw(st.sampled_from(s)),
            "given_size": draw(st.booleans()), "reduce": draw(st.sampled_from(("sum", "mean", "max", "min"))),
            "idx": draw(st.sampled_from(("int32", "int64"))), "ties": draw(st.booleans())}


def _build_scatter(case, mk):
    import pykernels as pk
    p = case["params"]
    shape, dim = tuple(p["shape"]), p["dim"]
    length = shape[dim]
    dim_size = p["dim_size"] if length == 0 or p["dim_size"] else 1
    src = mk.tensor(shape, reduce_len=length)
    if p["ties"] and src.numel() and mk.values == "normal":
        src = src.round()  # integer values: ties in max/min, where the lowest position must win
    index = mk.randint(0, max(dim_size, 1), (length,)).to(getattr(torch, p["idx"]))
    inputs = {"src": src, "index": index}
    kw = {"dim": dim, "dim_size": dim_size if p["given_size"] else None, "reduce": p["reduce"], "backend": None}
    if not p["given_size"] and length:
        kw["dim_size"] = None
    expect = None
    inv = case.get("invalid")
    if inv == "index_range" and length:
        index = index.clone()
        index[-1] = dim_size + 2
        inputs["index"], kw["dim_size"], expect = index, dim_size, ((IndexError,), "index")
    elif inv == "index_negative" and length:
        index = index.clone()
        index[0] = -1
        inputs["index"], expect = index, ((IndexError,), "index")
    elif inv == "dim_range":
        kw["dim"], expect = len(shape), ((IndexError,), "dim")
    elif inv == "index_2d":
        inputs["index"], expect = index.view(1, -1), ((ValueError,), "index")
    elif inv == "index_float":
        inputs["index"], expect = index.float(), ((TypeError,), "index")
    elif inv == "index_length":
        inputs["index"], expect = torch.cat([index, index[:1] if length else torch.zeros(1, dtype=index.dtype)]), \
            ((ValueError,), "index")
    elif inv == "dim_size_negative":
        kw["dim_size"], expect = -3, ((ValueError,), "dim_size")
    elif inv == "reduce":
        kw["reduce"], expect = "median", ((ValueError,), "reduce")
    elif inv == "src_int":
        inputs["src"], expect = _bad_dtype(src), ((TypeError,), "src")
    elif inv == "index_device":
        inputs["index"], expect = _other_device(index), ((ValueError,), "index")
    elif inv == "dim_size_small" and length:
        index = index.clone()
        index[0] = dim_size
        inputs["index"], kw["dim_size"], expect = index, dim_size, ((IndexError,), "index")
    elif inv:
        kw["reduce"], expect = "median", ((ValueError,), "reduce")

    def call(engine, t):
        out = pk.scatter(t["src"], t["index"], kw["dim"], kw["dim_size"], kw["reduce"],
                         backend=kw["backend"] or engine)
        return tuple(out) if isinstance(out, tuple) else out
    return Built(inputs, call, expect=expect, scale=4, norm=_norm(mk, length), low_rule=False)


@st.composite
def _csr_params(draw, engine):
    p = draw(_graph_params("cpu"))
    p["transpose"] = draw(st.booleans())
    p["num_nodes"] = draw(st.sampled_from(("pair", "int", "none")))
    return p


def _build_csr(case, mk):
    from pykernels import CSR
    p = case["params"]
    ei = _edge_index(mk, p)
    n = max(p["n_src"], p["n_dst"])
    nn_arg = {"pair": (p["n_src"], p["n_dst"]), "int": n, "none": None}[p["num_nodes"]]
    inputs = {"ei": ei, "w": mk.tensor((p["e"],)) if p["weight"] != "none" else None}
    kw = {"num_nodes": nn_arg}
    expect = None
    inv = case.get("invalid")
    if inv == "num_nodes_small" and p["e"]:
        kw["num_nodes"] = (max(0, int(ei[0].max())), p["n_dst"])
        expect = ((IndexError,), "edge_index")
    elif inv == "num_nodes_negative":
        kw["num_nodes"], expect = -1, ((ValueError,), "num_nodes")
    elif inv == "num_nodes_triple":
        kw["num_nodes"], expect = (n, n, n), ((ValueError,), "num_nodes")
    elif inv == "num_nodes_float":
        kw["num_nodes"], expect = float(n), ((TypeError,), "num_nodes")
    elif inv == "weight_length":
        inputs["w"], expect = mk.tensor((p["e"] + 1,)), ((ValueError,), "edge_weight")
    elif inv == "index_negative" and p["e"]:
        ei = ei.clone()
        ei[0, 0] = -7
        inputs["ei"], expect = ei, ((IndexError,), "edge_index")
    elif inv == "edge_index_1d":
        inputs["ei"], expect = ei.reshape(-1), ((ValueError,), "edge_index")
    elif inv:
        kw["num_nodes"], expect = -1, ((ValueError,), "num_nodes")

    def call(engine, t):
        if engine == "reference":  # counting sort by target, stable in input order, written out in Python
            e_i = t["ei"].long()
            if kw["num_nodes"] is None:
                ns = nd = int(e_i.max()) + 1 if e_i.numel() else 0
            elif isinstance(kw["num_nodes"], tuple):
                ns, nd = kw["num_nodes"]
            else:
                ns = nd = kw["num_nodes"]
            order = sorted(range(e_i.size(1)), key=lambda i: (int(e_i[1, i]), i))
            perm = torch.tensor(order, dtype=torch.long)
            counts = torch.bincount(e_i[1], minlength=nd) if e_i.numel() else torch.zeros(nd, dtype=torch.long)
            rowptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            col = e_i[0][perm] if order else torch.zeros(0, dtype=torch.long)
            w = t["w"][perm] if t["w"] is not None else None
            return (rowptr, col, perm, torch.tensor([ns, nd])) + ((w,) if w is not None else ())
        csr = CSR.from_edge_index(t["ei"], num_nodes=kw["num_nodes"], edge_weight=t["w"],
                                  transpose=p["transpose"])
        out = (csr.rowptr.long(), csr.col.long(), csr.perm.long(), torch.tensor([csr.num_cols, csr.num_rows]))
        # CSR keeps per-edge values as [E, H]; an [E] weight is stored as [E, 1].
        return out + ((csr.edge_weight.reshape(-1),) if csr.edge_weight is not None else ())
    return Built(inputs, call, expect=expect, exact=True)


# --------------------------------------------------------------------------------------------- nn layers
@st.composite
def _nn_params(draw, engine):
    return {"n": draw(st.sampled_from((0, 1, 2, 5, 9))), "heads": draw(st.sampled_from((1, 2))),
            "dim": draw(st.sampled_from((4, 8))), "e": draw(st.sampled_from((0, 3, 17))),
            "flag": draw(st.booleans()), "H": draw(st.sampled_from((1, 3, 4, 6))),
            "W": draw(st.sampled_from((2, 4, 5))), "window": draw(st.sampled_from((2, 3, 7))),
            "shift": draw(st.sampled_from((0, 1))), "batch_first": draw(st.booleans())}


def _nn_builder(kind):
    def build(case, mk):
        import copy
        import pykernels.nn as pnn
        p = case["params"]
        torch.manual_seed(case["seed"])
        dim, heads = p["dim"], p["heads"]
        if kind == "MultiheadAttention":
            mod = pnn.MultiheadAttention(dim, heads, batch_first=p["batch_first"], backend="cpu")
            n = max(p["n"], 1)
            x = mk.tensor((2, n, dim) if p["batch_first"] else (n, 2, dim))
            mask = (mk.rand(2, n) < 0.3) if p["flag"] else None
            inputs = {"x": x, "mask": mask}

            def fwd(m, t):
                out, w = m(t["x"], t["x"], t["x"], key_padding_mask=t["mask"], need_weights=True)
                return out, w
        elif kind in ("GCNConv", "GATConv", "SAGEConv", "TransformerConv"):
            n = max(p["n"], 1)
            cls = getattr(pnn, kind)
            kwargs = {"heads": heads} if kind in ("GATConv", "TransformerConv") else {}
            mod = cls(dim, 4, **kwargs, backend="cpu")
            ei = mk.randint(0, n, (2, p["e"]))
            inputs = {"x": mk.tensor((n, dim)), "ei": ei}

            def fwd(m, t):
                return m(t["x"], t["ei"])
        elif kind == "WindowAttention":
            # A grid smaller than the window needs the table resized (window_attention says so): not drawn.
            mod = pnn.WindowAttention(dim, heads, window_size=p["window"])
            inputs = {"x": mk.tensor((2, max(p["H"], p["window"]), max(p["W"], p["window"]), dim))}
            shift = p["shift"] if p["window"] > 1 else 0

            def fwd(m, t):
                return m(t["x"], shift, backend=m._fuzz_backend)
        elif kind == "SwinBlock":
            mod = pnn.SwinBlock(dim, (p["H"], p["W"]), num_heads=heads, window_size=p["window"],
                                shift_size=p["shift"] if p["window"] > 1 else 0)
            inputs = {"x": mk.tensor((2, p["H"], p["W"], dim))}

            def fwd(m, t):
                return m(t["x"], backend=m._fuzz_backend)
        else:  # MSWMSA
            mod = pnn.MSWMSA(dim, heads)
            H, W = p["H"] + p["H"] % 2, p["W"] + p["W"] % 2
            inputs = {"x": mk.tensor((2, H, W, dim))}

            def fwd(m, t):
                return m(t["x"], shift=0, backend=m._fuzz_backend)
        mod = mod.to(mk.dtype).eval()
        mods = {"engine": mod}

        def call(engine, t):
            dtype = next(iter(v for v in t.values() if isinstance(v, torch.Tensor) and v.is_floating_point())).dtype
            key = (engine, dtype)
            if key not in mods:
                m = copy.deepcopy(mod).to(dtype)
                mods[key] = m
            m = mods[key]
            if hasattr(m, "backend"):
                m.backend = engine
            m._fuzz_backend = engine
            with torch.no_grad():
                return fwd(m, t)
        return Built(inputs, call, scale=16, norm=_norm(mk, 64))
    return build


def _spec(public, params, build, invalid=(), **kw):
    return OpSpec(public, params, build, tuple(invalid), **kw)


ATTN_INVALID = ("q_int", "k_dtype", "q_rank", "v_device", "heads", "head_dim", "bias_shape", "bias_int", "scale_str",
                "scale_nan", "backend")
FLOW_INVALID = ("a_int", "b_dtype", "a_1d", "inner_mismatch", "inner_zero", "batch_mismatch")
SOFT_INVALID = FLOW_INVALID + ("tau_zero", "tau_negative", "tau_nan", "tau_inf", "tau_tensor")
MAPS_INVALID = ("residual_range", "maps_empty", "maps_chain", "maps_int", "maps_dtype_mixed", "maps_1d")
CPU_ONLY = ("cpu",)
NN_BUDGET = {"cpu": 24}

OPS = {
    "fused_attention": _spec("pykernels.fused_attention", _attention_params, _build_attention, ATTN_INVALID,
                             budget={"cpu": 360, "triton": 12}, known=C1),
    "window_attention": _spec("pykernels.window_attention", _window_params, _build_window,
                              ("window_zero", "window_float", "shift_ge_window", "shift_negative", "spatial_mismatch",
                               "bias_shape", "pad_kv_shape", "scale_str", "k_shape", "q_int"),
                              budget={"cpu": 300, "triton": 10}, known=C1M1),
    "msw_msa": _spec("pykernels.msw_msa", _msw_params, _build_msw,
                     ("shift_ge_window", "shift_negative", "spatial_mismatch", "spatial_zero"),
                     budget={"cpu": 150, "triton": 6}, known=C1),
    "neighborhood_attention_2d": _spec("pykernels.neighborhood_attention_2d", _na_params, _build_na,
                                       ("kernel_even", "kernel_larger_than_map", "dilation_zero", "kernel_negative",
                                        "rpb_shape", "spatial_mismatch", "v_tokens"),
                                       budget={"cpu": 300, "triton": 10}, known=C1M1),
    "maxmin_matmul": _spec("pykernels.maxmin_matmul", _maxmin_params, _build_maxmin, FLOW_INVALID,
                           budget={"cpu": 300, "triton": 10}),
    "soft_maxmin_matmul": _spec("pykernels.soft_maxmin_matmul", _maxmin_params,
                                lambda c, m: _build_maxmin(c, m, soft=True), SOFT_INVALID,
                                budget={"cpu": 300, "triton": 10}, known=C2),
    "attention_flow": _spec("pykernels.attention_flow", _flow_params, _build_flow,
                            MAPS_INVALID + ("mode", "tau_zero", "exact_negative"), budget={"cpu": 180, "triton": 6},
                            known=C2),
    "attention_rollout": _spec("pykernels.attention_rollout", _flow_params, _build_rollout, MAPS_INVALID,
                               engines=("reference",), budget={"reference": 120}),
    "st_flow": _spec("pykernels.st_flow", _st_flow_params, _build_st_flow,
                     ("temporal_frames", "cross_1d", "tau_negative", "cross_int", "temporal_dtype"),
                     budget={"cpu": 180, "triton": 6}, known=C2),
    "max_flow": _spec("pykernels.max_flow", _max_flow_params, _build_max_flow,
                      ("capacity_negative", "capacity_nan", "capacity_inf", "capacity_int", "capacity_length",
                       "source_eq_sink", "source_range", "sink_negative", "num_nodes_small", "edge_negative",
                       "edge_float", "num_nodes_negative", "queries_length"),
                      engines=CPU_ONLY, values=("normal", "huge", "denormal"), dtypes=("float32", "float64"),
                      budget={"cpu": 180}),
    "max_flow_layered": _spec("pykernels.max_flow_layered", _flow_params, _build_max_flow_layered,
                              ("sources_range", "sinks_negative", "maps_negative", "maps_nan", "residual_range",
                               "only_sources", "maps_int"),
                              engines=CPU_ONLY, values=("normal",), budget={"cpu": 120}),
    "CSR.from_edge_index": _spec("pykernels.CSR.from_edge_index", _csr_params, _build_csr,
                                 ("num_nodes_small", "num_nodes_negative", "num_nodes_triple", "num_nodes_float",
                                  "weight_length", "index_negative", "edge_index_1d"),
                                 engines=CPU_ONLY, values=("normal",), budget={"cpu": 180}),
    "scatter": _spec("pykernels.scatter", _scatter_params, _build_scatter,
                     ("index_range", "index_negative", "dim_range", "index_2d", "index_float", "index_length",
                      "dim_size_negative", "reduce", "src_int", "index_device", "dim_size_small"),
                     budget={"cpu": 360, "triton": 10}),
    "spmm": _spec("pykernels.spmm", _graph_params, _build_spmm,
                  GRAPH_INVALID + ("weight_length", "weight_heads", "reduce", "x_rows"),
                  budget={"cpu": 360, "triton": 10}),
    "sddmm": _spec("pykernels.sddmm", _graph_params, _build_sddmm, GRAPH_INVALID + ("features_differ", "b_dtype"),
                   budget={"cpu": 240, "triton": 8}),
    "edge_softmax": _spec("pykernels.edge_softmax", _graph_params, _build_edge_softmax,
                          tuple(x for x in GRAPH_INVALID if not x.startswith("feature"))
                          + ("scores_length", "scores_int", "no_num_targets"), budget={"cpu": 240, "triton": 8}),
    "graph_attention": _spec("pykernels.graph_attention", _graph_params, _build_graph_attention,
                             GRAPH_INVALID + ("kv_rows", "bias_length", "k_dim", "scale_str"),
                             budget={"cpu": 300, "triton": 8}, known=C3),
}
for _layer in ("MultiheadAttention", "GCNConv", "GATConv", "SAGEConv", "TransformerConv", "WindowAttention",
               "SwinBlock", "MSWMSA"):
    OPS[f"nn.{_layer}"] = _spec(f"pykernels.nn.{_layer}", _nn_params, _nn_builder(_layer), engines=CPU_ONLY,
                                values=("normal", "large"), layouts=("contiguous",),
                                dtypes=("float32", "float64"), budget=NN_BUDGET)


def _build_harness_check(case, mk):
    """Cases that kill or stall the worker, for the runner's own test (never drawn by the fuzzer)."""
    import os
    import time

    def call(engine, t):
        if case["params"]["kind"] == "abort":
            os.abort()
        time.sleep(3600)
    return Built({}, call)


HARNESS_CHECKS = {"harness.check": _spec("harness.check", None, _build_harness_check, engines=())}
