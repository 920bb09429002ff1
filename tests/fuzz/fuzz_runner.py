"""Runs fuzz cases in a child process, so a segfault, abort or hang fails one draw, not the test run.

One long-lived worker (started from a ``forkserver`` that has imported torch and pykernels once) runs the
cases it is sent over a pipe. A worker that dies or exceeds the per-draw timeout is killed, the draw is
recorded as ``crash``/``hang`` with its exit status, and the next draw gets a fresh worker.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker_main(conn, threads):
    sys.path.insert(0, HERE)
    import torch
    torch.set_num_threads(threads)
    from fuzz_core import run_case
    while True:
        try:
            case = conn.recv()
        except EOFError:
            return
        if case is None:
            return
        try:
            result = run_case(case)
        except BaseException as exc:  # noqa: BLE001 - anything the oracle itself lets escape is a finding
            result = {"status": "harness-error", "detail": f"{type(exc).__name__}: {exc}"}
        conn.send(result)


class Pool:
    """A single worker process, restarted after a crash or a hang."""

    def __init__(self, timeout: float, threads: int = 1):
        self.timeout, self.threads = timeout, threads
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "pykernels", "hypothesis"])
        self.proc = self.conn = None
        self.counts = defaultdict(lambda: defaultdict(int))   # (op, engine) -> status -> draws
        self.seconds = defaultdict(float)
        self.restarts = 0

    def _start(self):
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_main, args=(child, self.threads), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def _kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(10)
        self.proc = self.conn = None
        self.restarts += 1

    def run(self, case: dict, timeout: float | None = None) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        start = time.perf_counter()
        self.conn.send(case)
        limit = timeout or self.timeout
        try:
            ready = self.conn.poll(limit)
            result = self.conn.recv() if ready else None
        except (EOFError, ConnectionResetError):
            result, ready = None, True
        if result is None:
            if ready:
                self.proc.join(5)
                code = self.proc.exitcode
                result = {"status": "crash", "detail": f"the worker died (exit status {code}) on this case"}
            else:
                result = {"status": "hang", "detail": f"no result within {limit:.0f} s"}
            self._kill()
        key = (case["op"], case["engine"])
        self.counts[key][result["status"]] += 1
        if result.get("known"):
            self.counts[key]["known"] += 1
        self.counts[key]["valid" if not case.get("invalid") else "invalid"] += 1
        self.seconds[key] += time.perf_counter() - start
        return result

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (BrokenPipeError, OSError):
                pass
            if self.proc.is_alive():
                self.proc.kill()
        self.proc = None

    def table(self) -> str:
        """Draws per op and engine: valid and invalid inputs, draws that hit a known engine defect (passed,
        see fuzz_ops' ``known``), failed draws and the seconds spent in the worker."""
        lines = [f"{'op':<28}{'engine':<10}{'draws':>6}{'valid':>7}{'invalid':>8}{'known':>6}{'failed':>7}"
                 f"{'seconds':>9}"]
        for (op, engine), c in sorted(self.counts.items()):
            draws = c["valid"] + c["invalid"]
            failed = draws - c["ok"]
            lines.append(f"{op:<28}{engine:<10}{draws:>6}{c['valid']:>7}{c['invalid']:>8}{c['known']:>6}{failed:>7}"
                         f"{self.seconds[(op, engine)]:>9.1f}")
        total = sum(c["valid"] + c["invalid"] for c in self.counts.values())
        lines.append(f"{'total':<38}{total:>6}{'':>28}{sum(self.seconds.values()):>9.1f}")
        return "\n".join(lines)


def repro(case: dict) -> str:
    return f"python tests/fuzz/fuzz_core.py '{json.dumps(case)}'"
