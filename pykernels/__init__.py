"""pykernels: fused attention, windowed attention, attention flow and graph message-passing kernels.

Every op has one meaning (its plain-PyTorch reference in ``pykernels.reference``) and several engines:
C++ for CPU tensors, CUDA and Triton for GPU tensors. Ops are ``torch.library`` custom ops with fake
kernels and autograd, so they work in eager mode and under ``torch.compile(fullgraph=True)``.
"""
from ._backend import BACKENDS, ENGINES, is_deterministic, set_deterministic
from ._info import info
from .attention import fused_attention
from .flow import (attention_flow, attention_rollout, max_flow, max_flow_layered, maxmin_matmul, soft_maxmin_matmul,
                   st_flow)
from .neighborhood import neighborhood_attention_2d
from .window import msw_msa, window_attention
from .graph import CSR, ScatterResult, edge_softmax, graph_attention, scatter, sddmm, spmm
from . import nn
from .accelerate import AccelerateReport, accelerate, restore

__version__ = "0.1.0"

__all__ = [
    "AccelerateReport", "BACKENDS", "CSR", "ENGINES", "ScatterResult", "accelerate", "attention_flow",
    "attention_rollout", "edge_softmax", "fused_attention", "graph_attention", "info", "is_deterministic",
    "max_flow", "max_flow_layered", "maxmin_matmul", "msw_msa", "neighborhood_attention_2d", "nn", "restore",
    "scatter", "sddmm", "set_deterministic", "soft_maxmin_matmul", "spmm", "st_flow", "window_attention",
]
