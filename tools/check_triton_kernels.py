#!/usr/bin/env python3
"""Compile every Triton kernel of pykernels ahead of time for sm_80 and sm_90, no GPU needed.

The specialisations come from the host code that launches the kernels, not from a list kept here: the
engine's own wrappers (``pykernels/triton/*.py``) are driven on meta tensors with ``JITFunction.run``
replaced by a recorder, so every tile size, ``num_warps``, ``num_stages``, dtype and constexpr flag the host
rules pick for those inputs is captured with the argument specialisation Triton keys its cache on (pointer
dtypes, integer divisibility, ints equal to 1). ``INTERPRETED`` follows the device; the recorder holds it to
False, as on a GPU.

The inputs (``drive_*()``) are chosen from the host rules so that every branch of them is reached: each
dtype, each padded head-dim class, token counts that give full and clamped tiles, every flag of each op.
Ragged sizes (not multiples of 16) come first, so where one tile has several divisibility variants the
covering subset keeps the one without vector loads, which needs the most registers.

Compiling all of them takes hours on 2 cores, so by default a covering subset is compiled (``covering()``);
``--full`` compiles every one. Each is compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``;
ptxas's ``-v`` report gives registers and spill bytes, the kernel metadata its shared memory. Fails (exit 1)
on any compile error, on shared memory above the arch's per-block opt-in limit, or when a @triton.jit
``*_kernel`` of pykernels.triton is launched by no driver; spills are reported, not fatal.

    python tools/check_triton_kernels.py [--jobs N] [--arch 80 90] [--full] [--kernel NAME] [--match REGEX]
                                         [--limit N] [--list]
"""
from __future__ import annotations

import os

# The gate compiles real GPU code: the interpreter would turn every @triton.jit into an InterpretedFunction.
os.environ.pop("TRITON_INTERPRET", None)

import argparse
import contextlib
import io
import multiprocessing
import re
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

ARCHS = (80, 90)
# Shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Launch options the recorder keeps (the rest of run()'s keyword arguments are kernel arguments).
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass(frozen=True)
class Spec:
    """One kernel specialisation, keyed as Triton's launch cache keys it (the binder's specialisation list and
    the launch options). Turning it into a signature for triton.compile is left to the compile step: it is
    the slow part of recording, and most recorded specialisations are never compiled in CI."""
    kernel: str  # module:qualname, the key of triton's JIT function registry
    key: str  # repr of the binder's specialisation list
    options: tuple  # ((name, value), ...): num_warps, num_stages
    constexprs: tuple = field(compare=False)  # ((name, value), ...) of the declared tl.constexpr parameters
    dtypes: tuple = field(compare=False)  # the pointer arguments' types, "*fp16", ...
    specialization: list = field(compare=False)
    bound: tuple = field(compare=False)  # ((name, value), ...); tensors, which no constexpr path reaches, as None

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[1]

    def config(self) -> str:
        """The pointer dtypes, constexprs and launch options, as the table shows them."""
        dtypes = sorted({t[1:] for t in self.dtypes} - {"i64", "i32"})
        parts = [f"{k}={_short(v)}" for k, v in self.constexprs if k != "INTERPRETED"]
        parts += [f"{k}={v}" for k, v in self.options]
        return f"[{'/'.join(dtypes)}] " + " ".join(parts)

    def compile_args(self, backend):
        """(signature, constexprs, attrs) for ASTSource, as JITFunction.run derives them."""
        fn = triton_jit._triton_jit_function_registry[self.kernel]
        _, signature, constexprs, attrs = fn._pack_args(backend, dict(self.options), dict(self.bound),
                                                        self.specialization, {})
        return signature, constexprs, attrs


