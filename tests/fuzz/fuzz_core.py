"""The fuzz harness's plain-data cases and their oracle (runs inside the worker process).

A case is a JSON-able dict: ``op``, ``engine``, ``seed``, ``dtype``, ``layout``, ``values`` (which special
values the float inputs carry), ``params`` (the op's own draw) and ``invalid`` (None, or the name of one
mutation that makes the call invalid). :func:`run_case` rebuilds every tensor from the seed, so a printed case
reproduces exactly: ``python tests/fuzz/fuzz_core.py '<case json>'``.

Oracle. A valid case runs the op on ``engine`` and on the reference engine with float64 copies of the inputs,
and the two must agree within the test suite's tolerances (:mod:`pykernels.testing`: ``TOLERANCES`` scaled
as the op's own tests scale them for float32/float64; float16/bfloat16 by ``assert_low_precision_error``
against the reference run in the same low dtype). NaN semantics: with NaN or infinite inputs, an output
element must be non-finite exactly where the float64 reference's is (NaN and ±inf are not told apart: the
order of an engine's reductions decides which of the two an inf - inf becomes) and close elsewhere. An
invalid case must raise the exception type the op documents, with a message naming the op
(``pykernels.<op>``) and the argument at fault.
"""
from __future__ import annotations

import json
import math
import re
import sys
import traceback

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
LOW = (torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "transposed", "strided", "sliced", "expanded", "channels_last")
VALUES = ("normal", "nan", "inf", "huge", "large", "denormal")


class Mismatch(AssertionError):
    pass


