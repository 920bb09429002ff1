"""Fused attention benchmarks: pykernels against SDPA (every backend the device has) and naive attention,
and the fused head-mean map against SDPA plus a materialised ``softmax(q kᵀ).mean(heads)``."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pykernels as pk

from .cases import Case, LazyData, forward_backward, forward_only

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
    kv_heads: int | None = None  # fewer than heads: grouped-query attention
    head_mean_map: bool = True

    @property
    def label(self) -> str:
        heads = self.heads if self.kv_heads in (None, self.heads) else f"{self.heads}/{self.kv_heads}"
        return f"{self.name} (B={self.batch}, H={heads}, {self.nq}×{self.nk}, D={self.dim})"


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
        # Few queries against long keys: decoding with a KV cache, a few queries reading a long context.
        # Forward only, no map.
        AttnSpec("decoding", 1, 32, 1, 1024, 64, kv_heads=8, backward=False, head_mean_map=False),
        *(AttnSpec("decoding", 1, 32, 1, nk, 128, quick=not cpu, backward=False, head_mean_map=False)
          for nk in (2048, 4096, 8192)),
        AttnSpec("decoding", 1, 8, 1, 8192, 128, quick=not cpu, backward=False, head_mean_map=False),
        *(AttnSpec("long context, one head", 1, 1, nq, nk, dim, quick=False, backward=False, head_mean_map=False)
          for nq, nk, dim in ((1, 8192, 64), (1, 16384, 64), (16, 8192, 128), (64, 8192, 128))),
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


def _naive(q, k, v):
    k, v = (x.repeat_interleave(q.size(1) // x.size(1), dim=1) for x in (k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) * q.size(-1) ** -0.5, dim=-1)
    return p @ v


def _fused_map(q, k, v):
    return pk.fused_attention(q, k, v, return_attn_mean=True)


def _unfused_map(q, k, v):
    """What users do today: SDPA for the output, the probabilities materialised again for the map."""
    p = torch.softmax(q @ k.transpose(-1, -2) * q.size(-1) ** -0.5, dim=-1)
    return F.scaled_dot_product_attention(q, k, v), p.mean(dim=1)


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
                shape_k = (spec.batch, spec.kv_heads or spec.heads, spec.nk, spec.dim)
                return [torch.randn(s, generator=g).to(device, dtype).requires_grad_()
                        for s in (shape_q, shape_k, shape_k)]
            return _data.get((spec, device), build)

        # wrap(fn, get) binds this iteration's get; a closure over the loop would run the last shape every time.
        providers = {"pykernels": pk.fused_attention}
        for name, ctx in _sdpa_backends(device).items():
            def sdpa(q, k, v, ctx=ctx):
                with ctx():
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.size(1) != q.size(1))
            providers[name] = sdpa
        providers["naive softmax(qkᵀ)v"] = _naive
        map_providers = {"pykernels (fused map)": _fused_map,
                         "SDPA + materialised softmax(qkᵀ).mean(heads)": _unfused_map}
        modes = [("fwd", forward_only)] + ([("fwd+bwd", forward_backward)] if spec.backward else [])
        titled = [(f"attention · {spec.label}", providers)]
        if spec.head_mean_map:
            titled.append((f"attention + head-mean map · {spec.label}", map_providers))
        for title, fns in titled:
            for mode, wrap in modes:
                out.append(Case(FAMILY, title, mode, {name: wrap(fn, get) for name, fn in fns.items()}))
    return out
