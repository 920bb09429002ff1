"""``python -m pykernels bench``: runs each family against its baselines and writes the report."""
from __future__ import annotations

import datetime
import gc
import importlib
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from .._info import info
from .timing import peak_memory_mb, time_cuda, time_interleaved, warm_up

FAMILIES = ("models", "graph", "attention", "flow", "window")


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes only (minutes on a laptop CPU)")
    parser.add_argument("--only", choices=FAMILIES, action="append", help="run only this family (repeatable)")
    parser.add_argument("--match", action="append",
                        help="run only the cases whose name contains this text (repeatable; e.g. 4096×4096)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--output-dir", default="benchmarks/results", help="where the .md report and plots go")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per measurement")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _load_family(name: str):
    return importlib.import_module(f"pykernels.bench.{name}")


class _Progress:
    """tqdm when installed, else one line per measurement."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self._total, self._done, self._desc = total, 0, desc

    def step(self, label: str) -> None:
        """Announces the next case, whose providers are measured together."""
        self._done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label[:60])
            self._bar.update(1)
        else:
            print(f"[{self._desc} {self._done}/{self._total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _failure(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:120]


def _measure(providers: dict, device, min_run_time, interleave: bool) -> dict:
    """{provider: (timing, peak MiB, None)}, or (None, None, why) for a provider whose measurement fails: an OOM or
    an unsupported baseline is a result, not a crash, and the others are still timed.

    On the CPU (and where the case asks for it) the providers are timed in alternation
    (:func:`~pykernels.bench.timing.time_interleaved`), so that load drift does not enter their ratios; on CUDA
    each on its own with CUDA events (:func:`~pykernels.bench.timing.time_cuda`)."""
    results, timings = {}, {}
    try:
        if interleave or device.type != "cuda":
            warm = {}
            for name, fn in providers.items():
                try:
                    warm[name] = warm_up(fn, device)
                except (RuntimeError, MemoryError) as exc:
                    results[name] = (None, None, _failure(exc))
            try:
                measured = time_interleaved([providers[n] for n in warm], device, min_run_time, list(warm.values()))
                timings = dict(zip(warm, measured))
            except (RuntimeError, MemoryError) as exc:
                results.update({name: (None, None, _failure(exc)) for name in warm})
        else:
            for name, fn in providers.items():
                try:
                    timings[name] = time_cuda(fn, min_run_time)
                except (RuntimeError, MemoryError) as exc:
                    results[name] = (None, None, _failure(exc))
        for name, timing in timings.items():
            try:
                results[name] = (timing, peak_memory_mb(providers[name], device), None)
            except (RuntimeError, MemoryError) as exc:
                results[name] = (None, None, _failure(exc))
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {name: results[name] for name in providers}


def run_family(name: str, device: torch.device, quick: bool, min_run_time: float,
               match: list[str] | None = None) -> list[dict]:
    family = _load_family(name)
    cases = [c for c in family.cases(device, quick) if not match or any(text in c.name for text in match)]
    progress = _Progress(len(cases), name)
    rows = []
    for case in cases:
        checked = case.check() if case.check is not None else None
        progress.step(f"{case.name} [{case.mode}] {' vs '.join(case.providers)}")
        results = _measure(case.providers, device, min_run_time, case.interleave)
        ours_name = next(iter(case.providers))
        ours = results[ours_name][0]
        for provider, (timing, peak, error) in results.items():
            row = {"case": case.name, "mode": case.mode, "provider": provider, "error": error}
            if checked is not None and provider == ours_name:
                row["max_diff"], row["served"] = checked
            if timing is not None:
                row.update(median=timing.median_ms, p20=timing.p20_ms, p80=timing.p80_ms, peak=peak)
                if case.bytes_moved:
                    row["gbps"] = case.bytes_moved / (timing.median_ms * 1e-3) / 1e9
                if ours is not None and provider != ours_name:
                    row["speedup"] = timing.median_ms / ours.median_ms
            rows.append(row)
    progress.close()
    return rows


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    checked = any("max_diff" in r for r in rows)
    extra = " max abs diff | served |" if checked else ""
    lines = ["| case | mode | provider | median ms | p20–p80 ms | GB/s | peak MiB | pykernels speed-up |" + extra,
             "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|---|" if checked else "")]
    for r in rows:
        tail = f" {_fmt(r.get('max_diff'), '.1e')} | {r.get('served', '')} |" if checked else ""
        if r["error"]:
            lines.append(f"| {r['case']} | {r['mode']} | {r['provider']} | — | — | — | — | failed: {r['error']} |"
                         + tail)
            continue
        speedup = f"**{r['speedup']:.2f}×**" if "speedup" in r else "(ours)"
        lines.append(f"| {r['case']} | {r['mode']} | {r['provider']} | {r['median']:.3f} | "
                     f"{r['p20']:.3f}–{r['p80']:.3f} | {_fmt(r.get('gbps'), '.1f')} | {r['peak']:.1f} | {speedup} |"
                     + tail)
    return "\n".join(lines)


def plot_family(rows: list[dict], name: str, title: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ratios = [r for r in rows if "speedup" in r]
    if not ratios:
        return False
    labels = [f"{r['case'].split(' · ')[0]} · {r['case'].split(' · ')[-1].split(' (')[0]} [{r['mode']}]\nvs {r['provider']}"
              for r in ratios]
    values = [r["speedup"] for r in ratios]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.32 * len(ratios))))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=6)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("pykernels speed-up (baseline median time / pykernels median time), log scale")
    ax.set_title(f"{name}: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args) -> int:
    # PyG's import still runs torch.jit.script, which torch 2.14 marks deprecated: a warning about a
    # dependency's internals, which would otherwise be the first thing the report prints.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.5)
    families = args.only or list(FAMILIES)
    name = device_name(device)
    meta = info()
    started = time.time()
    header = [
        f"# pykernels benchmarks on {name}",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- command: `python -m pykernels bench {' '.join(sys.argv[2:]) if len(sys.argv) > 2 else ''}`".rstrip(),
        f"- device: {name} ({device.type}); torch {meta['torch']}; triton {meta['triton']}; "
        f"CPU capability {meta['cpu_capability']}; threads {meta['threads']}",
        "- times are medians with 20th–80th percentiles; speed-up = the baseline's median / pykernels' median "
        "measured in the same run (> 1 means pykernels is faster); peak MiB is what the torch allocator held "
        "above its starting point during one call",
        "",
    ]
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    body = []
    for family in families:
        rows = run_family(family, device, args.quick, min_run_time, args.match)
        table = markdown_table(rows)
        print(f"\n## {family}\n\n{table}\n", flush=True)
        body += [f"## {family}", "", table, ""]
        if not args.no_plot:
            png = out_dir / f"{_slug(name)}-{family}.png"
            if plot_family(rows, family, name, png):
                body += [f"![{family} speed-ups]({png.name})", ""]
                print(f"plot: {png}")
    # A partial run (--only, --match) gets its own file, so it never replaces the full report.
    suffix = "".join(f"-{family}" for family in args.only or [])
    suffix += "".join(f"-{_slug(text)}" for text in args.match or [])
    report = out_dir / f"{_slug(name)}{suffix}.md"
    report.write_text("\n".join(header + body + [f"_total benchmark time: {time.time() - started:.0f} s_", ""]))
    print(f"report: {report}")
    return 0
