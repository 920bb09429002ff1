"""Fuzz entries of the graph family: CSR, scatter, spmm, sddmm, edge_softmax, graph_attention."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from fuzz_core import Built
from fuzz_spec import SIZES, TINY, _bad_dtype, _norm, _other_device


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
