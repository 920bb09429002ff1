"""Registration of 2-D neighbourhood attention: fake kernels, autograd, and the Triton twin ops.

The forward returns the output and the log-sum-exp; the backward recomputes the probabilities from that
log-sum-exp, so nothing of size ``H*W x kernel`` is kept between the passes.
"""
from __future__ import annotations

import torch

from ._registry import NAMESPACES, define_triton_twins, lse_dtype, ops

NEIGHBORHOOD_OPS = ("neighborhood_attention_2d", "neighborhood_attention_2d_backward")

define_triton_twins("neighborhood", NEIGHBORHOOD_OPS)


def _fake_neighborhood_attention_2d(q, k, v, spatial_shape, kernel_size, dilation, rpb, scale):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "pykernels.neighborhood_attention_2d: q, k, v must be 4-D")
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.size(3))), q.new_empty((b, h, n), dtype=lse_dtype(q.dtype))


def _fake_neighborhood_attention_2d_backward(q, k, v, spatial_shape, kernel_size, dilation, rpb, scale, out, lse,
                                             grad_out, rpb_grad):
    drpb = q.new_empty(rpb.shape) if rpb_grad and rpb is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), drpb


for _ns in NAMESPACES:
    for _op in NEIGHBORHOOD_OPS:
        torch.library.register_fake(f"{_ns}::{_op}", globals()[f"_fake_{_op}"])


def _make_autograd(ns):
    def setup(ctx, inputs, output):
        q, k, v, spatial_shape, kernel_size, dilation, rpb, scale = inputs
        ctx.geometry = (spatial_shape, kernel_size, dilation)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, rpb, output[0], output[1])

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, rpb, out, lse = ctx.saved_tensors
        rpb_grad = rpb is not None and ctx.needs_input_grad[6]
        dq, dk, dv, drpb = ops(ns).neighborhood_attention_2d_backward(
            q, k, v, *ctx.geometry, rpb, ctx.scale, out, lse, grad_out.contiguous(), rpb_grad)
        return dq, dk, dv, None, None, None, (drpb if rpb_grad else None), None

    return setup, backward


for _ns in NAMESPACES:
    _setup, _backward = _make_autograd(_ns)
    torch.library.register_autograd(f"{_ns}::neighborhood_attention_2d", _backward, setup_context=_setup)
