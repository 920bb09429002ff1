"""What every op's fuzz entry is made of: the OpSpec, the case strategy around an op's own draw, shared
sizes and helpers, and the known engine defects, each as the semantics the reference is given to reproduce it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from fuzz_core import DTYPES, LAYOUTS, VALUES

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
# window is -inf (a -inf relative-position bias, or a key of ±inf) outputs 0, fused_attention's rule for a fully
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
