"""Registration of the graph kernel ops: fake kernels, autograd, and the Triton engine's twin ops.

The schemas are declared once in C++ (``csrc/registration.cpp``) as ``pykernels::<op>``; the C++ engines
implement them for CPU and CUDA, the Triton engine the twin ops ``pykernels_triton::<op>`` (``_registry``).
Fake kernels and autograd below serve both namespaces, and each backward calls the ops of the namespace it
differentiates, so torch.compile traces all of it.
"""
from __future__ import annotations

import torch

from ._registry import NAMESPACES, define_triton_twins, lse_dtype as _lse_dtype, ops

GRAPH_OPS = ("coo_to_csr", "arg_to_source_", "spmm", "spmm_arg_backward", "sddmm", "edge_softmax", "edge_softmax_backward",
             "graph_attention", "graph_attention_backward")

define_triton_twins("graph", GRAPH_OPS)


# ----------------------------------------------------------------------------------------------- fakes


def _fake_coo_to_csr(row, col, num_rows, num_cols, context):
    torch._check(row.dim() == 1 and col.dim() == 1 and row.numel() == col.numel(),
                 lambda: f"{context}: row and col must be 1-D of equal length")
    return (row.new_empty(num_rows + 1, dtype=torch.long), row.new_empty(row.numel(), dtype=torch.long),
            row.new_empty(row.numel(), dtype=torch.long))


def _fake_arg_to_source_(arg, col, empty):
    return None


def _fake_spmm(rowptr, col, rowptr_t, col_t, perm_t, weight, x, reduce):
    torch._check(x.dim() == 3, lambda: "pykernels.spmm: x must be [N, H, F]")
    shape = (rowptr.numel() - 1, x.size(1), x.size(2))
    arg_rows = shape[0] if reduce in ("max", "min") else 0
    return x.new_empty(shape), x.new_empty((arg_rows,) + shape[1:], dtype=torch.long)


def _fake_spmm_arg_backward(rowptr, col, rowptr_t, col_t, perm_t, weight, arg, grad_out, x, weight_grad):
    grad_w = x.new_empty((col.numel(), x.size(1))) if weight_grad else x.new_empty(0)
    return torch.empty_like(x), grad_w


def _fake_sddmm(rowptr, col, rowptr_t, col_t, perm_t, a, b):
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: "pykernels.sddmm: a and b must be [N, H, F]")
    return a.new_empty((col.numel(), a.size(1)))


def _fake_edge_softmax(rowptr, scores):
    return torch.empty_like(scores)


def _fake_edge_softmax_backward(rowptr, probs, grad):
    return torch.empty_like(probs)


def _fake_graph_attention(rowptr, col, rowptr_t, col_t, perm_t, q, k, v, bias, scale):
    n, h = rowptr.numel() - 1, q.size(1)
    return q.new_empty((n, h, v.size(2))), q.new_empty((n, h), dtype=_lse_dtype(q.dtype))


def _fake_graph_attention_backward(rowptr, col, rowptr_t, col_t, perm_t, q, k, v, bias, out, lse, grad_out,
                                   scale, bias_grad):
    dbias = q.new_empty((col.numel(), q.size(1))) if bias_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


_FAKES = {name: globals()[f"_fake_{name}"] for name in GRAPH_OPS}

for _ns in NAMESPACES:
    for _op, _fake in _FAKES.items():
        torch.library.register_fake(f"{_ns}::{_op}", _fake)


# ---------------------------------------------------------------------------------------------- autograd


def _need_transpose(op, rowptr_t, col_t, perm_t):
    if rowptr_t is None or col_t is None or perm_t is None:
        raise RuntimeError(f"pykernels.{op}: backward needs the transposed graph; build the CSR with "
                           "transpose=True (the default)")


