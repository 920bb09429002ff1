"""Registration of the dense attention ops: fake kernels, autograd, and the Triton twin ops.

``attention`` returns the output and the log-sum-exp; ``attention_map`` turns that log-sum-exp into the
head-averaged probabilities without building ``[B, H, Nq, Nk]``. The map's backward differentiates the
softmax normalisation itself, so the lse it reads is a plain input with no gradient. ``attention_with_map``
is both in one op, with one backward for both outputs' gradients.
"""
from __future__ import annotations

import torch

from ._registry import NAMESPACES, define_triton_twins, lse_dtype, ops

ATTENTION_OPS = ("attention", "attention_backward", "attention_map", "attention_map_backward", "attention_with_map",
                 "attention_with_map_backward")

define_triton_twins("attention", ATTENTION_OPS)


def _fake_attention(q, k, v, bias, causal, scale):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "pykernels.attention: q, k, v must be 4-D")
    b, h, nq, _ = q.shape
    return q.new_empty((b, h, nq, v.size(3))), q.new_empty((b, h, nq), dtype=lse_dtype(q.dtype))


def _full_bias_grad(q, k, bias_grad):
    if not bias_grad:
        return q.new_empty(0)
    return q.new_empty((q.size(0), q.size(1), q.size(2), k.size(2)))


def _fake_attention_backward(q, k, v, bias, out, lse, grad_out, causal, scale, bias_grad):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), _full_bias_grad(q, k, bias_grad)


def _fake_attention_map(q, k, bias, lse, causal, scale):
    return q.new_empty((q.size(0), q.size(2), k.size(2)))


def _fake_attention_with_map(q, k, v, bias, causal, scale):
    return (*_fake_attention(q, k, v, bias, causal, scale), _fake_attention_map(q, k, bias, None, causal, scale))


def _fake_attention_with_map_backward(q, k, v, bias, out, lse, grad_out, grad_map, causal, scale, bias_grad):
    return _fake_attention_backward(q, k, v, bias, out, lse, grad_out, causal, scale, bias_grad)


def _fake_attention_map_backward(q, k, bias, lse, grad_map, causal, scale, bias_grad):
    return torch.empty_like(q), torch.empty_like(k), _full_bias_grad(q, k, bias_grad)


for _ns in NAMESPACES:
    for _op in ATTENTION_OPS:
        torch.library.register_fake(f"{_ns}::{_op}", globals()[f"_fake_{_op}"])


def _make_attention_autograd(ns):
    def setup(ctx, inputs, output):
        q, k, v, bias, causal, scale = inputs
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q, k, v, bias, output[0], output[1])

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = ops(ns).attention_backward(q, k, v, bias, out, lse, grad_out.contiguous(),
                                                       ctx.causal, ctx.scale, bias_grad)
        return dq, dk, dv, (dbias if bias_grad else None), None, None

    return setup, backward


def _make_attention_map_autograd(ns):
    def setup(ctx, inputs, output):
        q, k, bias, lse, causal, scale = inputs
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q, k, bias, lse)

    def backward(ctx, grad_map):
        q, k, bias, lse = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[2]
        dq, dk, dbias = ops(ns).attention_map_backward(q, k, bias, lse, grad_map.contiguous(), ctx.causal,
                                                       ctx.scale, bias_grad)
        return dq, dk, (dbias if bias_grad else None), None, None, None

    return setup, backward


def _make_attention_with_map_autograd(ns):
    def setup(ctx, inputs, output):
        q, k, v, bias, causal, scale = inputs
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q, k, v, bias, output[0], output[1])

    def backward(ctx, grad_out, _grad_lse, grad_map):
        q, k, v, bias, out, lse = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = ops(ns).attention_with_map_backward(q, k, v, bias, out, lse, grad_out.contiguous(),
                                                                grad_map.contiguous(), ctx.causal, ctx.scale,
                                                                bias_grad)
        return dq, dk, dv, (dbias if bias_grad else None), None, None

    return setup, backward


for _ns in NAMESPACES:
    for _op, _factory in (("attention", _make_attention_autograd), ("attention_map", _make_attention_map_autograd),
                          ("attention_with_map", _make_attention_with_map_autograd)):
        _setup, _backward = _factory(_ns)
        torch.library.register_autograd(f"{_ns}::{_op}", _backward, setup_context=_setup)
