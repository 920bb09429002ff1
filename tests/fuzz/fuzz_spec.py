"""What every op's fuzz entry is made of: the OpSpec, the case strategy around an op's own draw, shared
sizes and helpers. An OpSpec's ``known`` engine defects, each given as the semantics the reference is given to
reproduce it, are empty today: C1, C2, C3 and M1 are fixed and every engine is checked strictly.
"""
from __future__ import annotations

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
