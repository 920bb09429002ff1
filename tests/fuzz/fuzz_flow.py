"""Fuzz entries of the flow family: the (max, min) products, attention flow and rollout, st_flow and max-flow."""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from fuzz_core import Built
from fuzz_spec import _bad_dtype, _norm, _sizes


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
    # T1, Triton's interpreter: its bfloat16 -> float32 cast gets subnormals wrong (pinned in
    # test_fuzz_regressions), so the interpreted engine's denormal draws are held to the tolerance instead.
    exact = not soft and not (case["engine"] == "triton" and mk.values == "denormal" and mk.dtype == torch.bfloat16)
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
        inputs["maps"] = [-(m.abs() + 1) for m in inputs["maps"]]
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
