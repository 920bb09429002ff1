"""Registration of the windowed attention ops: fake kernels, autograd, and the Triton twin ops.

``window_attention`` returns the output and the log-sum-exp per token; its backward recomputes the
probabilities from that lse. The bias gradient comes back shaped like whichever bias was given (Swin's table
or the dense ``[heads, n, n]`` bias). ``pad_kv`` receives no gradient: the public wrapper refuses one that
requires grad rather than dropping it silently.
"""
from __future__ import annotations

import torch

from ._registry import NAMESPACES, define_triton_twins, lse_dtype, ops

WINDOW_OPS = ("window_attention", "window_attention_backward")

define_triton_twins("window", WINDOW_OPS)


def _fake_window_attention(q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv, shift_mask, scale):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "pykernels.window_attention: q, k, v must be 4-D")
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.size(3))), q.new_empty((b, h, n), dtype=lse_dtype(q.dtype))


def _fake_window_attention_backward(q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv,
                                    shift_mask, scale, out, lse, grad_out, bias_grad):
    bias = bias_table if bias_table is not None else dense_bias
    dbias = bias.new_empty(bias.shape) if bias_grad and bias is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


for _ns in NAMESPACES:
    for _op in WINDOW_OPS:
        torch.library.register_fake(f"{_ns}::{_op}", globals()[f"_fake_{_op}"])


def _make_window_attention_autograd(ns):
    def setup(ctx, inputs, output):
        q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv, shift_mask, scale = inputs
        ctx.geometry = (spatial_shape, window, shift, shift_mask, scale)
        ctx.save_for_backward(q, k, v, bias_table, dense_bias, pad_kv, output[0], output[1])

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, bias_table, dense_bias, pad_kv, out, lse = ctx.saved_tensors
        spatial_shape, window, shift, shift_mask, scale = ctx.geometry
        table_grad = bias_table is not None and ctx.needs_input_grad[6]
        dense_grad = dense_bias is not None and ctx.needs_input_grad[7]
        dq, dk, dv, dbias = ops(ns).window_attention_backward(
            q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv, shift_mask, scale, out, lse,
            grad_out.contiguous(), table_grad or dense_grad)
        return (dq, dk, dv, None, None, None, dbias if table_grad else None, dbias if dense_grad else None, None,
                None, None)

    return setup, backward


for _ns in NAMESPACES:
    _setup, _backward = _make_window_attention_autograd(_ns)
    torch.library.register_autograd(f"{_ns}::window_attention", _backward, setup_context=_setup)
