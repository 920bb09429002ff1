"""Attention-flow benchmarks: the fused (max, min) products against the broadcast formulation of Vico's
released code (re-written here, forward and backward), with ``torch.matmul`` of the same sizes for scale;
and the exact max-flow cases of :mod:`pykernels.bench.max_flow`.

The broadcast baselines build ``[batch, m, n, k]`` tensors. Where that would not fit in a third of this
machine's memory they are not run (a run that swaps or is killed measures nothing); the table then says
how much they would need, and only pykernels and matmul are timed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import pykernels as pk

from . import max_flow
from .cases import Case, LazyData, forward_backward, forward_only

FAMILY = "flow"
TEMPERATURE = 0.01


def broadcast_maxmin(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Vico's hard product: the elementwise minimum of ``[B, m, n, k]`` pairs, then the max over k."""
    pairs = torch.min(a.unsqueeze(2), b.transpose(1, 2).unsqueeze(1))
    return pairs.max(dim=3).values


def broadcast_soft_maxmin(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Vico's soft product: a logsumexp soft minimum of the stacked pairs, then a logsumexp over k."""
    size = (a.size(1), b.size(2), a.size(2))
    ea = a.unsqueeze(2).expand(-1, *size)
    eb = b.transpose(1, 2).unsqueeze(1).expand(-1, *size)
    soft_min = -torch.logsumexp(torch.stack([-ea / temperature, -eb / temperature]), dim=0) * temperature
    return torch.logsumexp(soft_min / temperature, dim=3) * temperature


@dataclass(frozen=True)
class ProductSpec:
    name: str
    batch: int
    m: int
    k: int
    n: int
    quick: bool = True
    soft_quick: bool = True

    @property
    def label(self) -> str:
        batch = f"{self.batch} × " if self.batch > 1 else ""
        return f"{self.name} ({batch}{self.m}×{self.k} @ {self.k}×{self.n})"


SPECS = [
    ProductSpec("Vico ST-Flow, P=160", 160, 16, 16, 77),
    ProductSpec("Vico ST-Flow, P=640", 640, 16, 16, 77),
    ProductSpec("Vico ST-Flow, P=2560", 2560, 16, 16, 77),
    ProductSpec("large single", 1, 4096, 77, 4096),
    ProductSpec("large single", 1, 2048, 2048, 2048, soft_quick=False),
]

_data = LazyData()


def _memory_budget() -> int:
    """A third of the machine's memory: other processes and the allocator's slack need the rest."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 3
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def _broadcast_bytes(spec: ProductSpec, soft: bool, backward: bool, element: int) -> int:
    """Peak bytes of the broadcast formulation, in units of one [batch, m, n, k] tensor: profiled at
    64 x 16x16 @ 16x77 (fp32) as 1.19 (hard), 4.6 (hard + backward: the arg-max indices are int64), 6.0
    (soft) and 10.1 (soft + backward)."""
    pairs = spec.batch * spec.m * spec.n * spec.k * element
    return int(pairs * ((10.2 if backward else 6.0) if soft else (4.7 if backward else 1.2)))


def _too_big(need: int):
    def run():
        raise MemoryError(f"not run: needs about {need / 2**30:.0f} GiB, over a third of this machine's memory")
    return run


def cases(device: torch.device, quick: bool, spec_list: list[ProductSpec] | None = None) -> list[Case]:
    dtype = torch.float32
    budget = _memory_budget()
    out = []
    for spec in SPECS if spec_list is None else spec_list:
        if quick and not spec.quick:
            continue

        def get(spec=spec):
            def build():
                g = torch.Generator().manual_seed(0)
                # Row-stochastic maps, as attention maps are: a temporal-like [m, k] and a cross-like [k, n].
                a = torch.softmax(torch.randn(spec.batch, spec.m, spec.k, generator=g) * 2, -1)
                b = torch.softmax(torch.randn(spec.batch, spec.k, spec.n, generator=g) * 2, -1)
                return a.to(device, dtype).requires_grad_(), b.to(device, dtype).requires_grad_()
            return _data.get((spec, device), build)

        products = [
            ("hard", lambda a, b: pk.maxmin_matmul(a, b), broadcast_maxmin),
            ("soft", lambda a, b: pk.soft_maxmin_matmul(a, b, TEMPERATURE),
             lambda a, b: broadcast_soft_maxmin(a, b, TEMPERATURE)),
        ]
        for kind, ours, baseline in products:
            if kind == "soft" and quick and not spec.soft_quick:
                continue
            name = f"{kind} (max, min) product · {spec.label}"
            for mode, wrap in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
                need = _broadcast_bytes(spec, kind == "soft", mode == "fwd+bwd", torch.finfo(dtype).bits // 8)
                providers = {
                    "pykernels": wrap(ours, get),
                    "broadcast (Vico's formulation)": wrap(baseline, get) if need <= budget else _too_big(need),
                    "torch.matmul, same sizes (for scale)": wrap(torch.matmul, get),
                }
                out.append(Case(FAMILY, name, mode, providers))
    return out + (max_flow.cases(device, quick) if spec_list is None else [])
