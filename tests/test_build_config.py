"""CMake configuration of the extension: which CUDA setups build the CUDA engine, which fall back to the CPU
engine (PYKERNELS_CUDA=auto) or stop (=on), and what each says. Configure only; the full build is CI's."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
pytestmark = pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")


def configure(tmp_path, cuda_mode, **env):
    import pybind11

    cmd = [CMAKE, "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPYKERNELS_CUDA={cuda_mode}",
           f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    environ = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDAARCHS")}
    environ.update(env)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ)
    return proc.returncode, proc.stdout + proc.stderr


def status_line(output):
    return next(line for line in output.splitlines() if "pykernels: torch" in line)


def test_off_builds_the_cpu_engine_only(tmp_path):
    rc, out = configure(tmp_path, "off")
    assert rc == 0, out
    assert "CUDA engines OFF (not built: disabled by PYKERNELS_CUDA=off)" in status_line(out)


@pytest.mark.skipif(not torch.version.cuda, reason="needs a CUDA build of torch")
def test_auto_without_a_cuda_compiler_falls_back_and_says_why(tmp_path):
    rc, out = configure(tmp_path, "auto", CUDACXX=str(tmp_path / "no-nvcc"))
    assert rc == 0, out
    assert "CUDA engines OFF (not built: no working CUDA compiler was found" in status_line(out)


@pytest.mark.skipif(not torch.version.cuda, reason="needs a CUDA build of torch")
def test_on_without_a_cuda_compiler_stops_with_the_reason(tmp_path):
    rc, out = configure(tmp_path, "on", CUDACXX=str(tmp_path / "no-nvcc"))
    assert rc != 0
    assert "PYKERNELS_CUDA=on, but no working CUDA compiler was found" in out and "CUDACXX" in out


@pytest.mark.skipif(not torch.version.cuda or shutil.which("nvcc") is None, reason="needs nvcc and a CUDA torch")
def test_archs_below_sm80_are_refused(tmp_path):
    rc, out = configure(tmp_path, "auto", CUDAARCHS="75;80")
    assert rc != 0
    assert "CUDA architecture 75 is not supported" in out


@pytest.mark.skipif(not torch.version.cuda or shutil.which("nvcc") is None, reason="needs nvcc and a CUDA torch")
def test_auto_with_nvcc_and_a_cuda_torch_builds_the_cuda_engine(tmp_path):
    rc, out = configure(tmp_path, "auto")
    assert rc == 0, out
    line = status_line(out)
    assert "CUDA engines ON (built for archs 80, 90 with nvcc" in line
    # The runtime torch itself loads, not the toolkit's (one CUDA runtime per process).
    if (Path(torch.__file__).parents[1] / "nvidia").is_dir():
        assert "nvidia" in line.split("runtime ")[1]


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_auto_with_a_cpu_torch_builds_the_cpu_engine(tmp_path):
    rc, out = configure(tmp_path, "auto")
    assert rc == 0, out
    assert "is a CPU build" in status_line(out)
