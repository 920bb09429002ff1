"""Registration of the windowed attention ops: fake kernels, autograd, and the Triton twin ops.

``window_attention`` returns the output and the log-sum-exp per token; its backward recomputes the
probabilities from that lse. The bias gradient comes back shaped like whichever bias was given (Swin's table
or the dense ``[heads, n, n]`` bias).

``pad_kv``'s gradient needs only the probability mass ``π_i`` that query ``i`` puts on pad tokens: every pad
token of a head has the same key and value, so ``d pad_v = Σ_i π_i dO_i`` and
``d pad_k = scale Σ_i π_i (dO_i · pad_v - dO_i · O_i) q_i``. ``π`` comes from one more forward of the same
op with values 0 on real tokens and 1 on pad tokens, so every engine serves it unchanged; it runs only when
pad_kv needs a gradient and the grid has pad tokens.
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
        grad_out = grad_out.contiguous()
        dq, dk, dv, dbias = ops(ns).window_attention_backward(
            q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv, shift_mask, scale, out, lse,
            grad_out, table_grad or dense_grad)
        dpad = None
        if pad_kv is not None and ctx.needs_input_grad[8]:
            dpad = _pad_kv_grad(ns, q, k, out, grad_out, spatial_shape, window, shift, bias_table, dense_bias,
                                pad_kv, shift_mask, scale)
        return (dq, dk, dv, None, None, None, dbias if table_grad else None, dbias if dense_grad else None, dpad,
                None, None)

    return setup, backward


def _pad_kv_grad(ns, q, k, out, grad_out, spatial_shape, window, shift, bias_table, dense_bias, pad_kv, shift_mask,
                 scale):
    """``[2, heads, D]`` gradient of the pad tokens' key and value (see the module docstring)."""
    if all(size % win == 0 for size, win in zip(spatial_shape, window)):
        return torch.zeros_like(pad_kv)
    pad_k, pad_v = pad_kv.unbind(0)
    marker = torch.stack([pad_k, torch.ones_like(pad_v)]).contiguous()
    with torch.no_grad():
        pad_mass = ops(ns).window_attention(q, k, torch.zeros_like(q), spatial_shape, window, shift, bias_table,
                                            dense_bias, marker, shift_mask, scale)[0][..., 0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pad_mass, grad_out, out, q = (t.to(acc) for t in (pad_mass, grad_out, out, q))
    grad_v = torch.einsum("bhn,bhnd->hd", pad_mass, grad_out)
    score_grad = pad_mass * (torch.einsum("bhnd,hd->bhn", grad_out, pad_v.to(acc)) - (grad_out * out).sum(-1))
    grad_k = scale * torch.einsum("bhn,bhnd->hd", score_grad, q)
    return torch.stack([grad_k, grad_v]).to(pad_kv.dtype)


for _ns in NAMESPACES:
    _setup, _backward = _make_window_attention_autograd(_ns)
    torch.library.register_autograd(f"{_ns}::window_attention", _backward, setup_context=_setup)
