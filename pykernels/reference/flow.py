"""Reference semantics of the attention-flow ops.

Attention maps use the usual layout: ``A[..., i, j]`` is how much receiving token ``i`` attends to sending
token ``j`` (rows receive). Products broadcast their batch dimensions like ``torch.matmul``; these
references build the full ``[..., m, k, n]`` tensor, which is what the fused engines avoid.
"""
from __future__ import annotations

import torch


def _pairs(a: torch.Tensor, b: torch.Tensor):
    """``a[..., i, k]`` and ``b[..., k, j]`` broadcast to ``[..., m, k, n]``."""
    return a.unsqueeze(-1), b.unsqueeze(-3)


def maxmin_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``c[..., i, j] = max_k min(a[..., i, k], b[..., k, j])``.

    The value equals ``torch.minimum(a[..., :, :, None], b[..., None, :, :]).amax(-2)`` bitwise. The gradient
    of ``c[i, j]`` goes to one element only: at the lowest maximising ``k*``, to ``a[i, k*]`` when
    ``a[i, k*] <= b[k*, j]`` and to ``b[k*, j]`` otherwise (torch would split ties).
    """
    ea, eb = _pairs(a, b)
    mins = torch.minimum(ea, eb)
    kstar = mins.detach().argmax(-2, keepdim=True)  # first maximum, NaN counting as the maximum
    shape = mins.shape[:-2] + (1, mins.size(-1))
    a_sel = ea.expand(mins.shape).gather(-2, kstar.expand(shape)).squeeze(-2)
    b_sel = eb.expand(mins.shape).gather(-2, kstar.expand(shape)).squeeze(-2)
    chosen = torch.where(a_sel <= b_sel, a_sel, b_sel)
    return torch.where(a_sel.isnan() | b_sel.isnan(), a_sel + b_sel, chosen)


def soft_maxmin_matmul(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The smooth (max, min) product: a log-sum-exp over ``k`` of soft minima, both at ``temperature``.

    ``smin[i, j, k] = -t log(exp(-a[i, k] / t) + exp(-b[k, j] / t))``,
    ``c[i, j] = t log sum_k exp(smin[i, j, k] / t)``; this is Vico's formulation.
    """
    ea, eb = _pairs(a, b)
    ea, eb = torch.broadcast_tensors(ea, eb)
    soft_min = -torch.logsumexp(torch.stack([-ea / temperature, -eb / temperature]), dim=0) * temperature
    return torch.logsumexp(soft_min / temperature, dim=-2) * temperature


def with_residual(a: torch.Tensor, residual: float) -> torch.Tensor:
    """``(1 - r) A + r I`` with rows renormalised to sum 1 (rows summing to 0 stay 0)."""
    if residual:
        eye = torch.eye(a.size(-2), a.size(-1), dtype=a.dtype, device=a.device)
        a = (1 - residual) * a + residual * eye
    row_sum = a.sum(-1, keepdim=True)
    # Only an exact 0 is left alone: a subnormal row sum still divides, or the row would not sum to 1.
    return a / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)


def attention_rollout(maps, residual: float = 0.5) -> torch.Tensor:
    """Abnar & Zuidema's rollout: ``Â_L ... Â_2 Â_1`` for maps ordered first layer to last."""
    out = None
    for a in maps:
        a = with_residual(a, residual)
        out = a if out is None else torch.matmul(a, out)
    return out


def attention_flow(maps, mode: str = "hard", residual: float = 0.5, temperature: float = 0.01) -> torch.Tensor:
    """The rollout chain with the (max, min) product (``hard``) or the soft product (``soft``)."""
    out = None
    for a in maps:
        a = with_residual(a, residual)
        if out is None:
            out = a
        elif mode == "hard":
            out = maxmin_matmul(a, out)
        elif mode == "soft":
            out = soft_maxmin_matmul(a, out, temperature)
        else:
            raise ValueError(f"mode must be 'hard' or 'soft' here, got {mode!r}")
    return out


def st_flow(cross_map: torch.Tensor, temporal_maps, temperature: float | None = None) -> torch.Tensor:
    """Vico's spatial-temporal flow from text tokens to every frame, per spatial location.

    ``cross_map`` ``[P, F, T]`` is the head-averaged cross-attention (frames x text tokens) at each of the P
    locations; ``temporal_maps`` are ``[P, F, F]`` head-averaged temporal self-attention maps in the order the
    layers run. Each temporal map gets the residual ``(T + I) / 2``; the temporal maps are chained first,
    ``E = T̃_L ⊗ (... ⊗ (T̃_2 ⊗ T̃_1))``, then ``E ⊗ C``: the order of Vico's released code, which matters for
    the soft product (it is not associative). Hard product when ``temperature`` is None, else the soft one.
    """
    def product(a, b):
        return maxmin_matmul(a, b) if temperature is None else soft_maxmin_matmul(a, b, temperature)

    effect = None
    for t in temporal_maps:
        t = (t + torch.eye(t.size(-1), dtype=t.dtype, device=t.device)) / 2
        effect = t if effect is None else product(t, effect)
    return cross_map if effect is None else product(effect, cross_map)
