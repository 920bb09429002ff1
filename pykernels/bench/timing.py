"""Timing and peak-memory measurement shared by every benchmark family."""
from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _quantile(sorted_values, q):
    pos = q * (len(sorted_values) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _summary(times_ms) -> Timing:
    times_ms = sorted(times_ms)
    return Timing(statistics.median(times_ms), _quantile(times_ms, 0.2), _quantile(times_ms, 0.8))


def time_cuda(fn, min_run_time: float) -> Timing:
    """Median and 20th/80th percentiles of ``fn``'s GPU time, after one warm-up call: ``triton.testing.do_bench``
    when available (L2 flushed, CUDA events), else CUDA events. (The CPU's timing is :func:`time_interleaved`.)"""
    fn()
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=max(int(min_run_time * 1000), 25))
        return Timing(med, p20, p80)
    times = []
    for _ in range(max(10, int(min_run_time * 100))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return _summary(times)


# On the CPU an interleaved sample is a block of calls lasting about this long, so that a call of a tenth of a
# millisecond is not measured against the timer's own cost.
BLOCK_S = 0.01


def _timed_call(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def warm_up(fn, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes once warm: a first call warms caches, allocator and thread pool and is
    not used, unless it took over a second (a whole model), which is warm enough and not worth repeating."""
    first = _timed_call(fn, device)
    return first if first >= 1.0 else _timed_call(fn, device)


def time_interleaved(fns: list, device: torch.device, min_run_time: float, per_call: list[float],
                     block_s: float = BLOCK_S) -> list[Timing]:
    """Timings taken in alternation: each round times one sample of every provider, in an order reversed every
    other round. On a shared or throttling machine the load drifts over seconds; timing one provider after the
    other puts that drift into their ratio, timing them in turn spreads it over all of them.

    A sample is one call, or on the CPU a block of calls of about ``block_s`` (its mean). 5 to 25 rounds of
    about ``max(2 * min_run_time, 0.5)`` seconds in all (3 rounds when one takes over 20 s: a UNet at 1024² on a
    laptop CPU). ``per_call``: each provider's warm call time (:func:`warm_up`)."""
    cpu = device.type != "cuda"
    blocks = [max(1, int(block_s / max(t, 1e-9))) if cpu else 1 for t in per_call]
    round_s = max(sum(n * t for n, t in zip(blocks, per_call)), 1e-9)
    rounds = min(25, max(5 if round_s < 20 else 3, int(max(2 * min_run_time, 0.5) / round_s)))
    times = [[] for _ in fns]
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            fn, n = fns[i], blocks[i]
            _sync(device)
            start = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            times[i].append((time.perf_counter() - start) * 1e3 / n)
    return [_summary(t) for t in times]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _stderr_silenced():
    """kineto writes a line straight to file descriptor 2 at every profiler start and stop (and, with a CUDA
    build of torch and no GPU, an error about the device count); between progress-bar updates that flooded
    the report. Python exceptions still propagate; only C-level writes during the session are dropped."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def allocator_events(fn) -> list[int]:
    """What the CPU torch allocator did during one call of ``fn``: bytes allocated (> 0) and freed (< 0), in
    order, as the profiler records them (memory a kernel allocates outside torch's allocator is not seen).
    Their running sum is the live bytes above those held before the call."""
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return [nbytes for _, nbytes in events]


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak bytes held by the torch allocator during one call of ``fn``, above what was held before.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum of :func:`allocator_events`.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return max(itertools.accumulate(allocator_events(fn), initial=0)) / 2**20
