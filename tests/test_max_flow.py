"""Exact max-flow ops against networkx: layered attention-map DAGs and general directed graphs, plus
errors, thread-count invariance, opcheck and a large case."""
import time

import pytest
import torch

from pykernels._max_flow import max_flow, max_flow_layered
from pykernels.reference.flow import attention_flow, with_residual

nx = pytest.importorskip("networkx")

pytestmark = pytest.mark.flow

ATOL = 1e-9
EXACT_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def _maps(sizes, seed, zeros=0.0, sharpness=2.0):
    """Softmax attention maps for node layers of the given sizes; a fraction ``zeros`` of entries zeroed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        a = torch.softmax(torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * sharpness, -1)
        if zeros:
            a = a * (torch.rand(n_out, n_in, generator=g, dtype=torch.float64) >= zeros)
        out.append(a)
    return out


def _nx_layered(maps, residual):
    caps = [with_residual(a.double(), residual) for a in maps]
    G = nx.DiGraph()
    for l, c in enumerate(caps):
        G.add_nodes_from((l, j) for j in range(c.size(1)))
        G.add_nodes_from((l + 1, i) for i in range(c.size(0)))
        for i in range(c.size(0)):
            for j in range(c.size(1)):
                G.add_edge((l, j), (l + 1, i), capacity=float(c[i, j]))
    L, n_last, n_first = len(caps), caps[-1].size(0), caps[0].size(1)
    return torch.tensor([[nx.maximum_flow_value(G, (0, j), (L, i)) for j in range(n_first)] for i in range(n_last)],
                        dtype=torch.float64)


LAYERED = [
    # (layer sizes, residual, fraction of zeroed entries)
    ([1, 1], 0.5, 0.0),
    ([4, 4], 0.5, 0.0),
    ([1, 1, 1, 1], 0.0, 0.0),
    ([5, 5, 5], 0.5, 0.0),
    ([6, 6, 6, 6, 6], 0.3, 0.5),
    ([3, 3, 3, 3, 3, 3, 3], 0.0, 0.6),
    ([5, 3, 6, 2], 0.0, 0.0),
    ([2, 7, 1, 4], 0.0, 0.3),
    ([7, 7, 7, 7], 1.0, 0.0),
]


@pytest.mark.parametrize("sizes,residual,zeros", LAYERED)
def test_layered_matches_networkx(sizes, residual, zeros):
    maps = _maps(sizes, seed=len(sizes) * 10 + sizes[0], zeros=zeros)
    ours = max_flow_layered(maps, residual=residual)
    assert ours.shape == (sizes[-1], sizes[0]) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, _nx_layered(maps, residual), atol=ATOL, rtol=0)


def test_layered_disconnected():
    maps = _maps([4, 4, 4, 4], seed=3)
    maps[1][:, 2] = 0  # token 2 of layer 1 sends nothing
    maps[2][1] = 0  # token 1 of layer 3 receives nothing (a zero row stays zero)
    maps[0][:, 0] = 0  # token 0 of layer 0 reaches nobody
    ours = max_flow_layered(maps, residual=0.0)
    torch.testing.assert_close(ours, _nx_layered(maps, 0.0), atol=ATOL, rtol=0)
    assert ours[1].abs().max() == 0 and ours[:, 0].abs().max() == 0


def test_layered_queries_match_all_pairs():
    maps = _maps([6, 6, 6, 6], seed=5)
    full = max_flow_layered(maps)
    src = torch.tensor([0, 5, 3, 3, 1], dtype=torch.int32)
    snk = torch.tensor([2, 2, 4, 0, 5])
    torch.testing.assert_close(max_flow_layered(maps, src, snk), full[snk.long(), src.long()], atol=0, rtol=0)
    torch.testing.assert_close(max_flow_layered(maps, 3, snk), full[snk, 3], atol=0, rtol=0)
    assert max_flow_layered(maps, 4, 1).shape == () and float(max_flow_layered(maps, 4, 1)) == float(full[1, 4])
    assert max_flow_layered(maps, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)).shape == (0,)
    torch.testing.assert_close(max_flow_layered(torch.stack(maps)), full, atol=0, rtol=0)


def test_layered_batch_dims():
    g = torch.Generator().manual_seed(7)
    maps = [torch.softmax(torch.randn(2, 3, 5, 5, generator=g), -1) for _ in range(3)]
    out = max_flow_layered(maps)
    assert out.shape == (2, 3, 5, 5)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(out[b, h], max_flow_layered([a[b, h] for a in maps]), atol=0, rtol=0)
    assert max_flow_layered(maps, torch.tensor([0, 4]), torch.tensor([1, 1])).shape == (2, 3, 2)


@pytest.mark.parametrize("seed", range(4))
def test_hard_flow_is_a_lower_bound(seed):
    # The best single path is a feasible flow, so the (max, min) chain never exceeds the exact value.
    maps = _maps([8] * 7, seed=seed, sharpness=1.0 + seed)
    exact = max_flow_layered(maps, residual=0.5)
    hard = attention_flow(maps, "hard", residual=0.5)
    assert bool((hard <= exact + 1e-12).all())
    # ... and no flow beats the first layer's out-capacity or the last layer's in-capacity.
    caps = [with_residual(a, 0.5) for a in maps]
    bound = torch.minimum(caps[0].sum(0)[None, :], caps[-1].sum(1)[:, None])
    assert bool((exact <= bound + 1e-12).all())


def _random_graph(num_nodes, num_edges, seed, zero_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    ei[:, : num_edges // 10] = ei[:, num_edges // 10: 2 * (num_edges // 10)]  # parallel edges
    ei[1, -3:] = ei[0, -3:]  # self loops
    cap = torch.rand(num_edges, generator=g, dtype=torch.float64) * 3
    cap[torch.rand(num_edges, generator=g) < zero_fraction] = 0
    return ei, cap


def _nx_general(ei, cap, num_nodes, sources, sinks):
    G = nx.DiGraph()
    G.add_nodes_from(range(num_nodes))
    for (u, v), c in zip(ei.t().tolist(), cap.tolist()):
        if u == v:
            continue
        if G.has_edge(u, v):
            G[u][v]["capacity"] += c
        else:
            G.add_edge(u, v, capacity=c)
    return torch.tensor([nx.maximum_flow_value(G, s, t) for s, t in zip(sources.tolist(), sinks.tolist())],
                        dtype=torch.float64)


@pytest.mark.parametrize("num_nodes,num_edges,seed", [(2, 3, 0), (6, 12, 1), (20, 60, 2), (40, 300, 3), (60, 150, 4)])
def test_general_matches_networkx(num_nodes, num_edges, seed):
    ei, cap = _random_graph(num_nodes, num_edges, seed)
    g = torch.Generator().manual_seed(seed + 100)
    src = torch.randint(0, num_nodes, (12,), generator=g)
    snk = (src + torch.randint(1, num_nodes, (12,), generator=g)) % num_nodes
    ours = max_flow(ei, cap, src, snk, num_nodes=num_nodes)
    torch.testing.assert_close(ours, _nx_general(ei, cap, num_nodes, src, snk), atol=ATOL, rtol=0)
    torch.testing.assert_close(max_flow(ei.int(), cap.float(), src, snk, num_nodes=num_nodes),
                               _nx_general(ei, cap.float().double(), num_nodes, src, snk), atol=1e-6, rtol=0)


def test_general_scalar_queries_and_isolated_nodes():
    ei = torch.tensor([[0, 0, 1, 2, 1, 3], [1, 2, 2, 3, 3, 0]])
    cap = torch.tensor([3.0, 2.0, 1.0, 2.0, 1.5, 7.0])
    assert max_flow(ei, cap, 0, 3).shape == () and float(max_flow(ei, cap, 0, 3)) == 3.5
    assert float(max_flow(ei, cap, 3, 1)) == 3.0  # through the cycle 3 -> 0 -> 1
    assert float(max_flow(ei, cap, 0, 5)) == 0.0  # node 5 exists only because it is queried
    assert float(max_flow(ei, cap, 4, 0, num_nodes=9)) == 0.0
    torch.testing.assert_close(max_flow(ei, cap, torch.tensor([0, 1]), 3), torch.tensor([3.5, 2.5], dtype=torch.float64))
    empty = torch.empty(2, 0, dtype=torch.long)
    assert float(max_flow(empty, torch.empty(0), 0, 1)) == 0.0


def test_float_capacities_and_tolerance():
    # Capacities spanning 10 orders of magnitude are not rounded to integers ...
    ei = torch.tensor([[0, 0, 1, 2], [1, 2, 3, 3]])
    cap = torch.tensor([1e-7, 1e3, 1.0, 3e-7], dtype=torch.float64)
    assert abs(float(max_flow(ei, cap, 0, 3)) - 4e-7) < 1e-20
    # ... while a residual at or below eps = 1e-12 * (largest capacity) counts as zero, as documented.
    cap[1] = 1e5
    assert float(max_flow(ei, cap, 0, 3)) == 3e-7


# ------------------------------------------------------------------------------------------------ errors


def test_layered_errors():
    maps = _maps([4, 4, 4], seed=0)
    op = "pykernels.max_flow_layered"
    bad = [maps[0].clone(), maps[1]]
    bad[0][1, 2] = float("nan")
    with pytest.raises(ValueError, match=rf"{op}: maps\[0\] holds NaN"):
        max_flow_layered(bad)
    bad[0][1, 2] = float("inf")
    with pytest.raises(ValueError, match=rf"{op}: maps\[0\] holds NaN or infinite"):
        max_flow_layered(bad)
    with pytest.raises(ValueError, match=rf"{op}: maps\[1\] holds negative"):
        max_flow_layered([maps[0], -maps[1]])
    with pytest.raises(TypeError, match=rf"{op}: maps\[0\] must be a floating tensor"):
        max_flow_layered([torch.ones(4, 4, dtype=torch.long), maps[1]])
    with pytest.raises(TypeError, match=rf"{op}: maps must be a sequence"):
        max_flow_layered(3)
    with pytest.raises(ValueError, match=rf"{op}: maps must hold at least one"):
        max_flow_layered([])
    with pytest.raises(ValueError, match=rf"{op}: maps\[1\] has 5 columns"):
        max_flow_layered([torch.rand(4, 4), torch.rand(4, 5)], residual=0)
    with pytest.raises(ValueError, match=rf"{op}: residual=0.5 needs square maps"):
        max_flow_layered([torch.rand(3, 4)])
    with pytest.raises(ValueError, match=rf"{op}: residual must be a number in \[0, 1\]"):
        max_flow_layered(maps, residual=1.5)
    with pytest.raises(ValueError, match=rf"{op}: every map must have the same batch shape"):
        max_flow_layered([torch.rand(2, 4, 4), torch.rand(3, 4, 4)])
    with pytest.raises(ValueError, match=rf"{op}: pass both sources and sinks"):
        max_flow_layered(maps, sources=torch.tensor([0]))
    with pytest.raises(IndexError, match=rf"{op}: sources holds 4, out of range"):
        max_flow_layered(maps, torch.tensor([0, 4]), torch.tensor([0, 1]))
    with pytest.raises(IndexError, match=rf"{op}: sinks holds -1, out of range"):
        max_flow_layered(maps, 0, -1)
    with pytest.raises(ValueError, match=rf"{op}: sources and sinks must have equal length"):
        max_flow_layered(maps, torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match=rf"{op}: sources must be an int or an int32/int64 tensor"):
        max_flow_layered(maps, torch.tensor([0.0]), torch.tensor([1]))
    with pytest.raises(TypeError, match=rf"{op}: sinks must be an int or a 1-D integer tensor"):
        max_flow_layered(maps, 0, 1.0)


def test_general_errors():
    ei = torch.tensor([[0, 1], [1, 2]])
    cap = torch.tensor([1.0, 2.0])
    op = "pykernels.max_flow"
    with pytest.raises(ValueError, match=rf"{op}: capacity holds NaN"):
        max_flow(ei, torch.tensor([1.0, float("nan")]), 0, 2)
    with pytest.raises(ValueError, match=rf"{op}: capacity holds negative"):
        max_flow(ei, torch.tensor([1.0, -2.0]), 0, 2)
    with pytest.raises(TypeError, match=rf"{op}: capacity must be a floating tensor"):
        max_flow(ei, torch.tensor([1, 2]), 0, 2)
    with pytest.raises(ValueError, match=rf"{op}: capacity must have shape \[E\]"):
        max_flow(ei, torch.ones(3), 0, 2)
    with pytest.raises(TypeError, match=rf"{op}: edge_index must be int32 or int64"):
        max_flow(ei.float(), cap, 0, 2)
    with pytest.raises(ValueError, match=rf"{op}: edge_index must have shape \[2, E\]"):
        max_flow(torch.zeros(3, 2, dtype=torch.long), cap, 0, 2)
    with pytest.raises(ValueError, match=rf"{op}: query 1 has source == sink == 2"):
        max_flow(ei, cap, torch.tensor([0, 2]), 2)
    with pytest.raises(IndexError, match=rf"{op}: sink holds 3, out of range for 3 nodes"):
        max_flow(ei, cap, 0, 3, num_nodes=3)
    with pytest.raises(IndexError, match=rf"{op}: edge_index holds 2, out of range for 2 nodes"):
        max_flow(ei, cap, 0, 1, num_nodes=2)
    with pytest.raises(ValueError, match=rf"{op}: num_nodes must be a non-negative int"):
        max_flow(ei, cap, 0, 1, num_nodes=-1)


def test_op_entry_checks():
    """Direct torch.ops calls skip the Python checks; the C++ entry must still refuse bad input."""
    ops = torch.ops.pykernels
    rowptr, col = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 2])
    cap, one, two = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0]), torch.tensor([2])
    with pytest.raises(RuntimeError, match=r"pykernels.max_flow: capacity must be finite and >= 0"):
        ops.max_flow(rowptr, col, torch.tensor([1.0, -1.0]), one, two)
    with pytest.raises(RuntimeError, match=r"pykernels.max_flow: rowptr must be non-decreasing"):
        ops.max_flow(torch.tensor([0, 2, 1, 2]), col, cap, one, two)
    with pytest.raises(IndexError, match=r"pykernels.max_flow: col\[1\] = 5 is out of range"):
        ops.max_flow(rowptr, torch.tensor([1, 5]), cap, one, two)
    with pytest.raises(RuntimeError, match=r"pykernels.max_flow: query 0 has source == sink"):
        ops.max_flow(rowptr, col, cap, two, two)
    with pytest.raises(RuntimeError, match=r"pykernels.max_flow: sources must be int64"):
        ops.max_flow(rowptr, col, cap, one.int(), two)
    a = torch.rand(3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"pykernels.max_flow_layered: capacities\[1\] has 4 columns"):
        ops.max_flow_layered([a, torch.rand(3, 4, dtype=torch.float64)], one, two)
    with pytest.raises(RuntimeError, match=r"pykernels.max_flow_layered: capacities\[0\] must be finite"):
        ops.max_flow_layered([a * float("nan")], one, two)
    with pytest.raises(RuntimeError, match=r"pykernels.max_flow_layered: capacities must hold at least one"):
        ops.max_flow_layered([], one, two)
    with pytest.raises(IndexError, match=r"pykernels.max_flow_layered: sinks\[0\] = 3 is out of range"):
        ops.max_flow_layered([a], one, torch.tensor([3]))


# ------------------------------------------------------------------------------- threads, opcheck, scale


def test_thread_count_invariance():
    # Sizes large enough that the engine splits the queries into several chunks.
    maps = _maps([32] * 9, seed=11)
    ei, cap = _random_graph(2000, 20000, seed=12)
    src, snk = torch.arange(0, 80), torch.arange(1000, 1080)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((max_flow_layered(maps), max_flow(ei, cap, src, snk)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_opcheck():
    maps = [with_residual(a, 0.5) for a in _maps([5, 5, 5, 5], seed=2)]
    src, snk = torch.tensor([0, 1, 4]), torch.tensor([3, 3, 0])
    torch.library.opcheck(torch.ops.pykernels.max_flow_layered.default, (maps, src, snk), test_utils=EXACT_TESTS)
    ei, cap = _random_graph(10, 30, seed=3)
    rowptr, col, perm = torch.ops.pykernels.coo_to_csr(ei[0], ei[1], 10, 10, "test")
    torch.library.opcheck(torch.ops.pykernels.max_flow.default, (rowptr, col, cap[perm], src, snk),
                          test_utils=EXACT_TESTS)


def test_large_cases_scale():
    # A deep path graph (100k nodes) and a deep, narrow layered graph: linear-size work, no recursion.
    n = 100_000
    ei = torch.stack([torch.arange(n - 1), torch.arange(1, n)])
    cap = torch.rand(n - 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    start = time.perf_counter()
    assert float(max_flow(ei, cap, 0, n - 1)) == float(cap.min())
    # Decreasing capacities strand excess at every node: one gap per node, each must cost O(1) amortised.
    assert float(max_flow(ei, torch.arange(n - 1, 0, -1).double() + 1, 0, n - 1)) == 2.0
    deep = max_flow_layered(_maps([4] * 301, seed=1))
    assert bool(torch.isfinite(deep).all()) and bool((deep >= 0).all())
    # The benchmark size, L = 12 and n = 64, on 256 queries.
    maps = _maps([64] * 13, seed=2)
    g = torch.Generator().manual_seed(3)
    src, snk = torch.randint(0, 64, (256,), generator=g), torch.randint(0, 64, (256,), generator=g)
    out = max_flow_layered(maps, src, snk)
    hard = attention_flow(maps, "hard")[snk, src]
    assert bool((hard <= out + 1e-12).all())
    assert time.perf_counter() - start < 20
