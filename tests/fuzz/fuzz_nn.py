"""Fuzz entries of the nn layers: each runs on the CPU engine against a copy of itself on the reference engine."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from fuzz_core import Built
from fuzz_spec import _norm


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
