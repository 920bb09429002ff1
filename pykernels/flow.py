"""Attention flow: fused (max, min) matrix products, attention rollout and flow, Vico's ST-Flow, exact max-flow.

Attention maps use the usual layout: ``A[..., i, j]`` is how much receiving token ``i`` attends to sending
token ``j``. The products never build the ``[..., m, k, n]`` tensor that the broadcast formulation needs:
they stream over ``k`` and keep ``O(m n)`` state for the backward.
"""
from __future__ import annotations

import math

import torch

from . import _backend, _flow_ops  # noqa: F401  (_flow_ops registers fake kernels and autograd)
from ._checks import FLOAT_DTYPES
from ._max_flow import _check_capacities, max_flow, max_flow_layered
from .reference import flow as ref

__all__ = ["attention_flow", "attention_rollout", "max_flow", "max_flow_layered", "maxmin_matmul",
           "soft_maxmin_matmul", "st_flow"]


def _check_operands(op: str, a, b):
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{op}: {name} must have at least 2 dimensions [..., rows, cols], got {list(t.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"{op}: a is {a.dtype} but b is {b.dtype}")
    if b.device != a.device:
        raise ValueError(f"{op}: a is on {a.device} but b is on {b.device}")
    if a.size(-1) != b.size(-2):
        raise ValueError(f"{op}: inner sizes differ: a is {list(a.shape)} (k = {a.size(-1)}), b is "
                         f"{list(b.shape)} (k = {b.size(-2)})")
    if a.size(-1) == 0:
        raise ValueError(f"{op}: the inner size k must be at least 1 (a max over no terms is undefined)")
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(f"{op}: batch dimensions {list(a.shape[:-2])} and {list(b.shape[:-2])} do not "
                         "broadcast") from None
    return batch


def _batched(t: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """``t`` as ``[batch, rows, cols]``; a broadcast batch stays a stride-0 view of a contiguous matrix."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t.expand(*batch, t.size(-2), t.size(-1)).reshape(math.prod(batch), t.size(-2), t.size(-1))


def _engine(op: str, backend: str, device: torch.device):
    engine = _backend.select(op, backend, device)
    return engine, (getattr(torch.ops, _backend.namespace(engine, device)) if engine != "reference" else None)


def maxmin_matmul(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """The (max, min) product ``c[..., i, j] = max_k min(a[..., i, k], b[..., k, j])``.

    Batch dimensions broadcast as in ``torch.matmul``; ``a`` is ``[..., m, k]``, ``b`` ``[..., k, n]``. The
    value is bitwise that of the broadcast formula. The gradient of ``c[i, j]`` goes to a single element: at
    the lowest maximising ``k*``, to ``a[i, k*]`` if ``a[i, k*] <= b[k*, j]`` (ties go to ``a``), else to
    ``b[k*, j]``. NaN in row ``i`` of ``a`` or column ``j`` of ``b`` makes ``c[i, j]`` NaN; ``k*`` is then the
    first NaN pair, and both of its elements receive the gradient (as autograd of the broadcast formula does).
    """
    op = "pykernels.maxmin_matmul"
    batch = _check_operands(op, a, b)
    engine, ns = _engine(op, backend, a.device)
    if engine == "reference":
        return ref.maxmin_matmul(a, b)
    out, _ = ns.maxmin_matmul(_batched(a, batch), _batched(b, batch))
    return out.view(*batch, a.size(-2), b.size(-1))


def _check_temperature(op: str, temperature) -> float:
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a Python number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def soft_maxmin_matmul(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.01, *,
                       backend: str = "auto") -> torch.Tensor:
    """The smooth (max, min) product at ``temperature`` (Vico's formulation).

    ``c[i, j] = t log sum_k exp(smin_ijk / t)`` with the soft minimum ``smin_ijk = -t log(exp(-a_ik / t) +
    exp(-b_kj / t))``; it tends to :func:`maxmin_matmul` as ``t -> 0``. Computed streaming over ``k``, with
    ``O(m n)`` extra memory and an analytic fused backward; stable for ``t`` from 1e-4 to 1 (see
    ``csrc/flow/maxmin.h`` for the formulation). Batch dimensions broadcast as in ``torch.matmul``.
    """
    op = "pykernels.soft_maxmin_matmul"
    batch = _check_operands(op, a, b)
    temperature = _check_temperature(op, temperature)
    engine, ns = _engine(op, backend, a.device)
    if engine == "reference":
        return ref.soft_maxmin_matmul(a, b, temperature)
    out, _, _ = ns.soft_maxmin_matmul(_batched(a, batch), _batched(b, batch), temperature)
    return out.view(*batch, a.size(-2), b.size(-1))


def _check_maps(op: str, maps, residual: float) -> list[torch.Tensor]:
    maps = list(maps)
    if not maps:
        raise ValueError(f"{op}: maps must hold at least one attention map")
    if not 0 <= residual <= 1:
        raise ValueError(f"{op}: residual must lie in [0, 1], got {residual}")
    for layer, a in enumerate(maps):
        if not isinstance(a, torch.Tensor) or a.dtype not in FLOAT_DTYPES or a.dim() < 2:
            raise TypeError(f"{op}: maps[{layer}] must be a float tensor [..., n_out, n_in]")
        if a.dtype != maps[0].dtype:
            raise TypeError(f"{op}: maps[{layer}] is {a.dtype} but maps[0] is {maps[0].dtype}")
        if a.device != maps[0].device:
            raise ValueError(f"{op}: maps[{layer}] is on {a.device} but maps[0] is on {maps[0].device}")
        if residual and a.size(-1) != a.size(-2):
            raise ValueError(f"{op}: maps[{layer}] is {list(a.shape)}; a residual needs square maps")
        if layer and a.size(-1) != maps[layer - 1].size(-2):
            raise ValueError(f"{op}: maps[{layer}] takes {a.size(-1)} tokens but maps[{layer - 1}] gives "
                             f"{maps[layer - 1].size(-2)}")
    return maps


def attention_rollout(maps, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema): ``Â_L ... Â_1`` with ``Â = (1 - r) A + r I``, rows renormalised.

    ``maps`` are ordered first layer to last, each ``[..., n_{l+1}, n_l]``; returns ``[..., n_L, n_0]``.
    """
    return ref.attention_rollout(_check_maps("pykernels.attention_rollout", maps, residual), residual)


def attention_flow(maps, mode: str = "hard", residual: float = 0.5, temperature: float = 0.01, *,
                   backend: str = "auto") -> torch.Tensor:
    """Attention flow from every first-layer token to every last-layer token, ``[..., n_L, n_0]``.

    The rollout chain of :func:`attention_rollout` with the (max, min) product (``"hard"``: the widest-path
    bottleneck), the soft product at ``temperature`` (``"soft"``, differentiable everywhere), or the true
    max-flow value of every (last-layer token, first-layer token) pair (``"exact"``, not differentiable; see
    :func:`max_flow_layered`). ``hard <= exact`` always holds.
    """
    op = "pykernels.attention_flow"
    maps = _check_maps(op, maps, residual)
    if mode == "exact":
        for layer, a in enumerate(maps):  # here, so that the error names this op, not max_flow_layered
            _check_capacities(op, f"maps[{layer}]", a)
        return max_flow_layered(maps, residual=residual)
    if mode not in ("hard", "soft"):
        raise ValueError(f"{op}: mode must be 'hard', 'soft' or 'exact', got {mode!r}")
    if mode == "soft":
        temperature = _check_temperature(op, temperature)
    out = None
    for a in maps:
        a = ref.with_residual(a, residual)
        if out is None:
            out = a
        elif mode == "hard":
            out = maxmin_matmul(a, out, backend=backend)
        else:
            out = soft_maxmin_matmul(a, out, temperature, backend=backend)
    return out


def st_flow(cross_map: torch.Tensor, temporal_maps, temperature: float | None = None, *,
            backend: str = "auto") -> torch.Tensor:
    """Vico's spatial-temporal flow: per spatial location, ``(T̃_2 ⊗ T̃_1) ⊗ C`` with ``T̃ = (T + I) / 2``.

    ``cross_map`` ``[P, F, T]`` is the head-averaged cross-attention (frames x text tokens) at each of ``P``
    spatial locations, ``temporal_maps`` a sequence of head-averaged temporal self-attention maps ``[P, F, F]``
    in layer order (Vico uses two per spatial block). The temporal maps are chained first, then applied to
    the cross map, in the order of Vico's released code (the soft product is not associative). ``⊗`` is the
    hard (max, min) product when ``temperature`` is None, the soft one otherwise. Returns ``[P, F, T]``.
    """
    op = "pykernels.st_flow"
    if not isinstance(cross_map, torch.Tensor) or cross_map.dim() < 2:
        raise TypeError(f"{op}: cross_map must be a tensor [P, frames, text tokens]")
    if cross_map.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: cross_map must be float32, float64, float16 or bfloat16, got {cross_map.dtype}")
    if temperature is not None:
        temperature = _check_temperature(op, temperature)
    frames = cross_map.size(-2)
    effect = None
    for layer, t in enumerate(temporal_maps):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.size(-1) != frames or t.size(-2) != frames:
            raise ValueError(f"{op}: temporal_maps[{layer}] must be [..., {frames}, {frames}] (frames of "
                             f"cross_map), got {list(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if t.dtype != cross_map.dtype:
            raise TypeError(f"{op}: temporal_maps[{layer}] is {t.dtype} but cross_map is {cross_map.dtype}")
        if t.device != cross_map.device:
            raise ValueError(f"{op}: temporal_maps[{layer}] is on {t.device} but cross_map is on {cross_map.device}")
        t = (t + torch.eye(frames, dtype=t.dtype, device=t.device)) / 2
        if effect is None:
            effect = t
        elif temperature is None:
            effect = maxmin_matmul(t, effect, backend=backend)
        else:
            effect = soft_maxmin_matmul(t, effect, temperature, backend=backend)
    if effect is None:
        return cross_map
    if temperature is None:
        return maxmin_matmul(effect, cross_map, backend=backend)
    return soft_maxmin_matmul(effect, cross_map, temperature, backend=backend)
