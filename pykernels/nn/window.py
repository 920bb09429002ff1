"""Swin's window attention and transformer block (timm-compatible) and HiDiffusion's MSW-MSA, on the fused
window-attention kernels: the feature map is never rolled, padded, partitioned or reversed."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import int_pair
from ..reference.window import relative_position_index
from ..window import msw_msa, swin_window_shift, window_attention

__all__ = ["MSWMSA", "SwinBlock", "WindowAttention", "swin_window_attention"]


def _qkv_heads(qkv: nn.Linear, x: torch.Tensor, heads: int, head_dim: int):
    """q, k, v ``[B, heads, H * W, head_dim]`` from a ``[B, H, W, C]`` map, as timm splits its qkv projection."""
    b, h, w, _ = x.shape
    return qkv(x).reshape(b, h * w, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(out: torch.Tensor, shape) -> torch.Tensor:
    b, h, w = shape
    return out.transpose(1, 2).reshape(b, h, w, -1)


class WindowAttention(nn.Module):
    """timm's Swin ``WindowAttention``: the same constructor, parameters and ``state_dict`` keys (``qkv``,
    ``proj``, ``relative_position_bias_table``), so timm Swin weights load as they are.

    Unlike timm's, :meth:`forward` takes the un-partitioned map ``[B, H, W, C]`` and the shift, and runs
    :func:`pykernels.window_attention` on it: what timm's ``SwinTransformerBlock._attn`` does with roll, pad,
    partition, mask and reverse around its ``WindowAttention``.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, window_size=7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.window_size = int_pair("pykernels.nn.WindowAttention", "window_size", window_size, 1)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, shift_size=0, *, backend: str = "auto") -> torch.Tensor:
        """``x`` ``[B, H, W, C]`` → ``[B, H, W, C]``: (shifted) window attention with Swin's region mask.

        Where ``H`` or ``W`` is not a multiple of the window, timm pads the features with zeros before the qkv
        projection, so its pad tokens carry the projection's bias as key and value; so do ours (``pad_kv``),
        and that bias gets the pad tokens' gradient as timm's does.
        """
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError(
                "pykernels.nn.WindowAttention: attention dropout (attn_drop > 0) in training is not supported by "
                "the fused kernel, which never forms the attention matrix; use attn_drop=0 (timm's default)")
        if x.dim() != 4 or x.size(-1) != self.dim:
            raise ValueError(f"pykernels.nn.WindowAttention: x must be [B, H, W, {self.dim}], got {list(x.shape)}")
        return swin_window_attention(self, x, shift_size, backend=backend)


def swin_window_attention(attn: nn.Module, x: torch.Tensor, shift_size, *, backend: str = "auto") -> torch.Tensor:
    """What a Swin block's (shifted) window attention computes, on the un-partitioned map ``x`` ``[B, H, W, C]``.

    ``attn`` is a :class:`WindowAttention` or timm's own ``WindowAttention``: both hold ``qkv``, ``proj``,
    ``proj_drop``, ``num_heads``, ``window_size``, ``scale`` and ``relative_position_bias_table``, so
    :func:`pykernels.accelerate` runs timm's blocks through this same code with their own weights.
    Attention dropout is not applied: callers serve only ``attn_drop.p == 0`` or eval mode.
    """
    b, h, w, _ = x.shape
    head_dim = attn.qkv.out_features // (3 * attn.num_heads)
    q, k, v = _qkv_heads(attn.qkv, x, attn.num_heads, head_dim)
    pad_kv = None
    if attn.qkv.bias is not None:
        pad_kv = attn.qkv.bias.view(3, attn.num_heads, head_dim)[1:].to(q.dtype)
    out = window_attention(q, k, v, (h, w), attn.window_size, shift_size, attn.relative_position_bias_table,
                           shift_mask=True, scale=attn.scale, pad_kv=pad_kv, backend=backend)
    return attn.proj_drop(attn.proj(_merge_heads(out, (b, h, w))))


class _DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.size(0),) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class _Mlp(nn.Module):
    """timm's ``Mlp`` (``fc1``, ``act``, ``fc2``), so the block's ``state_dict`` keys match."""

    def __init__(self, dim: int, hidden: int, act_layer, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SwinBlock(nn.Module):
    """timm's ``SwinTransformerBlock`` on the un-partitioned map ``[B, H, W, C]``: the same constructor
    arguments and ``state_dict`` keys (``norm1``, ``attn.*``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``).

    Given ``input_resolution``, the window and shift are clamped at construction as timm does (a window no
    smaller than the map shrinks to it and the shift is dropped), so the bias table has timm's shape; at run
    time the same rule is applied to the map's actual size, so other resolutions work too.
    """

    def __init__(self, dim: int, input_resolution=None, num_heads: int = 4, head_dim: int | None = None,
                 window_size=7, shift_size=0, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        if input_resolution is not None:
            window_size, shift_size = swin_window_shift(input_resolution, window_size, shift_size)
        self.window_size = int_pair("pykernels.nn.SwinBlock", "window_size", window_size, 1)
        self.shift_size = int_pair("pykernels.nn.SwinBlock", "shift_size", shift_size, 0)
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, head_dim, window_size, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = _DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), act_layer, proj_drop)
        self.drop_path2 = _DropPath(drop_path)

    def forward(self, x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        b, h, w, c = x.shape
        x = x + self.drop_path1(self.attn(self.norm1(x), self.shift_size, backend=backend))
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)


class MSWMSA(nn.Module):
    """HiDiffusion's multi-scale shifted-window self-attention as a module: a 2 x 2 grid of windows over the
    map, shifted by a random quarter of the window on every call (see :func:`pykernels.msw_msa`).

    ``qkv`` and ``proj`` are linear projections as in :class:`WindowAttention`; ``generator`` makes the shifts
    reproducible. ``forward(x, shift=None)`` takes ``[B, H, W, C]``; pass ``shift`` to fix it (e.g. under
    ``torch.compile``).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, qkv_bias: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = head_dim or dim // num_heads
        self.qkv = nn.Linear(dim, 3 * self.head_dim * num_heads, bias=qkv_bias)
        self.proj = nn.Linear(self.head_dim * num_heads, dim)
        self.generator = generator

    def forward(self, x: torch.Tensor, shift=None, *, backend: str = "auto") -> torch.Tensor:
        if x.dim() != 4 or x.size(-1) != self.dim:
            raise ValueError(f"pykernels.nn.MSWMSA: x must be [B, H, W, {self.dim}], got {list(x.shape)}")
        b, h, w, _ = x.shape
        q, k, v = _qkv_heads(self.qkv, x, self.num_heads, self.head_dim)
        out = msw_msa(q, k, v, (h, w), shift=shift, generator=self.generator, backend=backend)
        return self.proj(_merge_heads(out, (b, h, w)))