def _make_spmm_autograd(ns):
    def setup(ctx, inputs, output):
        rowptr, col, rowptr_t, col_t, perm_t, weight, x, reduce = inputs
        ctx.reduce = reduce
        ctx.save_for_backward(rowptr, col, rowptr_t, col_t, perm_t, weight, x, output[1])

    def backward(ctx, grad_out, _grad_arg):
        rowptr, col, rowptr_t, col_t, perm_t, weight, x, arg = ctx.saved_tensors
        _need_transpose("spmm", rowptr_t, col_t, perm_t)
        need_x, need_w = ctx.needs_input_grad[6], ctx.needs_input_grad[5]
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.reduce in ("max", "min"):
            grad_x, gw = ops(ns).spmm_arg_backward(rowptr, col, rowptr_t, col_t, perm_t, weight, arg, grad_out, x,
                                                   need_w)
            grad_w = gw if need_w else None
            return None, None, None, None, None, grad_w, grad_x, None
        inv_deg = None
        if ctx.reduce == "mean":
            inv_deg = (rowptr[1:] - rowptr[:-1]).clamp(min=1).to(grad_out.dtype).reciprocal()
        if need_x:
            w_t = weight.index_select(0, perm_t) if weight is not None else None
            if inv_deg is not None:
                # The mean's 1/deg(target) rides on the transpose's edge weights ([E, H]), which costs
                # far less than dividing the [N, H, F] gradient.
                scale_t = inv_deg.index_select(0, col_t).unsqueeze(1)
                w_t = scale_t.expand(-1, grad_out.size(1)).contiguous() if w_t is None else w_t * scale_t
            grad_x, _ = ops(ns).spmm(rowptr_t, col_t, None, None, None, w_t, grad_out, "sum")
        if need_w:
            g = grad_out * inv_deg.view(-1, 1, 1) if inv_deg is not None else grad_out
            grad_w = ops(ns).sddmm(rowptr, col, None, None, None, g, x)
        return None, None, None, None, None, grad_w, grad_x, None

    return setup, backward


def _make_sddmm_autograd(ns):
    def setup(ctx, inputs, output):
        rowptr, col, rowptr_t, col_t, perm_t, a, b = inputs
        ctx.save_for_backward(rowptr, col, rowptr_t, col_t, perm_t, a, b)

    def backward(ctx, grad):
        rowptr, col, rowptr_t, col_t, perm_t, a, b = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = grad_b = None
        if ctx.needs_input_grad[5]:
            grad_a, _ = ops(ns).spmm(rowptr, col, None, None, None, grad, b, "sum")
        if ctx.needs_input_grad[6]:
            _need_transpose("sddmm", rowptr_t, col_t, perm_t)
            grad_b, _ = ops(ns).spmm(rowptr_t, col_t, None, None, None, grad.index_select(0, perm_t), a, "sum")
        return None, None, None, None, None, grad_a, grad_b

    return setup, backward


def _make_edge_softmax_autograd(ns):
    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    def backward(ctx, grad):
        rowptr, probs = ctx.saved_tensors
        return None, ops(ns).edge_softmax_backward(rowptr, probs, grad.contiguous())

    return setup, backward


def _make_graph_attention_autograd(ns):
    def setup(ctx, inputs, output):
        rowptr, col, rowptr_t, col_t, perm_t, q, k, v, bias, scale = inputs
        ctx.scale = scale
        ctx.save_for_backward(rowptr, col, rowptr_t, col_t, perm_t, q, k, v, bias, output[0], output[1])

    def backward(ctx, grad_out, _grad_lse):
        rowptr, col, rowptr_t, col_t, perm_t, q, k, v, bias, out, lse = ctx.saved_tensors
        _need_transpose("graph_attention", rowptr_t, col_t, perm_t)
        bias_grad = bias is not None and ctx.needs_input_grad[8]
        dq, dk, dv, dbias = ops(ns).graph_attention_backward(rowptr, col, rowptr_t, col_t, perm_t, q, k, v, bias, out,
                                                             lse, grad_out.contiguous(), ctx.scale, bias_grad)
        return None, None, None, None, None, dq, dk, dv, (dbias if bias_grad else None), None

    return setup, backward


for _ns in NAMESPACES:
    for _op, _factory in (("spmm", _make_spmm_autograd), ("sddmm", _make_sddmm_autograd),
                          ("edge_softmax", _make_edge_softmax_autograd),
                          ("graph_attention", _make_graph_attention_autograd)):
        _setup, _backward = _factory(_ns)
        torch.library.register_autograd(f"{_ns}::{_op}", _backward, setup_context=_setup)
