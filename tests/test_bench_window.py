"""The windowed-attention benchmark compares like with like: every provider of a case computes the same
output on the case's own data."""
import pytest
import torch

from pykernels.bench import window as window_bench
from pykernels.bench.runner import run_family

pytestmark = pytest.mark.window

TINY = [window_bench.WindowSpec("tiny swin", "swin", 2, (10, 9), 2, 8, 4, 2),
        window_bench.WindowSpec("tiny msw-msa", "msw-msa", 1, (8, 12), 2, 8, 4),
        window_bench.WindowSpec("tiny neighbourhood", "neighborhood", 1, (7, 9), 2, 8, 3)]


def test_window_bench_providers_agree():
    cases = window_bench.cases(torch.device("cpu"), quick=True, spec_list=TINY)
    assert len(cases) == 2 * len(TINY)
    for case in cases:
        results = {name: fn() for name, fn in case.providers.items()}
        if case.mode != "fwd":
            continue
        spec = next(s for s in TINY if s.label in case.name)
        ours = results.pop("pykernels")
        assert ours.shape == (spec.batch, spec.heads, spec.size[0] * spec.size[1], spec.dim)
        for name, out in results.items():
            if name.startswith("global"):
                continue
            torch.testing.assert_close(out, ours, atol=1e-5, rtol=1e-5, msg=f"{case.name}: {name}")


def test_window_bench_runs_in_the_runner(monkeypatch):
    monkeypatch.setattr(window_bench, "SPECS", TINY)
    rows = run_family("window", torch.device("cpu"), quick=True, min_run_time=0.001)
    assert all(r["error"] is None for r in rows)
    assert sum("speedup" in r for r in rows) >= 2 * len(TINY)
