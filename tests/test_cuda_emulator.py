"""The CUDA emulator (csrc/emulation): its detectors against deliberately broken kernels, its PTX twins against
plain matrix products, and real kernel files against plain C++ references.

Each driver in tests/emulation is compiled as an emulated kernel file (g++ with the emulation header
force-included and -fsanitize=thread instrumentation feeding the emulator's access checks), linked with the
emulator runtime and the emulated objects of the kernel files it exercises, and run; it prints one PASS/FAIL line
per case. No torch, GPU or CUDA toolkit is involved.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
DRIVERS = ROOT / "tests" / "emulation"
CXX = os.environ.get("CXX", "g++")

# How any torch-free kernel file compiles for the emulator (see the comment atop csrc/emulation/cuda_emulation.h).
EMULATED_FLAGS = ["-std=c++20", "-O1", "-g", "-x", "c++", "-fsanitize=thread",
                  "--param", "tsan-instrument-func-entry-exit=0", f"-I{CSRC / 'emulation' / 'include'}",
                  f"-I{CSRC}", "-include", str(CSRC / "emulation" / "cuda_emulation.h")]
# The runtime itself is not instrumented: its memory accesses are not the kernels'.
RUNTIME_FLAGS = ["-std=c++20", "-O1", "-g", f"-I{CSRC / 'emulation'}"]

# driver -> kernel files it links
DRIVER_KERNELS = {
    "detectors": [],
    "ptx_twins": [],
    "graph_kernels": ["graph/sddmm_kernel.cu", "graph/spmm_kernel.cu", "graph/csr_kernel.cu"],
    "attention_kernels": ["attention/attention_kernel.cu"],
}

# Every detector must be proven by a broken kernel it catches (a detector that cannot fail is a defect).
REQUIRED_DETECTOR_CASES = [
    "race_shared_write_write", "race_shared_read_write", "race_warp_without_syncwarp",
    "race_global_write_write_across_blocks", "race_global_read_after_write_across_blocks",
    "bounds_shared_past_dynamic_size", "bounds_shared_before_start", "bounds_global_off_by_one",
    "barrier_divergent", "barrier_after_exit", "mask_names_exited_lanes", "mask_names_absent_lanes",
    "mask_source_outside_mask", "uninitialised_static_shared", "uninitialised_dynamic_shared_poisoned",
    "deadlock_detected", "deadlock_spin_times_out", "launch_zero_sized", "launch_grid_y_limit",
    "launch_block_too_large", "launch_shared_memory_opt_in", "launch_shared_memory_arch_limits",
    "launch_error_is_this_launchs", "last_error_is_per_host_thread",
]

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None,
                                reason=f"the CUDA emulator tests compile C++ drivers and {CXX} is not installed")


def _compile(args: list[str], what: str) -> None:
    proc = subprocess.run([CXX, *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"compiling {what} failed:\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cuda_emulator")
    _compile([*RUNTIME_FLAGS, "-c", str(CSRC / "emulation" / "cuda_emulation.cpp"), "-o", str(out / "runtime.o")],
             "the emulator runtime")
    return out


def _build_driver(name: str, out: Path) -> Path:
    objects = [out / "runtime.o"]
    for source in [DRIVERS / f"{name}.cpp", *(CSRC / k for k in DRIVER_KERNELS[name])]:
        obj = out / (source.stem + ".o")
        if not obj.exists():
            _compile([*EMULATED_FLAGS, "-c", str(source), "-o", str(obj)], str(source.relative_to(ROOT)))
        objects.append(obj)
    binary = out / name
    _compile([*map(str, objects), "-o", str(binary), "-ldl"], f"the {name} driver")
    return binary


def _run(binary: Path) -> dict[str, str]:
    env = dict(os.environ, PK_EMU_TIMEOUT_S="2")
    proc = subprocess.run([str(binary)], capture_output=True, text=True, env=env, timeout=300)
    results = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(PASS|FAIL) (\w+)(.*)", line)
        if m:
            results[m.group(2)] = m.group(1) + m.group(3)
    assert results, f"{binary.name} printed no results (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
    assert proc.returncode in (0, 1), f"{binary.name} crashed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return results


@pytest.mark.parametrize("driver", sorted(DRIVER_KERNELS))
def test_emulated_driver(driver, build_dir):
    results = _run(_build_driver(driver, build_dir))
    failures = [f"{case}: {outcome}" for case, outcome in results.items() if not outcome.startswith("PASS")]
    assert not failures, "\n".join(failures)
    if driver == "detectors":
        missing = sorted(set(REQUIRED_DETECTOR_CASES) - set(results))
        assert not missing, f"detector cases missing: {missing}"


def test_watchdog_ends_a_block_that_never_returns_to_the_emulator(build_dir):
    # A loop without memory accesses or barriers never reaches the launch timeout's check; without the watchdog
    # this case hangs the process for good.
    binary = _build_driver("detectors", build_dir)
    proc = subprocess.run([str(binary), "watchdog_ends_an_access_free_loop"], capture_output=True, text=True,
                          env=dict(os.environ, PK_EMU_TIMEOUT_S="1"), timeout=60)
    assert proc.returncode != 0 and "PASS" not in proc.stdout and "FAIL" not in proc.stdout
    assert re.search(r"kernel .*register_loop_kernel\(int\*\), block \(0,0,0\), has run [23] s without a memory access",
                     proc.stderr), proc.stderr


def test_launch_counts_record_the_kernels_an_emulated_op_launches():
    # The record behind tools/check_cuda_kernels.py --launch-coverage (PYKERNELS_EMU_LAUNCHES, tests/conftest.py).
    import torch

    import pykernels as pk
    from pykernels._backend import cuda_emulated

    if not cuda_emulated():
        pytest.skip("needs the PYKERNELS_CUDA_EMULATE=1 build")
    from pykernels import _cuda_emulated

    before = _cuda_emulated.launch_counts()
    edge_index = torch.tensor([[0, 1, 2, 2], [1, 2, 0, 1]])
    pk.spmm(edge_index, torch.randn(3, 5), backend="cuda")
    after = _cuda_emulated.launch_counts()
    grown = {name for name, count in after.items() if count > before.get(name, 0)}
    assert grown and all(name.startswith("_Z") for name in grown)  # mangled, as cuobjdump lists them
    assert any("spmm" in name for name in grown), grown


def test_launch_coverage_matches_kernels_across_the_two_builds_anonymous_namespaces():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_cuda_kernels", ROOT / "tools" / "check_cuda_kernels.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    nvcc = ("_ZN2pk4cuda4attn66_GLOBAL__N__173b7ed0_28_attention_backward_kernel_cu_b0c04690_518312delta_kernelIfEEvNS1_"
            "14BackwardParamsIT_EE")
    gxx = "_ZN2pk4cuda4attn12_GLOBAL__N_112delta_kernelIfEEvNS1_14BackwardParamsIT_EE"
    assert tool.canonical_kernel(nvcc) == tool.canonical_kernel(gxx) != tool.canonical_kernel(gxx.replace("If", "Id"))
    assert tool.canonical_kernel("_ZN2pk4cuda4attn14forward_kernelIfEEvv") == "_ZN2pk4cuda4attn14forward_kernelIfEEvv"
