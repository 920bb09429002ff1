"""The build and the package: extension loads, engines are reported, CLI works, schemas are declared once."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pykernels as pk
from pykernels import _backend, _graph_ops
from pykernels.testing import engines_for

ROOT = Path(__file__).resolve().parents[1]


def test_extension_reports_its_build():
    info = pk.info()
    assert info["engines"]["cpu"] is True
    assert info["torch_built_with"] == torch.__version__
    assert info["engines"]["cuda"] == _backend.cuda_built()
    if not info["engines"]["cuda"]:
        assert info["cuda_status"]


def test_cli_info_prints_engines_and_versions():
    out = subprocess.run([sys.executable, "-m", "pykernels", "info"], check=True, capture_output=True, text=True,
                         cwd=ROOT).stdout
    assert "engines: cpu=yes" in out and torch.__version__ in out and "threads" in out


def test_info_reports_whether_the_cuda_engine_runs_emulated():
    assert pk.info()["cuda_emulated"] == _backend.cuda_emulated()
    assert ("cuda" in engines_for("cpu")) == _backend.cuda_emulated()
    out = subprocess.run([sys.executable, "-m", "pykernels", "info"], check=True, capture_output=True, text=True,
                         cwd=ROOT).stdout
    assert re.search(r"cuda_emulated: " + ("yes" if _backend.cuda_emulated() else "no"), out)


def test_every_graph_op_has_a_cpu_kernel_and_a_triton_twin():
    # Fake kernels are exercised by opcheck in test_graph_ops.py.
    for op in _graph_ops.GRAPH_OPS:
        for ns in _graph_ops.NAMESPACES:
            handle = getattr(getattr(torch.ops, ns), op).default
            assert torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CPU"), (ns, op)
        assert str(getattr(torch.ops.pykernels_triton, op).default._schema).split("::")[1] == \
            str(getattr(torch.ops.pykernels, op).default._schema).split("::")[1]


def test_schemas_are_declared_once_in_cpp():
    declared = re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "registration.cpp").read_text())
    assert sorted(declared) == sorted(set(declared))
    assert set(_graph_ops.GRAPH_OPS) <= set(declared)


def test_cuda_kernel_files_are_torch_free():
    for path in ROOT.glob("csrc/**/*_kernel.cu"):
        text = path.read_text()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), path


def test_auto_backend_choice():
    assert _backend.select("op", "auto", torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.select("op", "fast", torch.device("cpu"))


def test_deterministic_switch_follows_torch():
    assert not pk.is_deterministic()
    pk.set_deterministic(True)
    try:
        assert pk.is_deterministic()
    finally:
        pk.set_deterministic(False)
    torch.use_deterministic_algorithms(True)
    try:
        assert pk.is_deterministic()
    finally:
        torch.use_deterministic_algorithms(False)


def test_threads_are_respected():
    ei = torch.randint(0, 500, (2, 5000))
    x = torch.randn(500, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pk.spmm(ei, x)
        torch.set_num_threads(max(before, 2))
        many = pk.spmm(ei, x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.skipif(os.environ.get("PYKERNELS_CUDA_EMULATE", "0").upper() in ("", "0", "OFF"),
                    reason="the CUDA emulation was not asked for in this build")
def test_an_emulation_build_loads_its_module():
    # Without this a failed import would silently drop every emulated test (engines_for would not list cuda).
    assert pk.info()["cuda_emulated"], _backend.BUILD_INFO
    from pykernels.testing import engines_for

    assert "cuda" in engines_for("cpu")


def test_cpu_kernels_are_compiled_with_the_parallel_backend_torch_uses():
    # at::parallel_for is inline: compiled without -fopenmp against an OpenMP torch, every CPU kernel runs on one
    # thread while giving the same results (this once cost the whole CPU engine half its speed on 2 cores).
    if "OpenMP" in torch.__config__.parallel_info():
        assert _backend.BUILD_INFO["openmp"] is True
