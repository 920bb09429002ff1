"""Every kernel instantiation of the CUDA engine, launched once in the emulator and checked against the reference.

The launchers pick a template instantiation per call from tables of head-dim buckets, group sizes, vector widths
and tile factors (csrc/**/*_kernel.cu); the functional tests reach only the few their shapes happen to pick. The
tables below mirror the launchers' dispatch, and each case runs a small public call that reaches one
instantiation (batch 1, a head or two, a head dim just inside its bucket; nodes and rows in single digits, and
for the attention tiles just enough queries and keys for two row and column tiles of the large buckets' plans),
forward and backward, against ``pykernels.reference`` at the dtype's tolerance. Each case also asserts that it
launched the kernels it names, and ``test_sweep_names_every_compiled_kernel`` compares the union of those names with
the kernels compiled into the emulation module, so a launcher table that changes without this file fails here.
About a minute on one core: the emulator runs one block at a time, and these calls are a block or a few each.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import mmap
import re
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch

import pykernels as pk
from pykernels import _backend
from pykernels.reference import attention as ref_attention
from pykernels.reference import flow as ref_flow
from pykernels.reference import graph as ref_graph
from pykernels.reference import neighborhood as ref_neighborhood
from pykernels.testing import TOLERANCES, assert_close, assert_low_precision_error

pytestmark = [pytest.mark.cuda_emulated, pytest.mark.launch_sweep,
              pytest.mark.skipif(not _backend.cuda_emulated(), reason="needs the PYKERNELS_CUDA_EMULATE=1 build")]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW_PRECISION = (torch.float16, torch.bfloat16)
CUDA_TYPE = {torch.float32: "float", torch.float64: "double", torch.float16: "__half",
             torch.bfloat16: "__nv_bfloat16"}

# ------------------------------------------------------------------------------------- the launchers' tables

# attention_tile.cuh, dispatch_head_dim: the head-dim buckets of the dense and windowed attention tiles.
HEAD_DIM_BUCKETS = (32, 64, 96, 128, 192, 256)
# neighborhood_kernel.cu, dispatch_shape: the widest head dim's bucket -> Shape<G, K>.
NEIGHBORHOOD_SHAPES = {16: (4, 4), 32: (8, 4), 64: (16, 4), 128: (32, 4), 256: (32, 8)}
# maxmin_kernel.cu, tile_factor: a size of m, n or k that picks each thread-tile factor r (tile side 16 r).
FLOW_FACTOR_SIZES = {1: 9, 2: 26, 4: 52}
# cuda_utils.cuh, group_size_for and the spmm/sddmm/spmm_arg_backward launchers: with one head, feats picks the
# vector width V (4 when feats % 4 == 0 and the rows are 16-byte aligned) and the group size G, the smallest of
# 4, 8, 16, 32 that covers ceil(feats / V).
GRAPH_FEATS = {(4, 1): 3, (8, 1): 7, (16, 1): 13, (32, 1): 33, (4, 4): 16, (8, 4): 28, (16, 4): 60, (32, 4): 68}
# edge_softmax_kernel.cu: G from group_size_for(num_edges / num_rows); one target with this many edges.
EDGE_SOFTMAX_DEGREES = {4: 3, 8: 6, 16: 12, 32: 20}
# cuda_utils.cuh, dispatch_vector_tile (graph attention): the widest head dim's bucket -> (G, K).
GRAPH_ATTENTION_TILES = {8: (8, 1), 16: (16, 1), 32: (32, 1), 64: (32, 2), 128: (32, 4), 256: (32, 8)}
# coo_to_csr_count/fill: the index types of csr_kernel.cu.
INDEX_TYPES = {torch.int32: "int", torch.int64: "long"}


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[], None]
    kernels: tuple[str, ...]  # kernel_key() of every kernel the call must launch


# ------------------------------------------------------------------------------------------ kernel names

def _demangler():
    lib = ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
    # free as the process resolves it (ASan's, when ./run.sh sanitize preloads it, which also made the malloc
    # inside __cxa_demangle): libc's own free on ASan's memory aborts.
    libc = ctypes.CDLL(None)
    fn = lib.__cxa_demangle
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    libc.free.argtypes = [ctypes.c_void_p]

    def demangle(mangled: str) -> str | None:
        status = ctypes.c_int(0)
        ptr = fn(mangled.encode(), None, None, ctypes.byref(status))
        if status.value != 0 or not ptr:
            return None
        try:
            return ctypes.string_at(ptr).decode()
        finally:
            libc.free(ptr)

    return demangle


_demangle = _demangler()


@functools.lru_cache(maxsize=None)
def kernel_key(mangled: str) -> str | None:
    """``family::name<args>`` without spaces (``attn::dq_kernel<(attn::GradMode)0,float,96>``,
    ``spmm_sum_kernel<float,4,1>``, ``iota_kernel``), or None for a function that is not a kernel (its name does
    not end in ``_kernel``: helpers, lambdas inside kernels, the emulator's launch twins)."""
    name = _demangle(mangled)
    if name is None or not name.endswith(")"):
        return None
    depth = 0
    for i in range(len(name) - 1, -1, -1):  # the parameter list: the last balanced (...) group
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            name = name[:i]
            break
    # Templates' mangled names carry the return type, plain functions' do not.
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "").replace("pk::cuda::", "")
    name = name.replace(" ", "")
    return name if re.fullmatch(r"(\w+::)*\w+_kernel(<.*>)?", name) and not name.startswith("cub::") else None


