"""``python -m pykernels selftest``: every public op on every engine this process can run on a device, forward
and backward, over dtypes and two shape sizes, against the plain-PyTorch reference.

The first command to run on a new machine (above all a GPU one): it says in a table whether each engine
computes what the reference does, with the error against the tolerance, and exits non-zero on any failure.
Tolerances are the test suite's (:mod:`pykernels.testing`): float32/float64 against ``TOLERANCES``, float16
and bfloat16 by FlashAttention's rule (at most twice the error of the reference computed in that dtype).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import torch

import pykernels as pk

from .testing import TOLERANCES, engines_for, random_graph

LOW_PRECISION = (torch.float16, torch.bfloat16)
LOW_PRECISION_FACTOR, LOW_PRECISION_ATOL = 2.0, 1e-3
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Case:
    """One op call: ``make(size, generator)`` returns float64 CPU inputs (those that get gradients first, then
    the rest) and ``run(*inputs, backend=...)`` computes the op on them, returning a tensor or a tuple."""

    family: str
    name: str
    make: Callable[[str, torch.Generator], tuple[list[torch.Tensor], list]]
    run: Callable[..., object]
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _graph_inputs(size, g, *feature_shapes):
    nodes, edges = (37, 150) if size == "small" else (1500, 12000)
    edge_index = random_graph(nodes, edges, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
    return [_randn(g, nodes, *shape) for shape in feature_shapes], edge_index, edges


def _spmm_case(reduce):
    def make(size, g):
        (x,), edge_index, edges = _graph_inputs(size, g, (2, 5) if size == "small" else (4, 32))
        weight = _randn(g, edges, x.shape[1]).abs() if reduce == "sum" else None
        return ([x, weight] if weight is not None else [x]), [edge_index]

    def run(x, *rest, backend):
        weight, edge_index = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
        return pk.spmm(edge_index, x, weight, reduce=reduce, backend=backend)

    return Case("graph", f"spmm {reduce}", make, run)


def _sddmm_make(size, g):
    (a, b), edge_index, _ = _graph_inputs(size, g, *([(2, 5)] * 2 if size == "small" else [(4, 32)] * 2))
    return [a, b], [edge_index]


def _edge_softmax_make(size, g):
    _, edge_index, edges = _graph_inputs(size, g)
    return [_randn(g, edges, 3)], [edge_index, int(edge_index[1].max()) + 1]


def _graph_attention_make(size, g):
    heads, dim = (2, 8) if size == "small" else (4, 32)
    (q, k, v), edge_index, edges = _graph_inputs(size, g, *[(heads, dim)] * 3)
    return [q, k, v, _randn(g, edges, heads)], [edge_index]


def _scatter_case(reduce):
    def make(size, g):
        items, groups, feats = (150, 20, 6) if size == "small" else (20000, 700, 64)
        return [_randn(g, items, feats)], [torch.randint(0, groups, (items,), generator=g), groups]

    def run(src, index, groups, *, backend):
        return pk.scatter(src, index, 0, groups, reduce=reduce, backend=backend)

    return Case("graph", f"scatter {reduce}", make, run)


def _attention_case(name, causal=False, bias=False, attn_map=False):
    def make(size, g):
        b, h, hkv, nq, nk, d = (2, 4, 2, 33, 47, 40) if size == "small" else (2, 8, 4, 300, 257, 64)
        if causal:
            nk = nq
        inputs = [_randn(g, b, h, nq, d), _randn(g, b, hkv, nk, d), _randn(g, b, hkv, nk, d)]
        if bias:
            inputs.append(_randn(g, b, 1, nq, nk))
        return inputs, []

    def run(q, k, v, attn_bias=None, *, backend):
        return pk.fused_attention(q, k, v, attn_bias=attn_bias, causal=causal, return_attn_mean=attn_map,
                                  backend=backend)

    return Case("attention", name, make, run)


def _window_make(size, g):
    b, heads, (hh, ww), d, window = (1, 2, (9, 10), 16, 4) if size == "small" else (2, 3, (28, 30), 32, 7)
    qkv = [_randn(g, b, heads, hh * ww, d) for _ in range(3)]
    table = _randn(g, (2 * window - 1) ** 2, heads)
    return [*qkv, table], [(hh, ww), window, window // 2]


def _window_run(q, k, v, table, spatial_shape, window, shift, *, backend):
    return pk.window_attention(q, k, v, spatial_shape, window, shift, rel_pos_bias=table, backend=backend)


def _msw_msa_make(size, g):
    b, heads, (hh, ww), d = (1, 2, (8, 10), 16) if size == "small" else (2, 4, (32, 32), 40)
    return [_randn(g, b, heads, hh * ww, d) for _ in range(3)], [(hh, ww)]


def _msw_msa_run(q, k, v, spatial_shape, *, backend):
    return pk.msw_msa(q, k, v, spatial_shape, shift=(spatial_shape[0] // 8, spatial_shape[1] // 8), backend=backend)


def _neighborhood_make(size, g):
    b, heads, (hh, ww), d, kernel, dilation = (1, 2, (9, 11), 16, 5, 1) if size == "small" else (2, 4, (30, 28), 32, 7, 2)
    qkv = [_randn(g, b, heads, hh * ww, d) for _ in range(3)]
    return [*qkv, _randn(g, heads, 2 * kernel - 1, 2 * kernel - 1)], [(hh, ww), kernel, dilation]


def _neighborhood_run(q, k, v, rpb, spatial_shape, kernel, dilation, *, backend):
    return pk.neighborhood_attention_2d(q, k, v, spatial_shape, kernel, dilation, rel_pos_bias=rpb, backend=backend)


def _maxmin_make(size, g):
    batch, m, k, n = (3, 9, 11, 13) if size == "small" else (16, 77, 64, 90)
    return [torch.rand(batch, m, k, generator=g, dtype=torch.float64),
            torch.rand(k, n, generator=g, dtype=torch.float64)], []


CASES = (
    _spmm_case("sum"), _spmm_case("mean"), _spmm_case("max"), _spmm_case("min"),
    Case("graph", "sddmm", _sddmm_make, lambda a, b, ei, *, backend: pk.sddmm(ei, a, b, backend=backend)),
    Case("graph", "edge_softmax", _edge_softmax_make,
         lambda s, ei, n, *, backend: pk.edge_softmax(ei, s, num_targets=n, backend=backend)),
    Case("graph", "graph_attention", _graph_attention_make,
         lambda q, k, v, bias, ei, *, backend: pk.graph_attention(ei, q, k, v, edge_bias=bias, backend=backend)),
    _scatter_case("sum"), _scatter_case("max"),
    _attention_case("fused_attention GQA"),
    _attention_case("fused_attention causal", causal=True),
    _attention_case("fused_attention bias", bias=True),
    _attention_case("fused_attention head-mean map", attn_map=True),
    Case("window", "window_attention shifted", _window_make, _window_run),
    Case("window", "msw_msa", _msw_msa_make, _msw_msa_run),
    Case("window", "neighborhood_attention_2d", _neighborhood_make, _neighborhood_run),
    Case("flow", "maxmin_matmul", _maxmin_make, lambda a, b, *, backend: pk.maxmin_matmul(a, b, backend=backend)),
    Case("flow", "soft_maxmin_matmul", _maxmin_make,
         lambda a, b, *, backend: pk.soft_maxmin_matmul(a, b, 0.1, backend=backend)),
)


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _forward_backward(case, grad_inputs, rest, backend, cotangent_seed):
    """The op's floating outputs and the gradients of its differentiable inputs under fixed cotangents."""
    grad_inputs = [t.detach().requires_grad_() for t in grad_inputs]
    outs = _as_tuple(case.run(*grad_inputs, *rest, backend=backend))
    floats = [o for o in outs if o.is_floating_point()]
    g = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in floats]
    grads = torch.autograd.grad(floats, grad_inputs, cotangents, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(grad_inputs, grads)]
    return [o.detach() for o in outs], grads


