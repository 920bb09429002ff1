"""Timing and peak-memory measurement shared by every benchmark family."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.utils.benchmark


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _quantile(sorted_values, q):
    pos = q * (len(sorted_values) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_fn(fn, device: torch.device, min_run_time: float) -> Timing:
    """Median and 20th/80th percentiles of ``fn``'s wall time, after warm-up.

    CPU: ``torch.utils.benchmark.Timer`` blocks (each sample is the mean of a block of calls, so the
    percentiles describe block means). CUDA: ``triton.testing.do_bench`` when available (L2 flushed,
    CUDA events), else CUDA events around each call.
    """
    fn()
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=max(int(min_run_time * 1000), 25))
            return Timing(med, p20, p80)
        except ImportError:
            times = []
            for _ in range(max(10, int(min_run_time * 100))):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            times.sort()
            return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8))
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times = sorted(t * 1e3 for t in measurement.times)
    if len(times) < 5:
        times = sorted(times + [t * 1e3 for t in timer.blocked_autorange(min_run_time=min_run_time).times])
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8))


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak bytes held by the torch allocator during one call of ``fn``, above what was held before.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocator's alloc/free events recorded by the
    profiler, replayed in order (memory a kernel allocates outside torch's allocator is not seen).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20