def launched() -> dict[str, int]:
    counts: dict[str, int] = {}
    for mangled, n in _emulated().launch_counts().items():
        key = kernel_key(mangled)
        if key is not None:
            counts[key] = counts.get(key, 0) + n
    return counts


def _emulated():
    from pykernels import _cuda_emulated
    return _cuda_emulated


def _elf_function_symbols(path: Path) -> list[str]:
    """The defined function symbols of an ELF64 little-endian shared object's .symtab (kernels live in anonymous
    namespaces: local symbols, absent from the dynamic symbol table)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:4] == b"\x7fELF" and m[4] == 2 and m[5] == 1, f"{path}: not an ELF64 little-endian object"
        shoff, = struct.unpack_from("<Q", m, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", m, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", m, shoff + i * shentsize) for i in range(shnum)]
        names = []
        for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
            if sh_type != 2:  # SHT_SYMTAB
                continue
            strtab = sections[link][4]
            for pos in range(offset, offset + size, entsize):
                st_name, st_info, _, st_shndx, _, _ = struct.unpack_from("<IBBHQQ", m, pos)
                if st_info & 0xF == 2 and st_shndx != 0:  # STT_FUNC, defined
                    end = m.find(b"\0", strtab + st_name)
                    names.append(m[strtab + st_name:end].decode())
        return names


# ------------------------------------------------------------------------------------------ comparisons

def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _check(engine_fn, reference_fn, inputs, dtype, *, scale=(4, 16), eager=True, eager_atol=1e-3):
    """engine_fn(*inputs) against reference_fn on float64 copies: outputs, then the gradients of every input for
    random upstream gradients. fp16/bf16 with ``eager`` follow flash-attention's rule (at most twice the error of
    reference_fn run in that dtype, plus eager_atol); otherwise the dtype's tolerance times ``scale`` (outputs,
    gradients)."""
    outs = _tuple(engine_fn(*inputs))
    leaves64 = [x.detach().double().requires_grad_() for x in inputs]
    wants = _tuple(reference_fn(*leaves64))
    upstream = [_rand(*o.shape, dtype=dtype, seed=100 + i) for i, o in enumerate(outs)]
    grads = torch.autograd.grad(outs, inputs, upstream)
    want_grads = torch.autograd.grad(wants, leaves64, [u.double() for u in upstream])
    judged_by_eager = eager and dtype in LOW_PRECISION
    if judged_by_eager:
        eager_leaves = [x.detach().requires_grad_() for x in inputs]
        eager_outs = _tuple(reference_fn(*eager_leaves))
        eager_grads = torch.autograd.grad(eager_outs, eager_leaves, upstream)
    checks = [(f"output {i}", outs[i], wants[i], eager_outs[i] if judged_by_eager else None, scale[0])
              for i in range(len(outs))]
    checks += [(f"grad of input {i}", grads[i], want_grads[i], eager_grads[i] if judged_by_eager else None, scale[1])
               for i in range(len(inputs))]
    for what, got, want, eager_value, s in checks:
        assert got.dtype == dtype and got.shape == want.shape, what
        if judged_by_eager:
            assert_low_precision_error(got, want, eager_value.detach(), atol=eager_atol, msg=what)
        else:
            assert_close(got, want, dtype, scale=s, msg=what)


# ------------------------------------------------------------------------------------------ attention family

def _attention(dtype, bucket):
    # D just inside the bucket and odd (the products' padded tail; q and k rows take the tile loads' element-wise
    # path), Dv at its top (v and dO take the 16-byte path): the forward and backward bucket by max(D, Dv), the map
    # and its backward by D. 33 queries and 35 keys span two row and column
    # tiles of the large buckets' plans; causal, two query heads on one kv head and a full bias reach the diagonal
    # skip, the group loop of the dk/dv pass and the bias gradient.
    q = _rand(1, 2, 33, bucket - 5, dtype=dtype, seed=1).requires_grad_()
    k = _rand(1, 1, 35, bucket - 5, dtype=dtype, seed=2).requires_grad_()
    v = _rand(1, 1, 35, bucket, dtype=dtype, seed=3).requires_grad_()
    bias = _rand(1, 2, 33, 35, dtype=dtype, seed=4).requires_grad_()
    _check(lambda q, k, v, b: pk.fused_attention(q, k, v, attn_bias=b, causal=True, return_attn_mean=True,
                                                 backend="cuda"),
           lambda q, k, v, b: ref_attention.attention(q, k, v, b, True, q.size(-1) ** -0.5, return_attn_mean=True),
           (q, k, v, bias), dtype)


def _window(dtype, bucket):
    # A 6 x 5 grid in 5 x 5 windows shifted by 2 rows: two windows of 25 positions (two row and column tiles of the
    # large buckets' plans), pad tokens, the shift mask, two heads and a bias table. D odd and Dv at the bucket's
    # top, as for _attention: both paths of the gathers.
    n, d = 30, bucket - 5
    q, k = _rand(1, 2, n, d, dtype=dtype, seed=1), _rand(1, 2, n, d, dtype=dtype, seed=2)
    v, table = _rand(1, 2, n, bucket, dtype=dtype, seed=3), _rand(81, 2, dtype=dtype, seed=4)
    inputs = tuple(x.requires_grad_() for x in (q, k, v, table))
    _check(lambda q, k, v, t: pk.window_attention(q, k, v, (6, 5), 5, 2, rel_pos_bias=t, backend="cuda"),
           lambda q, k, v, t: pk.window_attention(q, k, v, (6, 5), 5, 2, rel_pos_bias=t, backend="reference"),
           inputs, dtype)


def _neighborhood(dtype, bucket):
    # A 6 x 10 grid, 3 x 3 neighbourhoods dilated by 2 along y: two residue classes, two tiles along x.
    n, d = 60, bucket - 4
    q, k = _rand(1, 1, n, d, dtype=dtype, seed=1), _rand(1, 1, n, d, dtype=dtype, seed=2)
    v, rpb = _rand(1, 1, n, bucket, dtype=dtype, seed=3), _rand(1, 5, 5, dtype=dtype, seed=4)
    inputs = tuple(x.requires_grad_() for x in (q, k, v, rpb))
    _check(lambda q, k, v, r: pk.neighborhood_attention_2d(q, k, v, (6, 10), 3, (2, 1), rel_pos_bias=r,
                                                           backend="cuda"),
           lambda q, k, v, r: ref_neighborhood.neighborhood_attention_2d(q, k, v, (6, 10), 3, (2, 1), r),
           inputs, dtype)


def _attention_cases():
    for dtype in DTYPES:
        t = CUDA_TYPE[dtype]
        for b in HEAD_DIM_BUCKETS:
            grads = [f"attn::{name}_kernel<(attn::GradMode){mode},{t},{b}>"
                     for mode in (0, 1) for name in ("dq", "dkv")]
            yield Case(f"attention-{t}-{b}", functools.partial(_attention, dtype, b),
                       (f"attn::forward_kernel<{t},{b}>", f"attn::map_kernel<{t},{b}>",
                        f"attn::row_dot_kernel<{t},{b}>", f"attn::delta_kernel<{t}>", *grads))
            yield Case(f"window-{t}-{b}", functools.partial(_window, dtype, b),
                       (f"win::forward_kernel<{t},{b}>", f"win::dq_kernel<{t},{b}>", f"win::dkv_kernel<{t},{b}>",
                        f"win::reduce_groups_kernel<{t}>", f"win::fold_table_kernel<{t}>"))
        for b, (g, kk) in NEIGHBORHOOD_SHAPES.items():
            shape = f"win::Shape<{g},{kk}>"
            yield Case(f"neighborhood-{t}-{b}", functools.partial(_neighborhood, dtype, b),
                       (f"win::forward_kernel<{t},{shape}>", f"win::query_kernel<{t},{shape}>",
                        f"win::key_kernel<{t},{shape}>", f"win::rpb_grad_kernel<{t}>"))


# ----------------------------------------------------------------------------------------------- flow family

def _flow(dtype, soft, m, n):
    # k = n: the gradient of a runs [m, k] tiles, that of b (out^T = b^T (max, min) a^T) [n, k] tiles.
    g = torch.Generator().manual_seed(m * 100 + n)
    a = torch.rand(1, m, n, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.rand(1, n, n, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    if soft:
        _check(lambda a, b: pk.soft_maxmin_matmul(a, b, 0.1, backend="cuda"),
               lambda a, b: ref_flow.soft_maxmin_matmul(a, b, 0.1), (a, b), dtype, scale=(1, 10),
               eager_atol=TOLERANCES[dtype][0])
    else:
        _check(lambda a, b: pk.maxmin_matmul(a, b, backend="cuda"), ref_flow.maxmin_matmul, (a, b), dtype,
               scale=(1, 1), eager=False)


def _flow_cases():
    for dtype in DTYPES:
        t = CUDA_TYPE[dtype]
        for soft in (False, True):
            s = str(soft).lower()
            for rm, m in FLOW_FACTOR_SIZES.items():
                for rn, n in FLOW_FACTOR_SIZES.items():
                    yield Case(f"flow-{t}-{'soft' if soft else 'hard'}-{rm}x{rn}",
                               functools.partial(_flow, dtype, soft, m, n),
                               (f"flow::forward_kernel<{t},{s},{rm},{rn}>",
                                f"flow::grad_left_kernel<{t},{s},{rm},{rn}>",
                                f"flow::grad_left_kernel<{t},{s},{rn},{rn}>"))


# ---------------------------------------------------------------------------------------------- graph family

# Four nodes, every target's edges from distinct sources, node 3 with none: no two messages into a target tie, so
# max/min pick the same edge as the float64 reference in every dtype (w * x is exact in the accumulation type).
EDGES = torch.tensor([[0, 1, 2, 1, 3, 0], [0, 0, 1, 1, 2, 2]])
NODES = 4


def _spmm(dtype, feats, reduce):
    x = _rand(NODES, feats, dtype=dtype, seed=1).requires_grad_()
    w = _rand(EDGES.size(1), dtype=dtype, seed=2).requires_grad_()

    def reference(x, w):
        out, _ = ref_graph.spmm(EDGES[1], EDGES[0], NODES, x.view(NODES, 1, feats), w.unsqueeze(1), reduce)
        return out.view(NODES, feats)

    _check(lambda x, w: pk.spmm(EDGES, x, w, reduce, backend="cuda"), reference, (x, w), dtype, scale=(4, 8),
           eager=False)


def _edge_softmax(dtype, degree):
    # One target with `degree` sources: num_edges / num_rows picks the group size.
    edges = torch.stack([torch.arange(degree), torch.zeros(degree, dtype=torch.long)])
    graph = pk.CSR.from_edge_index(edges, num_nodes=(degree, 1))
    scores = (_rand(degree, dtype=dtype, seed=3) * 3).requires_grad_()
    _check(lambda s: pk.edge_softmax(graph, s, backend="cuda"),
           lambda s: ref_graph.edge_softmax(edges[1], s.view(degree, 1), 1).view(degree), (scores,), dtype,
           scale=(1, 4), eager=False)


def _graph_attention(dtype, bucket):
    d = bucket - 3
    q, k = _rand(NODES, 1, d, dtype=dtype, seed=1), _rand(NODES, 1, d, dtype=dtype, seed=2)
    v, bias = _rand(NODES, 1, bucket, dtype=dtype, seed=3), _rand(EDGES.size(1), 1, dtype=dtype, seed=4)
    inputs = tuple(x.requires_grad_() for x in (q, k, v, bias))
    _check(lambda q, k, v, b: pk.graph_attention(EDGES, q, k, v, edge_bias=b, backend="cuda"),
           lambda q, k, v, b: ref_graph.graph_attention(EDGES[1], EDGES[0], NODES, q, k, v, d ** -0.5, b)[0],
           inputs, dtype, scale=(4, 16), eager=False)


def _scatter(index_dtype):
    # The emulated engine builds a scatter's grouping itself: its COO -> CSR kernels for this index type.
    src = _rand(6, 3, dtype=torch.float32, seed=5).requires_grad_()
    index = torch.tensor([2, 0, 2, 3, 0, 2], dtype=index_dtype)
    result = pk.scatter(src, index, dim_size=4, reduce="max", backend="cuda")
    src64 = src.detach().double().requires_grad_()
    want, want_arg = ref_graph.scatter(src64, index.long(), 4, "max")
    assert torch.equal(result.indices, want_arg)
    upstream = _rand(4, 3, dtype=torch.float32, seed=6)
    (grad,) = torch.autograd.grad(result.values, src, upstream)
    (want_grad,) = torch.autograd.grad(want, src64, upstream.double())
    assert_close(result.values, want, torch.float32)
    assert_close(grad, want_grad, torch.float32)


def _graph_cases():
    for dtype in DTYPES:
        t = CUDA_TYPE[dtype]
        for (g, vec), feats in GRAPH_FEATS.items():
            # sum: spmm_sum forward and for grad x (on the transpose, same width), sddmm for grad w.
            yield Case(f"spmm-sum-{t}-G{g}-V{vec}", functools.partial(_spmm, dtype, feats, "sum"),
                       (f"spmm_sum_kernel<{t},{g},{vec}>", f"sddmm_kernel<{t},{g},{vec}>"))
            yield Case(f"spmm-max-{t}-G{g}-V{vec}", functools.partial(_spmm, dtype, feats, "max"),
                       (f"spmm_arg_kernel<{t},{g},{vec}>", f"grad_x_kernel<{t},{g},{vec}>",
                        f"grad_weight_kernel<{t},{g},{vec}>"))
        for g, degree in EDGE_SOFTMAX_DEGREES.items():
            yield Case(f"edge-softmax-{t}-G{g}", functools.partial(_edge_softmax, dtype, degree),
                       (f"edge_softmax_kernel<{t},{g}>", f"edge_softmax_backward_kernel<{t},{g}>"))
        for b, (g, kk) in GRAPH_ATTENTION_TILES.items():
            yield Case(f"graph-attention-{t}-{b}", functools.partial(_graph_attention, dtype, b),
                       (f"forward_kernel<{t},{g},{kk}>", f"target_pass_kernel<{t},{g},{kk}>",
                        f"source_pass_kernel<{t},{g},{kk}>"))
    for index_dtype, i in INDEX_TYPES.items():
        yield Case(f"scatter-index-{i}", functools.partial(_scatter, index_dtype),
                   (f"count_rows_kernel<{i}>", f"record_bad_edge_kernel<{i}>", f"gather_col_kernel<{i}>",
                    "iota_kernel"))


CASES = [*_attention_cases(), *_flow_cases(), *_graph_cases()]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_instantiation_matches_reference(case):
    before = launched()
    case.run()
    after = launched()
    missing = [k for k in case.kernels if after.get(k, 0) <= before.get(k, 0)]
    assert not missing, f"{case.id} did not launch {missing}; it launched " \
                        f"{sorted(k for k in after if after[k] > before.get(k, 0))}"


def test_sweep_names_every_compiled_kernel():
    compiled = {key for key in map(kernel_key, _elf_function_symbols(Path(_emulated().__file__)))
                if key is not None}
    named = {k for case in CASES for k in case.kernels}
    assert compiled, "no kernels found in the emulation module's symbol table"
    assert not compiled - named, f"kernels no sweep case launches: {sorted(compiled - named)}"
    assert not named - compiled, f"sweep cases name kernels the build lacks: {sorted(named - compiled)}"
