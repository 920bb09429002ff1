"""What a benchmark is: one workload, several providers computing the same thing on the same data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Case:
    family: str
    name: str
    mode: str  # "fwd" or "fwd+bwd"
    # provider name -> zero-argument callable; the first provider is the pykernels one.
    providers: dict[str, Callable[[], object]]
    # Minimum bytes the op must move (read + write); effective GB/s = bytes / time. None when not meaningful.
    bytes_moved: int | None = None
    notes: dict[str, str] = field(default_factory=dict)
    # Run once before timing: (largest |pykernels output - baseline output|, what pykernels served), shown beside
    # pykernels' row. For end-to-end cases, where a speed-up must come with the same results.
    check: Callable[[], tuple[float, str]] | None = None
    # Time the providers in alternation (timing.time_interleaved) on CUDA too, as every case is on the CPU: for
    # whole models, whose host-side work drifts with the load as much as a CPU run does.
    interleave: bool = False


class LazyData:
    """Builds a dataset on first use and keeps only the most recent one alive."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, key, build):
        if key != self._key:
            self._value = None
            self._value = build()
            self._key = key
        return self._value


def forward_only(fn, inputs):
    """A provider timing ``fn(*inputs())`` without autograd."""
    def run():
        with torch.no_grad():
            return fn(*inputs())
    return run


def forward_backward(fn, inputs):
    """A provider timing ``fn(*inputs())`` and its backward to those inputs (every output gets a gradient of
    ones when ``fn`` returns a tuple). ``inputs`` is called when the case runs, so it sees the data that is
    live then (LazyData keeps one dataset at a time)."""
    def run():
        leaves = inputs()
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return run
