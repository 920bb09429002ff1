"""The memory claims, tested: each fused op's peak allocator bytes (forward + backward) grow only with what it
must keep, not with the tensor the fused design removes, measured at two sizes.

Peak bytes are those of ``pykernels.bench.timing.peak_memory_mb``, the benchmarks' own measure (the torch
allocator's events on CPU, replayed in order; ``max_memory_allocated`` on CUDA). Every check is paired with
the plain reference at the same sizes, which does build the removed tensor: the same measurement must see
it grow there, or the check could not fail.

* fused attention: no ``[B, H, Nq, Nk]`` scores: peak linear in the token count (reference: quadratic).
* head-mean map: no per-head ``[Nq, Nk]`` maps: each extra head adds far less than one map.
* window attention: no ``[windows, area, area]`` scores: peak flat in the window area.
* (max, min) and soft (max, min) products: no ``[m, k, n]`` tensor: peak grows as the ``[m, n]`` output
  and the operands (square in the side), not as its cube.
* graph attention: no ``[E, H, D]`` gathered keys and values: each extra edge adds far less than one row.
"""
import pytest
import torch

import pykernels as pk
from pykernels.bench.timing import peak_memory_mb
from pykernels.testing import random_graph

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The fused engine of each device, and the reference that materialises what the fused engine removes.
ENGINES = {"cpu": "cpu", "cuda": "auto"}


def _peak_bytes(op, make, device) -> float:
    """Peak bytes above the inputs of one forward and backward of ``op`` on the inputs ``make`` returns."""
    inputs = [t.to(device).requires_grad_(t.is_floating_point()) for t in make()]
    grad_inputs = [t for t in inputs if t.requires_grad]

    def step():
        out = op(*inputs)
        out = out[-1] if isinstance(out, tuple) else out
        torch.autograd.grad(out, grad_inputs, torch.ones_like(out), allow_unused=True)

    step()  # first-call work (lazy init, caches) is not what is measured
    return peak_memory_mb(step, torch.device(device)) * 2**20


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))


def _rand(*shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(len(shape)))


def _both(op, make_small, make_large, device):
    """(fused peak ratio, reference peak ratio) of the large inputs over the small ones."""
    ratios = []
    for engine in (ENGINES[device], "reference"):
        small = _peak_bytes(lambda *a: op(*a, backend=engine), make_small, device)
        large = _peak_bytes(lambda *a: op(*a, backend=engine), make_large, device)
        ratios.append(large / small)
    return ratios


@pytest.mark.attention
@pytest.mark.parametrize("device", DEVICES)
def test_fused_attention_memory_is_linear_in_tokens(device):
    def op(q, k, v, backend):
        return pk.fused_attention(q, k, v, backend=backend)

    fused, reference = _both(op, lambda: [_randn(1, 2, 256, 16) for _ in range(3)],
                             lambda: [_randn(1, 2, 1024, 16) for _ in range(3)], device)
    # 4x the tokens: linear is 4x, quadratic 16x.
    assert fused < 5, f"fused attention peak grew {fused:.1f}x for 4x the tokens (linear: 4x)"
    assert reference > 12, f"the reference grew only {reference:.1f}x: the measurement misses the scores"


@pytest.mark.attention
@pytest.mark.parametrize("device", DEVICES)
def test_head_mean_map_memory_does_not_hold_per_head_maps(device):
    tokens = 256

    def op(q, k, v, backend):
        return pk.fused_attention(q, k, v, return_attn_mean=True, backend=backend)

    per_head = {}
    for engine in (ENGINES[device], "reference"):
        one, eight = (_peak_bytes(lambda *a: op(*a, backend=engine),
                                  lambda h=h: [_randn(1, h, tokens, 16) for _ in range(3)], device) for h in (1, 8))
        per_head[engine] = (eight - one) / 7
    one_map = tokens * tokens * 4
    # Each head adds its q, k, v gradients and statistics, a few [tokens, 16] rows: well under a map.
    assert per_head[ENGINES[device]] < one_map / 2, (
        f"each extra head adds {per_head[ENGINES[device]] / one_map:.2f} of a [{tokens}, {tokens}] map")
    assert per_head["reference"] > one_map, (
        f"the reference adds only {per_head['reference'] / one_map:.2f} of a map per head: the measurement "
        "misses the per-head maps")


@pytest.mark.window
@pytest.mark.parametrize("device", DEVICES)
def test_window_attention_memory_is_flat_in_the_window_area(device):
    def op(window):
        return lambda q, k, v, backend: pk.window_attention(q, k, v, (32, 32), window, window // 2, backend=backend)

    ratios = {}
    for engine in (ENGINES[device], "reference"):
        small, large = (_peak_bytes(lambda *a, w=w: op(w)(*a, backend=engine),
                                    lambda: [_randn(1, 2, 1024, 8) for _ in range(3)], device) for w in (4, 16))
        ratios[engine] = large / small
    # 16x the window area: the reference's scores grow 16x; the fused engine's peak is the map's outputs.
    assert ratios[ENGINES[device]] < 2, f"window attention peak grew {ratios[ENGINES[device]]:.1f}x with the area"
    assert ratios["reference"] > 6, f"the reference grew only {ratios['reference']:.1f}x: scores not seen"


@pytest.mark.flow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("soft", [False, True], ids=["maxmin", "soft_maxmin"])
def test_maxmin_products_memory_is_quadratic_not_cubic(device, soft):
    def op(a, b, backend):
        if soft:
            return pk.soft_maxmin_matmul(a, b, 0.1, backend=backend)
        return pk.maxmin_matmul(a, b, backend=backend)

    fused, reference = _both(op, lambda: [_rand(2, 32, 32) for _ in range(2)],
                             lambda: [_rand(2, 128, 128) for _ in range(2)], device)
    # 4x every side: the output and operands grow 16x, the [m, k, n] tensor 64x.
    assert fused < 20, f"the product's peak grew {fused:.1f}x for 4x the side (operands: 16x)"
    assert reference > 40, f"the reference grew only {reference:.1f}x: the [m, k, n] tensor is not seen"


@pytest.mark.graph
@pytest.mark.parametrize("device", DEVICES)
def test_graph_attention_memory_per_edge_is_far_below_a_feature_row(device):
    nodes, heads, dim = 256, 2, 64
    graphs = {e: pk.CSR.from_edge_index(random_graph(nodes, e, seed=e).to(device), nodes) for e in (1024, 8192)}

    def op(graph):
        return lambda q, k, v, backend: pk.graph_attention(graph, q, k, v, backend=backend)

    per_edge = {}
    for engine in (ENGINES[device], "reference"):
        small, large = (_peak_bytes(lambda *a, g=g: op(g)(*a, backend=engine),
                                    lambda: [_randn(nodes, heads, dim) for _ in range(3)], device)
                        for g in graphs.values())
        per_edge[engine] = (large - small) / (8192 - 1024)
    row = heads * dim * 4
    # Per edge the fused engine keeps at most a few per-head scalars (scores, weights).
    assert per_edge[ENGINES[device]] < row / 4, (
        f"graph attention adds {per_edge[ENGINES[device]]:.0f} bytes per edge; an [H, D] row is {row}")
    assert per_edge["reference"] > row, (
        f"the reference adds only {per_edge['reference']:.0f} bytes per edge: the gathered rows are not seen")
