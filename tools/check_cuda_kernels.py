#!/usr/bin/env python3
"""Compile every CUDA kernel file (csrc/**/*_kernel.cu) with nvcc for sm_80 and sm_90.

The kernel files are torch-free, so this needs only nvcc, not a GPU or a CUDA build of torch: it is how
machines without either (CI, laptops) keep the CUDA engine compiling. The launchers (csrc/**/*_cuda.cpp)
need torch's CUDA headers; where torch is importable they are syntax-checked with the host compiler
against its headers (a CPU wheel ships them too). Prints one line per file and exits non-zero, with the
compiler's output, if any file fails.

--resource-usage reads a built extension instead (default: the importable pykernels._C) and prints each
CUDA kernel's registers, stack frame, local memory and static shared memory per arch, from
``cuobjdump --dump-resource-usage``: the SASS CMake built is what runs, and reading it costs about a
second where recompiling with ``-Xptxas -v`` would cost the whole CUDA build again. ptxas keeps spilled
registers in the stack frame, so STACK > 0 flags a kernel that spills (or keeps a local array); the exact
spill bytes are in ptxas's ``-v`` report only. Exits non-zero above the arch's shared-memory limit.

    python tools/check_cuda_kernels.py [--jobs N] [--allow-missing]
    python tools/check_cuda_kernels.py --resource-usage [EXTENSION.so]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("80", "90")


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


# Shared memory one block may opt into: A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {"80": 163 * 1024, "90": 227 * 1024}


def find_cuobjdump() -> str | None:
    nvcc = find_nvcc()
    candidates = [shutil.which("cuobjdump"), nvcc and str(Path(nvcc).with_name("cuobjdump"))]
    try:  # Triton ships one next to its ptxas
        import triton
        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).is_file()), None)


def resource_usage(cuobjdump: str, binary: Path) -> list[tuple[str, str, dict[str, int]]]:
    """(arch, mangled kernel, {REG, STACK, SHARED, LOCAL, ...}) for every kernel's SASS in the binary."""
    text = subprocess.run([cuobjdump, "--dump-resource-usage", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    rows, arch, function = [], None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = sm_"):
            arch = line.removeprefix("arch = sm_")
        elif line.startswith("Function ") and line.endswith(":"):
            function = line[len("Function "):-1]
        elif function and line.startswith("REG:"):
            rows.append((arch, function, {k: int(v) for k, v in re.findall(r"([A-Z]+)(?:\[\d+\])?:(\d+)", line)}))
            function = None
    return rows


def short_names(mangled: list[str]) -> dict[str, str]:
    """Demangled names without the anonymous-namespace noise; mangled ones where c++filt is missing."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not mangled:
        return {m: m for m in mangled}
    out = subprocess.run([cxxfilt], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    clean = [re.sub(r"\(anonymous namespace\)::|pk::cuda::", "", name) for name in out]
    return dict(zip(mangled, clean))


def built_kernels(binary: Path | None) -> tuple[Path, list[tuple[str, str, dict[str, int]]]] | None:
    """The extension (the installed pykernels._C by default) and resource_usage() of its kernels, or None after
    saying why there are none."""
    if binary is None:
        try:
            import pykernels._C as ext
        except ImportError as exc:
            print(f"check_cuda_kernels: pykernels._C not importable ({exc}); pass the extension's path")
            return None
        binary = Path(ext.__file__)
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("check_cuda_kernels: cuobjdump not found (PATH, next to nvcc, or triton's bundled one)")
        return None
    rows = resource_usage(cuobjdump, binary)
    if not rows:
        print(f"check_cuda_kernels: {binary} holds no CUDA kernels (a CPU-only build?)")
        return None
    return binary, rows


def report_resources(binary: Path | None) -> int:
    built = built_kernels(binary)
    if built is None:
        return 1
    binary, rows = built
    names = short_names(sorted({m for _, m, _ in rows}))
    print(f"check_cuda_kernels: resource usage of {len(rows)} kernels in {binary}\n")
    print(f"{'arch':<5} {'regs':>4} {'stack B':>7} {'local B':>7} {'smem B':>7}  kernel")
    over = []
    for arch, mangled, usage in sorted(rows, key=lambda r: (names[r[1]], r[0])):
        flag = ""
        if usage.get("SHARED", 0) > SMEM_LIMIT.get(arch, 0):
            over.append((arch, names[mangled]))
            flag = "  OVER SMEM LIMIT"
        print(f"sm_{arch} {usage.get('REG', 0):>4} {usage.get('STACK', 0):>7} {usage.get('LOCAL', 0):>7} "
              f"{usage.get('SHARED', 0):>7}  {names[mangled]}{flag}")
    print("\nsummary:")
    for arch in sorted({r[0] for r in rows}):
        mine = [u for a, _, u in rows if a == arch]
        print(f"  sm_{arch}: {len(mine)} kernels, max {max(u.get('REG', 0) for u in mine)} registers, "
              f"{sum(1 for u in mine if u.get('STACK', 0))} with a stack frame (spills or local arrays), "
              f"max static shared {max(u.get('SHARED', 0) for u in mine)} B, "
              f"{sum(1 for a, _ in over if a == arch)} over the limit")
    return 1 if over else 0


def compile_one(nvcc: str, source: Path, out_dir: Path) -> tuple[Path, bool, float, str]:
    gencode = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    obj = out_dir / (source.relative_to(ROOT).as_posix().replace("/", "_") + ".o")
    cmd = [nvcc, *gencode, "-std=c++17", "-O3", "-I", str(ROOT / "csrc"), "-c", str(source), "-o", str(obj)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, proc.returncode == 0, time.perf_counter() - start, (proc.stdout + proc.stderr).strip()


def launcher_command(source: Path) -> list[str] | None:
    """g++ -fsyntax-only for one launcher, or None when torch's headers are not available."""
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    cuda_home = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{cuda_home / 'include'}", f"-I{ROOT / 'csrc'}"]
    # A CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h; this define skips it.
    return [os.environ.get("CXX", "g++"), "-fsyntax-only", "-std=c++20", "-Wall", "-DPK_WITH_CUDA=1",
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *includes, str(source)]


def check_launcher(source: Path) -> tuple[Path, bool, float, str]:
    start = time.perf_counter()
    proc = subprocess.run(launcher_command(source), capture_output=True, text=True)
    return source, proc.returncode == 0, time.perf_counter() - start, (proc.stdout + proc.stderr).strip()


def canonical_kernel(mangled: str) -> str:
    """A mangled name with each anonymous namespace as one token: g++ names it _GLOBAL__N_1, nvcc after the file
    and a hash (_GLOBAL__N__173b7ed0_28_attention_backward_kernel_cu_...), so the same kernel differs there."""
    out, pos = [], 0
    for match in re.finditer(r"(\d+)_GLOBAL__N_", mangled):
        if match.start() < pos:
            continue
        out.append(mangled[pos:match.start()] + "_ANON_")
        pos = match.end(1) + int(match.group(1))
    return "".join(out) + mangled[pos:]


def report_launch_coverage(record: Path, binary: Path | None, require_all: bool) -> int:
    """Which of the real build's kernels the emulated test runs launched (record: the JSON the test suite writes
    with PYKERNELS_EMU_LAUNCHES set), per kernel family. A kernel never launched is a tile path or dispatch
    branch no emulated test checks: with require_all that fails. A launched name the real build lacks always
    fails: the two builds would then name kernels differently and the comparison would mean nothing."""
    built = built_kernels(binary)
    if built is None:
        return 1
    _, rows = built
    built_names = short_names(sorted({mangled for _, mangled, _ in rows}))
    names = {canonical_kernel(m): name for m, name in built_names.items()}
    # cub's own kernels run as host twins with the same contract in the emulator (csrc/emulation/cub_twins.h).
    compiled = sorted(m for m in names if not names[m].startswith("void cub::"))
    launched_names = short_names(sorted(json.loads(record.read_text())))
    launched = {canonical_kernel(m) for m in launched_names}
    names.update({canonical_kernel(m): name for m, name in launched_names.items() if canonical_kernel(m) not in names})
    families: dict[str, list[int]] = {}
    for mangled in compiled:
        head = names[mangled].removeprefix("void ").split("(")[0].split("<")[0]
        family = head.rsplit("::", 1)[0] if "::" in head else "graph, csr"
        counts = families.setdefault(family, [0, 0])
        counts[0] += mangled in launched
        counts[1] += 1
    print(f"check_cuda_kernels: emulated launches of the {len(compiled)} kernels the CUDA build compiles, cub's "
          f"left out (record {record})\n")
    for family, (ran, total) in sorted(families.items()):
        print(f"  {family:<16} {ran:>4} of {total:>4} launched")
    never = [names[m] for m in compiled if m not in launched]
    unknown = [names[m] for m in launched if m not in set(compiled)]
    for title, items in (("never launched (no emulated test reaches them)", never),
                         ("launched but not in the CUDA build (names differ between the two builds?)", unknown)):
        if items:
            print(f"\n{title}:")
            print("\n".join(f"  {name}" for name in sorted(items)))
    print(f"\nsummary: {len(compiled) - len(never)} of {len(compiled)} kernels launched")
    return 1 if unknown or (never and require_all) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="files compiled in parallel (default 1)")
    parser.add_argument("--allow-missing", action="store_true", help="exit 0 when nvcc is not installed")
    parser.add_argument("--resource-usage", nargs="?", type=Path, const=True, metavar="EXTENSION",
                        help="print the built extension's per-kernel registers, stack and shared memory instead")
    parser.add_argument("--launch-coverage", type=Path, metavar="RECORD",
                        help="compare the emulated tests' launch record (PYKERNELS_EMU_LAUNCHES) with the kernels "
                             "of the extension given by --resource-usage, or the installed one")
    parser.add_argument("--require-all", action="store_true",
                        help="with --launch-coverage: fail when a kernel was never launched")
    args = parser.parse_args(argv)
    if args.launch_coverage is not None:
        extension = None if args.resource_usage in (None, True) else args.resource_usage
        return report_launch_coverage(args.launch_coverage, extension, args.require_all)
    if args.resource_usage is not None:
        return report_resources(None if args.resource_usage is True else args.resource_usage)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda_kernels: nvcc not found (looked on PATH, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda); "
              + ("skipping" if args.allow_missing else "pass --allow-missing to skip"))
        return 0 if args.allow_missing else 1

    sources = sorted((ROOT / "csrc").rglob("*_kernel.cu"))
    if not sources:
        print("check_cuda_kernels: no csrc/**/*_kernel.cu files found")
        return 1
    print(f"check_cuda_kernels: {len(sources)} files, sm_{' sm_'.join(ARCHS)}, {nvcc}", flush=True)

    failures = []
    with tempfile.TemporaryDirectory(prefix="pk_cuda_check_") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        for source, ok, seconds, output in pool.map(lambda s: compile_one(nvcc, s, Path(tmp)), sources):
            print(f"{'ok  ' if ok else 'FAIL'}  {source.relative_to(ROOT)}  ({seconds:.1f} s)", flush=True)
            if not ok:
                failures.append((source, output))

    launchers = sorted((ROOT / "csrc").rglob("*_cuda.cpp"))
    if launchers and launcher_command(launchers[0]) is None:
        print("check_cuda_kernels: torch not importable, launchers not checked")
    elif launchers:
        with ThreadPoolExecutor(args.jobs) as pool:
            for source, ok, seconds, output in pool.map(check_launcher, launchers):
                print(f"{'ok  ' if ok else 'FAIL'}  {source.relative_to(ROOT)}  (syntax, {seconds:.1f} s)", flush=True)
                if not ok:
                    failures.append((source, output))
    total = len(sources) + len(launchers)

    for source, output in failures:
        print(f"\n---- {source.relative_to(ROOT)} ----\n{output}")
    if failures:
        print(f"\ncheck_cuda_kernels: {len(failures)} of {total} files failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