# --------------------------------------------------------------------------------------------- tensors
class Maker:
    """Builds the float inputs of one case from its seed, values class and layout."""

    def __init__(self, case):
        self.g = torch.Generator().manual_seed(case["seed"])
        self.dtype = DTYPES[case["dtype"]]
        self.values = case.get("values", "normal")
        self.layout = case.get("layout", "contiguous")

    def randint(self, lo, hi, shape=()):
        return torch.randint(lo, hi, shape, generator=self.g)

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.g, dtype=torch.float64)

    def magnitude(self, reduce_len: int = 1) -> float:
        """The factor the ``huge``/``large``/``denormal`` classes scale values by; chosen so no sum over
        ``reduce_len`` terms overflows the dtype (overflow is the dtype's limit, not an op's defect)."""
        fi = torch.finfo(self.dtype)
        if self.values == "huge":
            return fi.max / (64.0 * max(reduce_len, 1))
        if self.values == "large":
            return {torch.float16: 30.0, torch.bfloat16: 100.0}.get(self.dtype, 1e3)
        if self.values == "denormal":
            return fi.tiny / 8
        return 1.0

    def tensor(self, shape, *, special=True, positive=False, reduce_len=1, layout=True, dtype=None):
        """A float tensor of ``shape`` holding the case's special values where ``special`` allows them:
        True (all), ``"finite"`` (huge, large, denormal: values whose NaN-free meaning every formulation
        shares), ``"logits"`` (inputs of an exponential: all but huge, which becomes large, since any
        huge logit overflows) or ``"finite_logits"`` (both restrictions). Values lie in [0, 1) with
        ``positive``."""
        dtype = dtype or self.dtype
        values = self.values
        if special in ("logits", "finite_logits") and values == "huge":
            values = "large"
        if special in ("finite", "finite_logits") and values in ("nan", "inf"):
            special = False
        x = self.rand(*shape) if positive else torch.randn(*shape, generator=self.g, dtype=torch.float64)
        if special and values in ("huge", "large", "denormal"):
            saved, self.values = self.values, values
            x = x * self.magnitude(reduce_len)
            self.values = saved
        x = x.to(dtype)
        if special and values in ("nan", "inf") and x.numel():
            count = int(self.randint(1, max(2, x.numel() // 8) + 1))
            flat = x.view(-1)
            where = self.randint(0, x.numel(), (count,))
            if self.values == "nan":
                flat[where] = float("nan")
            else:
                # Non-negative inputs (attention maps, capacities) get +inf only: -inf is out of their domain.
                sign = torch.where(self.rand(count) < 0.5, -1.0, 1.0) if not positive else torch.ones(count)
                flat[where] = (sign * math.inf).to(dtype)
        return self.lay_out(x) if layout else x

    def lay_out(self, x: torch.Tensor) -> torch.Tensor:
        """The same values in the case's memory layout; padding reads as NaN, so an engine reading outside
        the view shows it."""
        layout = self.layout
        if x.dim() == 0 or x.numel() == 0:
            return x
        if layout == "channels_last" and x.dim() != 4:
            layout = "transposed"
        if layout == "transposed" and x.dim() >= 2:
            return x.transpose(-1, -2).contiguous().transpose(-1, -2)
        if layout == "channels_last":
            return x.contiguous(memory_format=torch.channels_last)
        if layout in ("strided", "sliced"):
            last = x.size(-1)
            fill = float("nan") if x.is_floating_point() else -(2 ** 30)
            wide = (2 * last) if layout == "strided" else (last + 3)
            z = torch.full(x.shape[:-1] + (wide,), fill, dtype=x.dtype)
            view = z[..., ::2] if layout == "strided" else z[..., 1:last + 1]
            view.copy_(x)
            return view
        if layout == "expanded" and x.size(0) > 1:
            return x[:1].expand_as(x)
        return x


def _names_arg(message: str, arg: str) -> bool:
    return re.search(r"(?<![A-Za-z0-9_])" + re.escape(arg) + r"(?![A-Za-z0-9_])", message) is not None


# --------------------------------------------------------------------------------------------- oracle
def _nonfinite_pattern(out: torch.Tensor, ref: torch.Tensor, name: str):
    bad = (~torch.isfinite(out.double())) != (~torch.isfinite(ref.double()))
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise Mismatch(f"{name}: non-finite pattern differs from the reference at {i}: got "
                       f"{out.double()[tuple(i)].item()}, reference {ref.double()[tuple(i)].item()}")


def compare(name, out, ref, eager, dtype, scale, exact=False, norm=1.0, low_rule=True):
    """``out`` (engine, ``dtype``) against ``ref`` (float64 reference) and, for float16/bfloat16 with
    ``low_rule`` (the attention and flow tests' rule), ``eager`` (the reference run in ``dtype``); without it
    every dtype is held to ``TOLERANCES`` (the graph tests' rule)."""
    from pykernels.testing import TOLERANCES, assert_close, assert_low_precision_error
    if out.shape != ref.shape:
        raise Mismatch(f"{name}: shape {list(out.shape)}, reference {list(ref.shape)}")
    if not out.is_floating_point():
        if not torch.equal(out.cpu(), ref.cpu()):
            raise Mismatch(f"{name}: integer output differs from the reference: {out} vs {ref}")
        return
    # The true result rounded to the output's dtype: a value past the dtype's range is inf there too.
    ref = torch.where(torch.isfinite(ref.double()), ref.double().to(out.dtype).double(), ref.double())
    _nonfinite_pattern(out, ref, name)
    fin = torch.isfinite(ref)
    o, r = out.double()[fin] / norm, ref.double()[fin] / norm
    if exact:
        r = ref[fin].to(out.dtype).double() / norm
        if not torch.equal(o, r):
            raise Mismatch(f"{name}: not bitwise equal to the reference; max diff {(o - r).abs().max().item()}")
        return
    try:
        if dtype in LOW and low_rule:
            e = eager.double()[fin] / norm
            # The flow tests' slack for float16/bfloat16: where eager is exact, one rounding step of the dtype.
            assert_low_precision_error(o, r, e, atol=TOLERANCES[dtype][0], msg=name)
        else:
            assert_close(o, r, dtype, scale=scale, msg=name)
    except AssertionError as exc:
        raise Mismatch(str(exc)) from None


def run_case(case: dict) -> dict:
    """Runs one case; returns ``{"status": ..., "detail": ...}`` (``ok`` or what failed)."""
    from fuzz_ops import HARNESS_CHECKS, OPS
    spec = {**OPS, **HARNESS_CHECKS}[case["op"]]
    torch.manual_seed(case["seed"])
    try:
        built = spec.build(case, Maker(case))
    except Exception:  # a builder bug, not an op defect: report it as such
        return {"status": "harness-error", "detail": traceback.format_exc(limit=4)}
    engine = case["engine"]
    if case.get("invalid"):
        types, arg = built.expect
        try:
            built.call(engine, built.inputs)
        except Exception as exc:  # noqa: BLE001 - the type is what is judged
            message = str(exc)
            if not isinstance(exc, types):
                return {"status": "wrong-exception", "detail": f"{type(exc).__name__}: {message} (expected "
                        f"{'/'.join(t.__name__ for t in types)} naming {spec.public!r} and {arg!r})"}
            args = (arg,) if isinstance(arg, str) else arg  # alternatives: the message may name any one
            if spec.public not in message or not any(_names_arg(message, a) for a in args):
                return {"status": "unclear-error", "detail": f"{type(exc).__name__}: {message} (should name "
                        f"{spec.public!r} and {arg!r})"}
            return {"status": "ok", "detail": "raised"}
        return {"status": "no-error", "detail": f"accepted invalid input ({case['invalid']}); expected "
                f"{'/'.join(t.__name__ for t in types)} naming {arg!r}"}
    try:
        out = built.call(engine, built.inputs)
    except Exception as exc:  # noqa: BLE001
        return {"status": "raised-on-valid", "detail": f"{type(exc).__name__}: {exc}\n"
                + traceback.format_exc(limit=-3)}
    failure = _judge(case, built, out)
    if failure is None:
        return {"status": "ok", "detail": "matched"}
    # A mismatch that the reference reproduces once it is given a known engine defect's semantics is that
    # defect (reported, with its own regression test), not a new finding; anything else fails the draw.
    # Element by element, the output must match the reference under its plain semantics or the defect's.
    for label, (engines, semantics) in spec.known.items():
        if engine in engines:
            with semantics():
                alt = _references(case, built)
            if _judge(case, built, out, alt) is None:
                return {"status": "ok", "detail": f"known defect {label}", "known": label}
    return {"status": "mismatch", "detail": failure}


def _references(case, built):
    ref64 = built.call("reference", {k: built.to64(v) for k, v in built.inputs.items()})
    eager = built.call("reference", built.inputs) if DTYPES[case["dtype"]] in LOW else None
    return ref64, eager


def _merge(out, plain, alt):
    """The reference each element of ``out`` follows: ``alt``'s where only it has ``out``'s finiteness, or
    where both have it and ``alt`` is the closer."""
    if plain is None or alt is None or not out.is_floating_point():
        return plain
    o, p, a = out.double(), plain.double(), alt.double()
    fin_o = torch.isfinite(o)
    p_ok, a_ok = fin_o == torch.isfinite(p), fin_o == torch.isfinite(a)
    closer = ((o - a).abs().nan_to_num(math.inf) < (o - p).abs().nan_to_num(math.inf)) & fin_o
    return torch.where((~p_ok & a_ok) | (p_ok & a_ok & closer), a, p)


def _judge(case, built, out, alt=None):
    """None when ``out`` matches the reference (or, element by element, ``alt``), else what differs."""
    ref64, eager = _references(case, built)
    dtype = DTYPES[case["dtype"]]
    outs, refs = _tuple(out), _tuple(ref64)
    eagers = _tuple(eager) if eager is not None else [None] * len(outs)
    if alt is not None:
        refs = [_merge(o, r, a) for o, r, a in zip(outs, refs, _tuple(alt[0]))]
        if eager is not None:
            eagers = [_merge(o, r, a) for o, r, a in zip(outs, eagers, _tuple(alt[1]))]
    if len(outs) != len(refs):
        return f"{len(outs)} outputs, reference {len(refs)}"
    try:
        for i, (o, r, e) in enumerate(zip(outs, refs, eagers)):
            compare(f"output {i}", o, r, e, dtype, built.scale, exact=built.exact and o.is_floating_point(),
                    norm=built.norm, low_rule=built.low_rule)
    except Mismatch as exc:
        return str(exc)
    return None


def _tuple(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


class Built:
    """What a builder returns: the inputs, how to call the op, and how to judge it."""

    def __init__(self, inputs, call, *, expect=None, scale=1.0, exact=False, norm=1.0, to64=None, low_rule=True):
        self.inputs, self.call, self.expect, self.low_rule = inputs, call, expect, low_rule
        self.scale, self.exact, self.norm = scale, exact, norm
        self._to64 = to64

    def to64(self, value):
        if self._to64 is not None:
            return self._to64(value)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().double()
        if isinstance(value, (list, tuple)):
            return type(value)(self.to64(v) for v in value)
        return value


if __name__ == "__main__":
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    print(run_case(json.loads(sys.argv[1])))
