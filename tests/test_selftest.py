"""python -m pykernels selftest: runs in CI on the CPU (every engine this build has), and can fail."""
import subprocess
import sys

import torch

import pykernels as pk
from pykernels import selftest
from pykernels.testing import random_graph


def test_selftest_cli_on_cpu_passes_for_every_engine_here():
    proc = subprocess.run([sys.executable, "-m", "pykernels", "selftest", "--device", "cpu", "--size", "small",
                           "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("selftest on cpu: all") and "cpu" in last.split("engines")[1]
    for case in selftest.CASES:
        assert f"| {case.name} |" in proc.stdout


def test_a_wrong_engine_fails_its_row_and_the_verdict():
    def off_by_a_little(x, edge_index, *, backend):
        out = pk.spmm(edge_index, x, backend=backend)
        return out if backend == "reference" else out * (1 + 1e-3)

    def make(size, g):
        return [torch.randn(37, 2, 5, generator=g, dtype=torch.float64)], [random_graph(37, 150)]

    case = selftest.Case("graph", "spmm sum (broken)", make, off_by_a_little)
    row = selftest.run_case(case, "small", torch.float32, "cpu", torch.device("cpu"))
    assert not row.passed and row.forward > 1
    assert "FAILED 1 of 1" in selftest.verdict([row], "cpu")


def test_an_engine_that_raises_is_a_failed_row_not_a_crash():
    def raises(x, *, backend):
        if backend != "reference":
            raise RuntimeError("kernel launch failed")
        return x * 2

    case = selftest.Case("graph", "raises", lambda size, g: ([torch.randn(3, generator=g, dtype=torch.float64)], []),
                         raises)
    row = selftest.run_case(case, "small", torch.float32, "cpu", torch.device("cpu"))
    assert not row.passed and "RuntimeError: kernel launch failed" in row.error
