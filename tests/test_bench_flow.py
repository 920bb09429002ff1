"""The attention-flow benchmark compares like with like: the fused and the broadcast products agree."""
import pytest
import torch

from pykernels.bench import flow as flow_bench
from pykernels.bench.runner import markdown_table, run_family

pytestmark = pytest.mark.flow

TINY = [flow_bench.ProductSpec("tiny", 3, 5, 4, 7)]


def test_products_and_their_broadcast_baselines_agree():
    cases = flow_bench.cases(torch.device("cpu"), quick=True, spec_list=TINY)
    assert {(c.name.split(" · ")[0], c.mode) for c in cases} == {
        (f"{kind} (max, min) product", mode) for kind in ("hard", "soft") for mode in ("fwd", "fwd+bwd")}
    for case in cases:
        if case.mode != "fwd":
            continue
        ours, broadcast = case.providers["pykernels"](), case.providers["broadcast (Vico's formulation)"]()
        torch.testing.assert_close(ours, broadcast, atol=1e-6, rtol=1e-5, msg=case.name)


def test_broadcast_formulations_match_the_reference():
    from pykernels.reference import flow as ref
    a, b = torch.rand(2, 5, 4, dtype=torch.float64), torch.rand(2, 4, 6, dtype=torch.float64)
    assert torch.equal(flow_bench.broadcast_maxmin(a, b), ref.maxmin_matmul(a, b))
    torch.testing.assert_close(flow_bench.broadcast_soft_maxmin(a, b, 0.05), ref.soft_maxmin_matmul(a, b, 0.05))


def test_broadcasts_too_big_for_the_machine_are_reported_not_run(monkeypatch):
    monkeypatch.setattr(flow_bench, "_memory_budget", lambda: 0)
    monkeypatch.setattr(flow_bench, "SPECS", TINY)
    monkeypatch.setattr(flow_bench.max_flow, "cases", lambda device, quick: [])
    rows = run_family("flow", torch.device("cpu"), quick=True, min_run_time=0.001)
    broadcast = [r for r in rows if r["provider"].startswith("broadcast")]
    assert broadcast and all(r["error"].startswith("not run: needs about") for r in broadcast)
    assert all(r["error"] is None and "speedup" not in r for r in rows if r["provider"] == "pykernels")
    assert "failed: not run" in markdown_table(rows)
