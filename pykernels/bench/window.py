"""Windowed-attention benchmarks: pykernels' fused window attention against the timm-style pipeline (roll,
pad, partition, mask + bias, SDPA, reverse) and against global SDPA over the same tokens (what windowing
saves); MSW-MSA against HiDiffusion's roll + partition + SDPA sequence; neighbourhood attention against masked
dense attention. Every provider starts from the same q, k, v ``[B, heads, H * W, D]``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pykernels as pk
from pykernels.reference import neighborhood as nref
from pykernels.reference import window as wref

from .cases import Case, LazyData, forward_backward, forward_only

FAMILY = "window"


@dataclass(frozen=True)
class WindowSpec:
    name: str
    kind: str  # "swin", "msw-msa" or "neighborhood"
    batch: int
    size: tuple[int, int]
    heads: int
    dim: int
    window: int  # window (swin), kernel (neighborhood); MSW-MSA's is half the map
    shift: int = 0
    quick: bool = True
    # Modes in which global SDPA over all tokens is timed in the quick run (at 16k tokens its backward takes
    # minutes on a CPU).
    global_quick: tuple[str, ...] = ("fwd", "fwd+bwd")

    @property
    def label(self) -> str:
        h, w = self.size
        extra = {"swin": f"window {self.window}, shift {self.shift}", "msw-msa": f"windows {h // 2}×{w // 2}",
                 "neighborhood": f"kernel {self.window}"}[self.kind]
        return f"{self.name} (B={self.batch}, {h}×{w}, {self.heads} heads, D={self.dim}, {extra})"


SPECS = [
    WindowSpec("Swin-T stage 1", "swin", 8, (56, 56), 3, 32, 7, 3),
    WindowSpec("Swin-T stage 3", "swin", 8, (14, 14), 12, 32, 7, 3),
    WindowSpec("MSW-MSA, SD 1.5 at 1024²", "msw-msa", 2, (128, 128), 8, 40, 64, global_quick=("fwd",)),
    WindowSpec("MSW-MSA, SDXL at 2048²", "msw-msa", 2, (256, 256), 10, 64, 128, quick=False),
    WindowSpec("neighbourhood attention", "neighborhood", 2, (56, 56), 4, 32, 7),
    WindowSpec("neighbourhood attention", "neighborhood", 2, (56, 56), 4, 32, 13),
]

_data = LazyData()


def timm_pipeline(q, k, v, size, window, shift, bias_table):
    """timm's SwinTransformerBlock around its fused WindowAttention, on q, k, v: roll, pad, partition into
    ``[B * windows, heads, n, D]``, relative position bias + shift mask expanded to one float mask per window
    and head (as timm builds it), SDPA, reverse, crop, roll back."""
    b, heads, _, d = q.shape
    h, w = size
    hp, wp = -(-h // window) * window, -(-w // window) * window
    win, n = (window, window), window * window
    count = (hp // window) * (wp // window)

    def windows(x):
        x = x.reshape(b, heads, h, w, d)
        if shift:
            x = torch.roll(x, (-shift, -shift), dims=(2, 3))
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        x = x.reshape(b, heads, hp // window, window, wp // window, window, d).permute(0, 2, 4, 1, 3, 5, 6)
        return x.reshape(b * count, heads, n, d)

    mask = wref.table_to_dense(bias_table, win).unsqueeze(0)  # [1, heads, n, n]
    if shift:
        regions = wref.shift_regions((hp, wp), win, (shift, shift)).to(q.device)
        labels = regions.reshape(hp // window, window, wp // window, window).transpose(1, 2).reshape(count, n)
        region_mask = (labels[:, None, :] != labels[:, :, None]).to(q.dtype) * wref.SHIFT_MASK_VALUE
        mask = (mask.unsqueeze(0) + region_mask[None, :, None]).expand(b, count, heads, n, n).reshape(-1, heads, n, n)
    out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), attn_mask=mask)
    out = out.reshape(b, hp // window, wp // window, heads, window, window, d).permute(0, 3, 1, 4, 2, 5, 6)
    out = out.reshape(b, heads, hp, wp, d)[:, :, :h, :w]
    if shift:
        out = torch.roll(out, (shift, shift), dims=(2, 3))
    return out.reshape(b, heads, h * w, d)


def hidiffusion_pipeline(q, k, v, size, shift):
    """HiDiffusion's MSW-MSA sequence with SDPA as its attention: roll, partition into 2 x 2 windows
    ``[4 B, heads, n, D]`` (what its attn1 receives), SDPA, reverse, roll back (even maps)."""
    b, heads, _, d = q.shape
    h, w = size
    wh, ww = h // 2, w // 2

    def windows(x):
        x = x.reshape(b, heads, h, w, d)
        if shift[0]:
            x = torch.roll(x, (-shift[0], -shift[1]), dims=(2, 3))
        x = x.reshape(b, heads, 2, wh, 2, ww, d).permute(0, 2, 4, 1, 3, 5, 6)
        return x.reshape(b * 4, heads, wh * ww, d)

    out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v))
    out = out.reshape(b, 2, 2, heads, wh, ww, d).permute(0, 3, 1, 4, 2, 5, 6).reshape(b, heads, h, w, d)
    if shift[0]:
        out = torch.roll(out, shift, dims=(2, 3))
    return out.reshape(b, heads, h * w, d)


def masked_dense(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cases(device: torch.device, quick: bool, spec_list: list[WindowSpec] | None = None) -> list[Case]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = []
    for spec in SPECS if spec_list is None else spec_list:
        if quick and not spec.quick:
            continue

        def get(spec=spec):
            def build():
                g = torch.Generator().manual_seed(0)
                shape = (spec.batch, spec.heads, spec.size[0] * spec.size[1], spec.dim)
                data = {name: torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for name in "qkv"}
                if spec.kind == "swin":
                    table = torch.randn((2 * spec.window - 1) ** 2, spec.heads, generator=g) * 0.1
                    data["table"] = table.to(device, dtype)
                if spec.kind == "neighborhood":
                    allowed = nref.neighborhood_mask(spec.size, spec.window, device=device)
                    data["mask"] = allowed.expand(spec.batch, spec.heads, -1, -1)
                return data
            return _data.get((spec, device), build)

        def qkv(get=get):
            data = get()
            return data["q"], data["k"], data["v"]

        shift = (spec.size[0] // 2 // 4, spec.size[1] // 2 // 4)  # MSW-MSA: a quarter of the window
        # Providers take (q, k, v); what else they need is bound here, from this iteration.
        if spec.kind == "swin":
            providers = {
                "pykernels": lambda q, k, v, get=get, s=spec: pk.window_attention(q, k, v, s.size, s.window, s.shift,
                                                                                  get()["table"]),
                "timm-style roll + pad + partition + SDPA + reverse":
                    lambda q, k, v, get=get, s=spec: timm_pipeline(q, k, v, s.size, s.window, s.shift, get()["table"]),
            }
        elif spec.kind == "msw-msa":
            providers = {
                "pykernels": lambda q, k, v, s=spec, sh=shift: pk.msw_msa(q, k, v, s.size, shift=sh),
                "HiDiffusion roll + partition + SDPA + reverse":
                    lambda q, k, v, s=spec, sh=shift: hidiffusion_pipeline(q, k, v, s.size, sh),
            }
        else:
            providers = {
                "pykernels": lambda q, k, v, s=spec: pk.neighborhood_attention_2d(q, k, v, s.size, s.window),
                "masked dense SDPA": lambda q, k, v, get=get: masked_dense(q, k, v, get()["mask"]),
            }
        if spec.kind != "neighborhood":
            providers["global SDPA over all tokens (no windows)"] = F.scaled_dot_product_attention
        for mode, wrap in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
            timed = {name: wrap(fn, qkv) for name, fn in providers.items()
                     if not (quick and name.startswith("global") and mode not in spec.global_quick)}
            out.append(Case(FAMILY, f"{spec.kind} · {spec.label}", mode, timed))
    return out