def _max_abs_error(actual, expected):
    if actual.numel() == 0:
        return 0.0
    diff = (actual.double().cpu() - expected.double().cpu()).abs()
    both_nan = actual.double().cpu().isnan() & expected.double().cpu().isnan()
    return diff.masked_fill(both_nan, 0.0).nan_to_num(math.inf).max().item()


def _error_ratio(actual, expected, eager, dtype):
    """Error of ``actual`` against ``expected`` as a fraction of what is allowed (<= 1 passes)."""
    if not actual.is_floating_point():
        return 0.0 if torch.equal(actual.cpu(), expected.cpu()) else math.inf
    if dtype in LOW_PRECISION:
        allowed = LOW_PRECISION_FACTOR * _max_abs_error(eager, expected) + LOW_PRECISION_ATOL
        return _max_abs_error(actual, expected) / allowed
    atol, rtol = TOLERANCES[dtype]
    if actual.numel() == 0:
        return 0.0
    a, e = actual.double().cpu(), expected.double().cpu()
    ratio = (a - e).abs() / (atol + rtol * e.abs())
    return ratio.masked_fill(a.isnan() & e.isnan(), 0.0).nan_to_num(math.inf).max().item()


@dataclasses.dataclass
class Row:
    family: str
    case: str
    size: str
    dtype: str
    engine: str
    forward: float
    backward: float
    seconds: float
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.forward <= 1.0 and self.backward <= 1.0


