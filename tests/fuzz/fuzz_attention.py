"""Fuzz entries of the attention family: fused_attention, window_attention, msw_msa, neighborhood_attention_2d."""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from fuzz_core import Built
from fuzz_spec import _bad_dtype, _dims, _norm, _other_device, _sizes


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
