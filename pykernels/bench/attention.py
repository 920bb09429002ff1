"""Fused attention benchmarks: pykernels against SDPA (every backend the device has) and naive attention,
and the fused head-mean map against SDPA plus a materialised ``softmax(q kᵀ).mean(heads)``."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pykernels as pk

from .cases import Case, LazyData

FAMILY = "attention"


@dataclass(frozen=True)
class AttnSpec:
    name: str
    batch: int
    heads: int
    nq: int
    nk: int
    dim: int
    quick: bool = True
    backward: bool = True

    @property
    def label(self) -> str:
        return f"{self.name} (B={self.batch}, H={self.heads}, {self.nq}×{self.nk}, D={self.dim})"


def specs(device: torch.device) -> list[AttnSpec]:
    """The issue's shapes; on a CPU the quick run keeps the ones that finish in seconds on two cores."""
    cpu = device.type == "cpu"
    return [
        AttnSpec("self-attention", 1, 8, 1024, 1024, 64),
        AttnSpec("self-attention", 1, 8, 4096, 4096, 64, quick=not cpu),
        AttnSpec("self-attention", 1, 8, 8192, 8192, 64, quick=False),
        AttnSpec("SD self-attention", 2, 8, 4096, 4096, 40, quick=not cpu),
        AttnSpec("SD self-attention 32x32 latent", 2, 8, 1024, 1024, 40),
        AttnSpec("SD cross-attention", 2, 8, 4096, 77, 40),
        AttnSpec("video temporal attention", 2560, 8, 16, 16, 40),
    ]


_data = LazyData()


def _sdpa_backends(device: torch.device):
    """SDPA pinned to each backend that can run here, plus SDPA's own choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {SDPBackend.MATH: "math", SDPBackend.FLASH_ATTENTION: "flash"}
    if device.type == "cuda":
        names.update({SDPBackend.EFFICIENT_ATTENTION: "efficient", SDPBackend.CUDNN_ATTENTION: "cudnn"})
    out = {"SDPA (auto)": contextlib.nullcontext}
    for backend, name in names.items():
        out[f"SDPA ({name})"] = lambda backend=backend: sdpa_kernel([backend])
    return out


def _fwd_bwd(fn, leaves):
    def run():
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return run


def _naive(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2) * q.size(-1) ** -0.5, dim=-1)
    return p @ v


def cases(device: torch.device, quick: bool, spec_list: list[AttnSpec] | None = None) -> list[Case]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = []
    for spec in spec_list if spec_list is not None else specs(device):
        if quick and not spec.quick:
            continue

        def get(spec=spec):
            def build():
                g = torch.Generator().manual_seed(0)
                shape_q = (spec.batch, spec.heads, spec.nq, spec.dim)
                shape_k = (spec.batch, spec.heads, spec.nk, spec.dim)
                return [torch.randn(s, generator=g).to(device, dtype).requires_grad_()
                        for s in (shape_q, shape_k, shape_k)]
            return _data.get((spec, device), build)

        # Every closure binds this iteration's get: a late-bound one would run the last shape for every case.
        ours = lambda get=get: pk.fused_attention(*get())
        providers = {"pykernels": ours}
        for name, ctx in _sdpa_backends(device).items():
            def sdpa(ctx=ctx, get=get):
                with ctx():
                    return F.scaled_dot_product_attention(*get())
            providers[name] = sdpa
        providers["naive softmax(qkᵀ)v"] = lambda get=get: _naive(*get())
        out.append(Case(FAMILY, f"attention · {spec.label}", "fwd", dict(providers)))
        if spec.backward:
            out.append(Case(FAMILY, f"attention · {spec.label}", "fwd+bwd",
                            {k: (lambda fn=fn, get=get: _fwd_bwd(fn, get())()) for k, fn in providers.items()}))

        def ours_map(get=get):
            return pk.fused_attention(*get(), return_attn_mean=True)

        def unfused_map(get=get):
            q, k, v = get()
            p = torch.softmax(q @ k.transpose(-1, -2) * q.size(-1) ** -0.5, dim=-1)
            return F.scaled_dot_product_attention(q, k, v), p.mean(dim=1)

        out.append(Case(FAMILY, f"attention + head-mean map · {spec.label}", "fwd+bwd",
                        {"pykernels (fused map)": lambda get=get, f=ours_map: _fwd_bwd(f, get())(),
                         "SDPA + materialised softmax(qkᵀ).mean(heads)":
                             lambda get=get, f=unfused_map: _fwd_bwd(f, get())()}))
    return out
