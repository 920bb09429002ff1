"""pykernels: fused attention, windowed attention, attention flow and graph message-passing kernels.

Every op has one meaning (its plain-PyTorch reference in ``pykernels.reference``) and several engines:
C++ for CPU tensors, CUDA and Triton for GPU tensors. Ops are ``torch.library`` custom ops with fake
kernels and autograd, so they work in eager mode and under ``torch.compile(fullgraph=True)``.
"""
from ._backend import BACKENDS, ENGINES, is_deterministic, set_deterministic
from ._info import info
from .graph import CSR, ScatterResult, edge_softmax, graph_attention, scatter, sddmm, spmm
from . import nn

try:  # accelerate() is glue over nn: a failure there must not take the kernels down with it.
    from .accelerate import accelerate
except Exception as _accelerate_error:  # noqa: BLE001
    def accelerate(model, *, backend="auto", _error=_accelerate_error):
        raise ImportError(f"pykernels.accelerate failed to import: {_error}") from _error

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "ENGINES", "CSR", "ScatterResult", "accelerate", "edge_softmax", "graph_attention", "info",
    "is_deterministic", "nn", "scatter", "sddmm", "set_deterministic", "spmm",
]
