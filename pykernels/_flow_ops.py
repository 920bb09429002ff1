"""Registration of the attention-flow ops: fake kernels, autograd, and the Triton twin ops of the products.

The (max, min) products keep what their backward needs instead of the ``[batch, m, k, n]`` tensor: the hard
product its arg-max ``k*`` per output, the soft product the hard product (its stabilising shift) and the
normaliser ``sum``. The max-flow ops are not differentiable.
"""
from __future__ import annotations

import torch

from ._registry import NAMESPACES, define_triton_twins, lse_dtype, ops

PRODUCT_OPS = ("maxmin_matmul", "maxmin_matmul_backward", "soft_maxmin_matmul", "soft_maxmin_matmul_backward")

define_triton_twins("flow", PRODUCT_OPS)


def _product_shape(a, b):
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: "pykernels.maxmin_matmul: a and b must be 3-D")
    return a.size(0), a.size(1), b.size(2)


def _fake_maxmin_matmul(a, b):
    shape = _product_shape(a, b)
    return a.new_empty(shape), a.new_empty(shape, dtype=torch.int32)


def _grads_like(a, b, a_grad, b_grad):
    return (a.new_empty(a.shape) if a_grad else a.new_empty(0)), (b.new_empty(b.shape) if b_grad else b.new_empty(0))


def _fake_maxmin_matmul_backward(a, b, argk, grad_out, a_grad, b_grad):
    return _grads_like(a, b, a_grad, b_grad)


def _fake_soft_maxmin_matmul(a, b, temperature):
    shape = _product_shape(a, b)
    return a.new_empty(shape), a.new_empty(shape), a.new_empty(shape, dtype=lse_dtype(a.dtype))


def _fake_soft_maxmin_matmul_backward(a, b, hard, sum, grad_out, temperature, a_grad, b_grad):
    return _grads_like(a, b, a_grad, b_grad)


def _fake_max_flow(rowptr, col, capacity, sources, sinks):
    return capacity.new_empty(sources.shape, dtype=torch.float64)


def _fake_max_flow_layered(capacities, sources, sinks):
    return sources.new_empty(sources.shape, dtype=torch.float64)


for _ns in NAMESPACES:
    for _op in PRODUCT_OPS:
        torch.library.register_fake(f"{_ns}::{_op}", globals()[f"_fake_{_op}"])
for _op in ("max_flow", "max_flow_layered"):
    torch.library.register_fake(f"pykernels::{_op}", globals()[f"_fake_{_op}"])


def _make_maxmin_autograd(ns):
    def setup(ctx, inputs, output):
        a, b = inputs
        ctx.save_for_backward(a, b, output[1])

    def backward(ctx, grad_out, _grad_argk):
        a, b, argk = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_a, grad_b = ops(ns).maxmin_matmul_backward(a, b, argk, grad_out.contiguous(), need_a, need_b)
        return (grad_a if need_a else None), (grad_b if need_b else None)

    return setup, backward


def _make_soft_maxmin_autograd(ns):
    def setup(ctx, inputs, output):
        a, b, temperature = inputs
        ctx.temperature = temperature
        ctx.save_for_backward(a, b, output[1], output[2])

    def backward(ctx, grad_out, _grad_hard, _grad_sum):
        a, b, hard, total = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_a, grad_b = ops(ns).soft_maxmin_matmul_backward(a, b, hard, total, grad_out.contiguous(),
                                                             ctx.temperature, need_a, need_b)
        return (grad_a if need_a else None), (grad_b if need_b else None), None

    return setup, backward


for _ns in NAMESPACES:
    for _op, _factory in (("maxmin_matmul", _make_maxmin_autograd), ("soft_maxmin_matmul", _make_soft_maxmin_autograd)):
        _setup, _backward = _factory(_ns)
        torch.library.register_autograd(f"{_ns}::{_op}", _backward, setup_context=_setup)
