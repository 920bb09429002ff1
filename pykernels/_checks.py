"""Argument checks shared by the public attention-family functions; messages name the op and the argument."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Widest head (q/k and v) the CUDA and Triton attention engines launch with: their tiles for wider heads need more
# shared memory than sm_80/sm_90 offer. csrc/attention/attention_cuda.h kMaxHeadDim is the C++ twin.
GPU_MAX_HEAD_DIM = 256


def check_qkv_tensors(op: str, q, k, v, tokens: str) -> None:
    """q, k, v are 4-D ``[B, heads, <tokens>, head_dim]`` float tensors of one dtype on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, heads, {tokens}, head_dim], got {list(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device}, q on {q.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}, q has {q.dtype}")


def int_pair(op: str, name: str, value, minimum: int) -> tuple[int, int]:
    """An int or an ``(h, w)`` pair of ints, each at least ``minimum``."""
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    try:
        pair = tuple(pair)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in pair):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_grid_qkv(op: str, q, k, v, spatial_shape) -> tuple[int, int]:
    """q, k ``[B, heads, H * W, D]`` and v ``[B, heads, H * W, Dv]`` on the grid ``spatial_shape``."""
    check_qkv_tensors(op, q, k, v, "H * W")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {list(q.shape)}, got {list(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must be [B, heads, H * W, Dv] with q's {list(q.shape[:3])}, got {list(v.shape)}")
    if q.size(3) == 0:
        raise ValueError(f"{op}: the head dim must be positive")
    spatial = int_pair(op, "spatial_shape", spatial_shape, 1)
    if spatial[0] * spatial[1] != q.size(2):
        raise ValueError(f"{op}: spatial_shape {spatial} has {spatial[0] * spatial[1]} cells but q has "
                         f"{q.size(2)} tokens")
    return spatial


def check_param_tensor(op: str, name: str, t, q) -> torch.Tensor:
    """A float tensor argument on q's device, returned in q's dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{op}: {name} is on {t.device}, q on {q.device}")
    return t.to(q.dtype)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are contiguous (what the engines read), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.size(-1) <= 1 else t.contiguous()


def check_scale(op: str, scale, head_dim: int) -> float:
    """The softmax scale: a finite real number, or None for ``head_dim ** -0.5``."""
    if scale is None:
        return head_dim ** -0.5 if head_dim > 0 else 1.0
    if isinstance(scale, torch.SymFloat):  # traced by torch.compile: checked where it is made concrete
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a number or None, got {type(scale).__name__}")
    # Under dynamo a scale computed from a symbolic size is a traced value that is not seen as a SymFloat here;
    # math.isfinite on it would break the graph. Its value is checked where it is made concrete.
    if torch.compiler.is_compiling():
        return scale
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return float(scale)