def _short(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    text = str(value)
    return text.replace("triton.language.", "").replace("fp", "f")


class Recorder:
    """Replaces JITFunction.run: binds the arguments as Triton does for a launch, keeps the specialisation,
    and launches nothing (outputs stay uninitialised, which the host code never reads back)."""

    def __init__(self):
        self.specs: dict[Spec, int] = {}
        self.kernels: set[str] = set()
        self.backend = make_backend(GPUTarget("cuda", ARCHS[-1], 32))
        self._binders = {}

    def run(self, fn, *args, grid, warmup, **kwargs):
        if "INTERPRETED" in kwargs:
            kwargs["INTERPRETED"] = False
        binder = self._binders.get(fn)
        if binder is None:
            binder = self._binders[fn] = triton_jit.create_function_from_signature(fn.signature, fn.params,
                                                                                   self.backend)
        bound, specialization, _ = binder(*args, **kwargs)
        if bound.get("INTERPRETED"):
            raise RuntimeError(f"{fn._fn_name}: INTERPRETED reached the kernel as True")
        launch = tuple((k, kwargs[k]) for k in LAUNCH_OPTIONS if k in kwargs)
        name = f"{fn.module}:{fn.fn.__qualname__}"
        declared = tuple((p.name, bound[p.name]) for p in fn.params if p.is_constexpr)
        dtypes = tuple(entry[0] for entry in specialization
                       if isinstance(entry[0], str) and entry[0].startswith("*"))
        light = tuple((k, None if isinstance(v, torch.Tensor) else v) for k, v in bound.items())
        spec = Spec(name, repr(specialization), launch, declared, dtypes, specialization, light)
        self.specs[spec] = self.specs.get(spec, 0) + 1
        self.kernels.add(name)
        return None


@contextlib.contextmanager
def recording():
    recorder = Recorder()
    original = triton_jit.JITFunction.run

    def run(fn, *args, grid, warmup, **kwargs):
        return recorder.run(fn, *args, grid=grid, warmup=warmup, **kwargs)

    triton_jit.JITFunction.run = run
    try:
        yield recorder
    finally:
        triton_jit.JITFunction.run = original


# ------------------------------------------------------------------------------------------ the drivers


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# (q/k, v) head dims the window and neighbourhood drivers take: every tile bucket up to 256, one not a power of
# two, and one q/k head dim unlike v's.
LOCAL_HEAD_DIMS = ((16, 16), (32, 32), (40, 40), (64, 64), (128, 128), (256, 256), (64, 128))


def _t(*shape, dtype=torch.float32):
    # Meta tensors: the host code allocates and reduces (window's bias-gradient partials) for free.
    return torch.empty(shape, dtype=dtype, device="meta")


def drive_attention():
    from pykernels.triton import attention as A
    # Padded head-dim classes 16..256 (the tile table's rows), with a head dim that is not a multiple of 16
    # (40, stable diffusion's) next to the ones that are, and one q/k head dim unlike v's. Wider heads are
    # refused by the host code (A.MAX_HEAD_DIM, checked below): the 256 row's tiles would not fit them. Query/key
    # counts: ragged and large (full tiles), 9 and 20 (tiles clamped to 16 and 32), a single query against many
    # keys (decoding), and the reverse.
    dims = [(16, 16), (32, 32), (40, 40), (64, 64), (80, 80), (128, 128), (256, 256), (64, 128)]
    tokens = [(197, 197), (9, 9), (20, 20), (1, 197), (197, 9)]
    wide = A.MAX_HEAD_DIM + 8
    try:
        A.attention(_t(1, 1, 9, wide), _t(1, 1, 9, wide), _t(1, 1, 9, wide), None, False, 0.125)
    except ValueError:
        pass
    else:
        raise AssertionError(f"the triton attention host code launched head dim {wide}, wider than its tiles hold")
    for dtype in FLOATS:
        lse_dtype = A._lse_dtype(dtype)
        for d, dv in dims:
            for nq, nk in tokens:
                # Every flag on every tile would cost compile time without adding a tile: the full flag
                # product runs on the largest tiles, clamped tiles with the flags that add the most code.
                full = (nq, nk) == (197, 197)
                flag_sets = [(b, c, g) for b in (False, True) for c in (False, True) for g in (False, True)] if full \
                    else [(True, True, True)]
                q, k, v = _t(1, 2, nq, d, dtype=dtype), _t(1, 1, nk, d, dtype=dtype), _t(1, 1, nk, dv, dtype=dtype)
                out, lse = _t(1, 2, nq, dv, dtype=dtype), _t(1, 2, nq, dtype=lse_dtype)
                gmap = _t(1, nq, nk, dtype=dtype)
                for has_bias, causal, bias_grad in flag_sets:
                    bias = _t(1, 2, nq, nk, dtype=dtype) if has_bias else None
                    A.attention(q, k, v, bias, causal, 0.125)
                    A.attention_backward(q, k, v, bias, out, lse, out, causal, 0.125, bias_grad)
                    A.attention_map(q, k, bias, lse, causal, 0.125)
                    A.attention_map_backward(q, k, bias, lse, gmap, causal, 0.125, bias_grad)


def drive_window():
    from pykernels.triton import window as W
    # Windows of n = 4 .. 256 tokens: fused (one tile holds the window) and tiled backward, shifted or not,
    # table / dense / no bias, padded k/v or not; head dims as for dense attention up to 256.
    cases = [((8, 8), (2, 2), (0, 0)), ((14, 14), (7, 7), (3, 3)), ((12, 12), (12, 12), (6, 6)),
             ((16, 16), (8, 8), (4, 4)), ((16, 16), (16, 16), (0, 0)), ((6, 6), (5, 3), (2, 1))]
    for dtype in FLOATS:
        lse_dtype = W._lse_dtype(dtype)
        for d, dv in LOCAL_HEAD_DIMS:
            for spatial, window, shift in cases:
                n_tok = spatial[0] * spatial[1]
                heads = 2
                n = window[0] * window[1]
                full = window in ((7, 7), (12, 12))
                combos = [(bias, pad, smask) for bias in ("table", "dense", None) for pad in (False, True)
                          for smask in (False, True)] if full else [("table", False, True)]
                q, k, v = (_t(1, heads, n_tok, d, dtype=dtype), _t(1, heads, n_tok, d, dtype=dtype),
                           _t(1, heads, n_tok, dv, dtype=dtype))
                out, lse = _t(1, heads, n_tok, dv, dtype=dtype), _t(1, heads, n_tok, dtype=lse_dtype)
                for bias, pad, smask in combos:
                    if pad and d != dv:
                        continue
                    table = _t((2 * window[0] - 1) * (2 * window[1] - 1), heads, dtype=dtype) if bias == "table" \
                        else None
                    dense = _t(heads, n, n, dtype=dtype) if bias == "dense" else None
                    pad_kv = _t(2, heads, d, dtype=dtype) if pad else None
                    args = (q, k, v, spatial, window, shift, table, dense, pad_kv, smask, 0.125)
                    W.window_attention(*args)
                    W.window_attention_backward(*args, out, lse, out, True)


def drive_neighborhood():
    from pykernels.triton import neighborhood as N
    # Kernel sizes 3 .. 13 (BLOCK_K 16 caps from 9 keys on), dilation, maps shorter than 2 kernels (where
    # the key pass's span grows), head dims 16 .. 256 and one q/k head dim unlike v's.
    cases = [((16, 16), (3, 3), (1, 1)), ((20, 20), (7, 7), (1, 1)), ((24, 24), (7, 7), (2, 2)),
             ((13, 13), (13, 13), (1, 1)), ((10, 12), (5, 9), (1, 1))]
    for dtype in FLOATS:
        lse_dtype = N._lse_dtype(dtype)
        for d, dv in LOCAL_HEAD_DIMS:
            for spatial, kernel, dilation in cases:
                n_tok = spatial[0] * spatial[1]
                q, k, v = (_t(1, 2, n_tok, d, dtype=dtype), _t(1, 2, n_tok, d, dtype=dtype),
                           _t(1, 2, n_tok, dv, dtype=dtype))
                out, lse = _t(1, 2, n_tok, dv, dtype=dtype), _t(1, 2, n_tok, dtype=lse_dtype)
                rpbs = (None, _t(2, 2 * kernel[0] - 1, 2 * kernel[1] - 1, dtype=dtype))
                for rpb in rpbs:
                    N.neighborhood_attention_2d(q, k, v, spatial, kernel, dilation, rpb, 0.125)
                    for rpb_grad in ((False, True) if rpb is not None else (False,)):
                        N.neighborhood_attention_2d_backward(q, k, v, spatial, kernel, dilation, rpb, 0.125, out,
                                                             lse, out, rpb_grad)


def drive_flow():
    from pykernels.triton import flow as F
    # Sizes that give each block the rule can pick (4 .. 64, and the backward's 32 cap), hard and soft.
    sizes = [3, 8, 13, 24, 40, 100]
    for dtype in FLOATS:
        lse_dtype = F._lse_dtype(dtype)
        for m in sizes:
            for n in sizes:
                k = 37
                a, b = _t(1, m, k, dtype=dtype), _t(1, k, n, dtype=dtype)
                grad = _t(1, m, n, dtype=dtype)
                F.maxmin_matmul(a, b)
                F.maxmin_matmul_backward(a, b, torch.empty((1, m, n), dtype=torch.int32, device="meta"), grad, True, True)
                F.soft_maxmin_matmul(a, b, 0.5)
                F.soft_maxmin_matmul_backward(a, b, grad, _t(1, m, n, dtype=lse_dtype), grad, 0.5, True, True)


def drive_graph():
    from pykernels.triton import graph as G
    # Mean degrees that give each edge block (8 .. 64) and feature widths 1 .. 256 (BLOCK_F caps at 128).
    num_rows = 50
    degrees = [3, 12, 24, 50]
    widths = [(1, 3), (1, 16), (2, 20), (4, 64), (1, 128), (2, 128)]
    for dtype in FLOATS:
        lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for degree in degrees:
            num_edges = num_rows * degree - 1
            rowptr = _t(num_rows + 1, dtype=torch.long)
            col = _t(num_edges, dtype=torch.long)
            for heads, feats in widths:
                x = _t(num_rows, heads, feats, dtype=dtype)
                w = _t(num_edges, heads, dtype=dtype)
                for weight in (None, w):
                    for reduce in G._REDUCES:
                        out, arg = G.spmm(rowptr, col, rowptr, col, col, weight, x, reduce)
                        if reduce in ("max", "min"):
                            G.spmm_arg_backward(rowptr, col, rowptr, col, col, weight, arg, out, x,
                                                weight is not None)
                G.sddmm(rowptr, col, rowptr, col, col, x, x)
                G.edge_softmax(rowptr, w)
                G.edge_softmax_backward(rowptr, w, w)
                lse = _t(num_rows, heads, dtype=lse_dtype)
                for bias in (None, w):
                    G.graph_attention(rowptr, col, rowptr, col, col, x, x, x, bias, 0.125)
                    for bias_grad in (False, True):
                        G.graph_attention_backward(rowptr, col, rowptr, col, col, x, x, x, bias, x, lse, x, 0.125,
                                                   bias_grad)


DRIVERS = (drive_attention, drive_window, drive_neighborhood, drive_flow, drive_graph)


def collect() -> Recorder:
    """Every specialisation the host rules launch for the drivers' inputs."""
    import pykernels.triton.attention  # noqa: F401  (the kernels must be JIT functions before recording)
    with recording() as recorder:
        for driver in DRIVERS:
            driver()
    return recorder


def _tile_and_flags(spec: Spec):
    """(tile key, flags, tile size) of a specialisation. Flags are the declared int/bool constexprs other than
    BLOCK_* (HAS_BIAS, CAUSAL, BIAS=0/1/2, ...); the tile key is the rest of them (blocks, accumulator,
    precision), the pointer dtypes and the launch options."""
    tile, flags, size = [], [], 1
    for name, value in spec.constexprs:
        if name == "INTERPRETED":
            continue
        if name.startswith("BLOCK_"):
            size *= value
            tile.append((name, value))
        elif isinstance(value, (bool, int)):
            flags.append((name, int(value)))
        else:
            tile.append((name, value))
    return (spec.kernel, spec.dtypes, tuple(tile), spec.options), tuple(flags), size


def covering(specs: list[Spec]) -> list[Spec]:
    """The CI subset of the recorded specialisations, a covering set of the tile rules' outputs: per kernel,
    every flag combination at its largest tile; per kernel, dtypes and num_warps/num_stages the rules pick,
    the largest tile that goes with them, with every flag set (the most code). A tile inside a larger one
    at the same warps needs no more registers or shared memory, so what is left out is smaller tiles,
    other flag sets on them and integer-divisibility variants of a tile (the first one recorded is kept;
    the drivers record ragged sizes first). --full compiles all of them."""
    groups: dict = {}
    for spec in specs:
        tile, flags, size = _tile_and_flags(spec)
        groups.setdefault(tile, {"size": size, "flags": {}})["flags"].setdefault(flags, []).append(spec)
    keep = []

    def add(tile, flags):
        keep.append(groups[tile]["flags"][flags][0])

    by_kernel, by_launch = {}, {}
    for tile in groups:
        by_kernel.setdefault(tile[0], []).append(tile)
        by_launch.setdefault((*tile[:2], tile[3]), []).append(tile)
    chosen = set()
    for tiles in by_kernel.values():
        largest = max(tiles, key=lambda t: (groups[t]["size"], t[3]))
        chosen.update((largest, flags) for flags in groups[largest]["flags"])
    for tiles in by_launch.values():
        largest = max(tiles, key=lambda t: groups[t]["size"])
        flag_sets = groups[largest]["flags"]
        chosen.add((largest, max(flag_sets, key=lambda f: sum(v for _, v in f))))
    for tile, flags in chosen:
        add(tile, flags)
    return keep


def jit_kernels() -> set[str]:
    """Every @triton.jit function of pykernels.triton that is launched (named *_kernel), module:qualname."""
    import importlib
    import pkgutil
    import pykernels.triton as package
    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, triton_jit.JITFunction) and value.module == module.__name__ \
                    and name.endswith("_kernel"):
                found.add(f"{module.__name__}:{name}")
    return found