def run_case(case, size, dtype, engine, device, seed=0) -> Row:
    g = torch.Generator().manual_seed(seed)
    grad_inputs, rest = case.make(size, g)
    rest = [r.to(device) if isinstance(r, torch.Tensor) else r for r in rest]
    start = time.perf_counter()
    row = Row(case.family, case.name, size, str(dtype).removeprefix("torch."), engine, math.inf, math.inf, 0.0)
    try:
        rounded = [t.to(dtype) for t in grad_inputs]
        outs, grads = _forward_backward(case, [t.to(device) for t in rounded], rest, engine, seed + 1)
        ref_outs, ref_grads = _forward_backward(case, [t.double() for t in rounded], rest, "reference", seed + 1)
        eager_outs, eager_grads = (_forward_backward(case, rounded, [r.cpu() if isinstance(r, torch.Tensor) else r
                                                                     for r in rest], "reference", seed + 1)
                                   if dtype in LOW_PRECISION else (ref_outs, ref_grads))
        row.forward = max((_error_ratio(a, e, x, dtype) for a, e, x in zip(outs, ref_outs, eager_outs)), default=0.0)
        row.backward = max((_error_ratio(a, e, x, dtype) for a, e, x in zip(grads, ref_grads, eager_grads)),
                           default=0.0)
    except Exception as exc:  # a selftest reports every failure as a row instead of stopping at the first
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row.seconds = time.perf_counter() - start
    return row


def selftest(device="cpu", engines=None, sizes=("small", "medium"), dtypes=None, families=None,
             progress: Callable[[Row], None] | None = None) -> list[Row]:
    """Runs every case on every engine available on ``device`` (minus ``reference``) and returns the rows."""
    device = torch.device(device)
    engines = [e for e in (engines or engines_for(device)) if e != "reference" and e in engines_for(device)]
    rows = []
    for case in CASES:
        if families and case.family not in families:
            continue
        for size in sizes:
            for dtype in case.dtypes:
                if dtypes and dtype not in dtypes:
                    continue
                for engine in engines:
                    row = run_case(case, size, dtype, engine, device)
                    rows.append(row)
                    if progress:
                        progress(row)
    return rows


def _ratio_text(value: float) -> str:
    return "—" if math.isinf(value) else f"{value:.3f}"


def format_rows(rows: list[Row]) -> str:
    header = ("family", "case", "size", "dtype", "engine", "fwd err/tol", "bwd err/tol", "s", "verdict")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        verdict = "ok" if r.passed else ("FAIL " + r.error if r.error else "FAIL")
        lines.append(f"| {r.family} | {r.case} | {r.size} | {r.dtype} | {r.engine} | {_ratio_text(r.forward)} | "
                     f"{_ratio_text(r.backward)} | {r.seconds:.2f} | {verdict} |")
    return "\n".join(lines)


def verdict(rows: list[Row], device) -> str:
    failed = [r for r in rows if not r.passed]
    engines = sorted({r.engine for r in rows})
    if not rows:
        return f"selftest on {device}: no engine to test"
    if failed:
        return (f"selftest on {device}: FAILED {len(failed)} of {len(rows)} (engines {', '.join(engines)}; first: "
                f"{failed[0].case} {failed[0].dtype} {failed[0].engine})")
    return f"selftest on {device}: all {len(rows)} passed (engines {', '.join(engines)})"
