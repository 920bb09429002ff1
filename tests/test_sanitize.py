"""The sanitized build (PYKERNELS_SANITIZE, ./run.sh sanitize): its CMake option, configure only, and, inside the
sanitized run itself, that the engines under test really are the instrumented ones and that a report fails the run;
then the defects the sanitized run exposed, each a test of the normal suite as well.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pykernels.testing import namespaces

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
# Set by ./run.sh sanitize, with libasan preloaded.
SANITIZED_RUN = os.environ.get("PYKERNELS_SANITIZED") == "1"


def configure(tmp_path, sanitize):
    import pybind11

    cmd = [CMAKE, "-S", str(ROOT), "-B", str(tmp_path / "build"), "-DPYKERNELS_CUDA=off", "-DPYKERNELS_CUDA_EMULATE=ON",
           f"-DPYKERNELS_SANITIZE={sanitize}", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
           f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def compile_commands(tmp_path):
    entries = json.loads((tmp_path / "build" / "compile_commands.json").read_text())
    return {Path(e["file"]).name: e["command"] for e in entries}


@pytest.mark.skipif(CMAKE is None or SANITIZED_RUN, reason="configure-only test of the normal suite")
def test_sanitize_option_instruments_both_modules_and_keeps_the_emulated_kernels_on_tsan(tmp_path):
    rc, out = configure(tmp_path, "address,undefined")
    assert rc == 0, out
    assert "pykernels: sanitizers address,undefined" in out
    commands = compile_commands(tmp_path)
    # The CPU engine, a launcher of the emulated CUDA engine, the emulated module's registrations.
    for engine_file in ("attention_cpu.cpp", "spmm_cuda.cpp", "emulated_module.cpp"):
        assert "-fsanitize=address,undefined" in commands[engine_file], commands[engine_file]
        assert "-fno-sanitize=" not in commands[engine_file], commands[engine_file]
    # An emulated kernel: TSan instrumentation (the emulator's access checks) and UBSan, never ASan with it.
    kernel = commands["graph__spmm_kernel.cu.cpp"]
    assert "-fsanitize=thread" in kernel and "-fno-sanitize=address" in kernel, kernel
    assert kernel.rindex("-fno-sanitize=address") > kernel.rindex("-fsanitize=address,undefined"), kernel
    # The emulator's runtime defines the __tsan_* entry points itself: no sanitizer may declare them.
    runtime = commands["cuda_emulation.cpp"]
    assert runtime.rindex("-fno-sanitize=all") > runtime.rindex("-fsanitize=address,undefined"), runtime


@pytest.mark.skipif(CMAKE is None or SANITIZED_RUN, reason="configure-only test of the normal suite")
def test_an_unsupported_sanitizer_stops_the_configure_with_the_choices(tmp_path):
    rc, out = configure(tmp_path, "address,thread")
    assert rc != 0
    # CMake wraps the message; compare its words.
    assert "'thread' is not supported; expected a comma-separated list of address, undefined" in " ".join(out.split())


@pytest.mark.skipif(not SANITIZED_RUN, reason="runs inside ./run.sh sanitize")
def test_the_engines_under_test_are_the_instrumented_build():
    import pykernels._C as engine
    from pykernels import _backend

    modules = [engine]
    if os.environ.get("PYKERNELS_CUDA_EMULATE", "1").upper() not in ("", "0", "OFF"):
        assert _backend.cuda_emulated(), "the sanitized run must cover the emulated CUDA engine too"
        import pykernels._cuda_emulated as emulated

        modules.append(emulated)
    for module in modules:
        path = Path(module.__file__)
        binary = path.read_bytes()
        assert b"__asan_report_load" in binary and b"__ubsan_handle_" in binary, f"{path} is not instrumented"
    assert "libasan" in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not SANITIZED_RUN, reason="runs inside ./run.sh sanitize")
def test_a_sanitizer_report_fails_the_run():
    # A read past a torch storage (allocated through the intercepted malloc) by an intercepted memmove: the
    # runtime options of the run must turn the report into a failing exit, not a line in a log.
    code = ("import ctypes, torch\n"
            "t = torch.zeros(4096, dtype=torch.uint8)\n"
            "out = ctypes.create_string_buffer(8192)\n"
            "ctypes.memmove(out, t.data_ptr(), 4096 + 64)\n"
            "print('not caught')\n")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "not caught" not in proc.stdout, proc.stdout + proc.stderr
    assert "heap-buffer-overflow" in proc.stderr, proc.stderr


# Defects the sanitized run exposes, each kept as a test of the normal suite too.

# The C++ launchers' namespaces: the CPU engine and, in an emulation build, the CUDA engine's (same entry checks).
CPP_NAMESPACES = [ns for ns in namespaces() if ns != "pykernels_triton"]


@pytest.mark.parametrize("namespace", CPP_NAMESPACES)
def test_direct_neighborhood_calls_whose_geometry_overflows_int64_are_refused(namespace):
    # The entry checks multiplied, then compared: a wrapped product passed them, and the engine ran on the bogus
    # geometry (a segfault in the normal build; UBSan's signed-overflow report in the sanitized one).
    op = getattr(torch.ops, namespace).neighborhood_attention_2d
    q = torch.randn(1, 1, 12, 4)
    with pytest.raises(RuntimeError, match=r"kernel_size \* dilation along height \(4611686018427387905 \* 4\) "
                                           r"exceeds the map's height 12"):
        op(q, q, q, [12, 1], [2**62 + 1, 1], [4, 1], None, 1.0)
    empty = torch.randn(1, 1, 0, 4)
    with pytest.raises(RuntimeError, match=r"spatial_shape \[4294967296, 4294967296\] holds more tokens than int64"):
        op(empty, empty, empty, [2**32, 2**32], [1, 1], [1, 1], None, 1.0)


@pytest.mark.parametrize("namespace", CPP_NAMESPACES)
def test_direct_window_calls_whose_geometry_overflows_int64_are_refused(namespace):
    op = getattr(torch.ops, namespace).window_attention
    empty = torch.randn(1, 1, 0, 4)
    with pytest.raises(RuntimeError, match=r"spatial_shape \[4294967296, 4294967296\] has more cells than int64"):
        op(empty, empty, empty, [2**32, 2**32], [7, 7], [0, 0], None, None, None, False, 1.0)
    # A window of 2^62 x 2^62 positions on a 2 x 2 grid: its position count wrapped to 0.
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"window \[4611686018427387904, 4611686018427387904\] must not exceed "
                                           r"spatial_shape \[2, 2\]"):
        op(q, q, q, [2, 2], [2**62, 2**62], [0, 0], None, None, None, False, 1.0)