# ------------------------------------------------------------------------------------------ compilation


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): what a compile costs on an idle core,
    which wall time on a shared machine does not show."""
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


def compile_spec(job):
    """(index, arch, ok, regs, spill stores, spill loads, shared bytes, CPU seconds, error text)."""
    index, spec, arch = job
    from triton import knobs
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    fn = triton_jit._triton_jit_function_registry[spec.kernel]
    target = GPUTarget("cuda", arch, 32)
    src = ASTSource(fn, *spec.compile_args(make_backend(target)))
    start = time.perf_counter()
    cpu = _cpu_seconds()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=dict(spec.options))
    except Exception as exc:  # noqa: BLE001 - every compile error is reported, whatever its type
        return index, arch, False, 0, 0, 0, 0, _cpu_seconds() - cpu, f"{type(exc).__name__}: {exc}"
    seconds = _cpu_seconds() - cpu
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = _SPILLS.search(text)
    return (index, arch, True, int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0,
            int(spills.group(2)) if spills else 0, kernel.metadata.shared, seconds, "")


def _import_kernels():
    # A pool worker started by fork already has them; one started by spawn must import them to fill
    # triton's registry before compile_spec looks a kernel up.
    os.environ.pop("TRITON_INTERPRET", None)
    jit_kernels()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="compiles in parallel (default 2)")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--kernel", action="append", help="only kernels with this name (repeatable)")
    parser.add_argument("--match", help="only specialisations whose table config matches this regular expression")
    parser.add_argument("--limit", type=int, help="at most this many specialisations per kernel (smallest first)")
    parser.add_argument("--full", action="store_true",
                        help="every recorded specialisation, not the covering subset CI compiles")
    parser.add_argument("--list", action="store_true", help="print each kernel's specialisation count, compile none")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    recorder = collect()
    specs = list(recorder.specs) if args.full else covering(list(recorder.specs))
    launches = sum(recorder.specs.values())
    missing = sorted(jit_kernels() - recorder.kernels)
    if args.kernel:
        specs = [s for s in specs if s.name in args.kernel]
    if args.match:
        specs = [s for s in specs if re.search(args.match, s.config())]
    if args.limit:
        by_kernel = {}
        for spec in sorted(specs, key=lambda s: (s.name, len(s.config()), s.config())):
            by_kernel.setdefault(spec.kernel, []).append(spec)
        specs = [s for group in by_kernel.values() for s in group[:args.limit]]
    specs.sort(key=lambda s: (s.kernel, s.config()))
    print(f"check_triton_kernels: {launches} launches recorded, {len(recorder.specs)} unique specialisations of "
          f"{len(recorder.kernels)} kernels, {len(specs)} compiled per arch"
          f"{'' if args.full else ' (covering subset; --full for all)'} ({time.perf_counter() - start:.1f} s)",
          flush=True)
    print("recorded kernels: " + " ".join(sorted(recorder.kernels)))
    if missing:
        print("check_triton_kernels: no driver launches " + ", ".join(missing))
    if args.list:
        counts = {}
        for spec in specs:
            counts[spec.kernel] = counts.get(spec.kernel, 0) + 1
        for kernel, count in sorted(counts.items()):
            print(f"{kernel} {count}")
        return 1 if missing else 0

    jobs = [(i, spec, arch) for arch in args.arch for i, spec in enumerate(specs)]
    # The largest tiles (the slowest compiles) first, so the pool does not end waiting on one.
    jobs.sort(key=lambda j: -_tile_and_flags(j[1])[2])
    results = []
    with tempfile.TemporaryDirectory(prefix="pk_triton_gate_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        context = multiprocessing.get_context("fork")
        with context.Pool(args.jobs, initializer=_import_kernels) as pool:
            for done, result in enumerate(pool.imap_unordered(compile_spec, jobs, chunksize=1), 1):
                results.append(result)
                if done % 100 == 0:
                    print(f"  {done}/{len(jobs)} compiled ({time.perf_counter() - start:.0f} s)", flush=True)
    results.sort(key=lambda r: (specs[r[0]].kernel, specs[r[0]].config(), r[1]))

    failures, over = [], []
    print(f"\n{'kernel':<28} {'arch':<5} {'regs':>4} {'spill st/ld B':>13} {'smem B':>7}  config")
    for index, arch, ok, regs, st, ld, shared, seconds, error in results:
        spec = specs[index]
        if not ok:
            failures.append((spec, arch, error))
            print(f"{spec.name:<28} sm_{arch} FAIL  {spec.config()}")
            continue
        flag = ""
        if shared > SMEM_LIMIT[arch]:
            over.append((spec, arch, shared))
            flag = "  OVER SMEM LIMIT"
        spill = f"{st}/{ld}" if st or ld else "-"
        print(f"{spec.name:<28} sm_{arch} {regs:>4} {spill:>13} {shared:>7}  {spec.config()}{flag}")

    print("\nsummary:")
    for arch in args.arch:
        mine = [r for r in results if r[1] == arch]
        spilling = [r for r in mine if r[2] and (r[4] or r[5])]
        worst = max(spilling, key=lambda r: r[4], default=None)
        line = (f"  sm_{arch}: {len(mine)} specialisations, {sum(not r[2] for r in mine)} failed, "
                f"{sum(1 for s, a, _ in over if a == arch)} over {SMEM_LIMIT[arch]} B shared, "
                f"{len(spilling)} spill")
        if worst:
            line += f" (worst: {specs[worst[0]].name} {worst[4]} B stored, {specs[worst[0]].config()})"
        print(line)
    slowest = max(results, key=lambda r: r[7], default=None)
    if slowest:
        print(f"  slowest compile {slowest[7]:.1f} CPU s: {specs[slowest[0]].name} sm_{slowest[1]} "
              f"{specs[slowest[0]].config()}")
    cpu = sum(r[7] for r in results)
    print(f"  compiles took {cpu:.0f} CPU s ({cpu / args.jobs:.0f} s on {args.jobs} idle cores); wall time "
          f"{time.perf_counter() - start:.0f} s with {args.jobs} jobs, recording included")
    for spec, arch, error in failures:
        print(f"\n---- {spec.name} sm_{arch} {spec.config()} ----\n{error}")
    if missing:
        print(f"\ncheck_triton_kernels: no driver launches {', '.join(missing)}: give it a driver in drive_*()")
    return 1 if failures or over or missing else 0


if __name__ == "__main__":
    sys.exit(main())
