"""Concurrency: every op called from 8 Python threads at once, and under other ``torch.set_num_threads``
settings, gives bit-identical outputs and gradients to one sequential call; the deterministic switch is per
thread, as ``pykernels.set_deterministic`` documents.

The ops and inputs are tests/op_cases.py's: the selftest's (small size for the threads, medium for the thread
counts, float32) plus the flow ops it does not cover. The C++ engine runs every case; the interpreted engines
(Triton, and the emulated CUDA engine where built) one tiny case per family.
"""
import threading

import pytest
import torch

import pykernels as pk
from pykernels.testing import engines_for

from op_cases import SELFTEST, TINY, call as _call, inputs as _inputs

THREADS = 8
CASES = SELFTEST
# One tiny case per family for the interpreted engines, where each kernel runs one program at a time.
TRITON_CASES = ["graph: graph_attention", "attention: fused_attention head-mean map",
                "window: window_attention shifted", "flow: maxmin_matmul"]


def _assert_identical(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}: tensor {i}"
        # Bit-identical, NaN patterns included.
        assert torch.equal(a.view(-1).view(torch.uint8), e.view(-1).view(torch.uint8)) if a.is_floating_point() \
            else torch.equal(a, e), f"{what}: tensor {i} differs (max |diff| {(a - e).abs().max()})"


def _in_threads(fn, count=THREADS):
    """Runs ``fn(i)`` in ``count`` threads released together; returns their results in order."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def worker(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _check_threads(case, backend, repeats):
    grad_inputs, rest = _inputs(case, torch.float32)
    expected = _call(case, grad_inputs, rest, backend)
    results = _in_threads(lambda i: [_call(case, grad_inputs, rest, backend) for _ in range(repeats)])
    for i, per_thread in enumerate(results):
        for r, result in enumerate(per_thread):
            _assert_identical(result, expected, f"{case.name}, thread {i}, call {r}")


@pytest.mark.parametrize("name", CASES)
def test_cpu_engine_threads_match_sequential(name):
    _check_threads(CASES[name], "cpu", repeats=3)


# The engines that run kernels one program at a time on CPU tensors: Triton's interpreter, and the CUDA engine
# in its emulator (a PYKERNELS_CUDA_EMULATE=1 build).
INTERPRETED = [pytest.param(e, marks=[pytest.mark.triton] if e == "triton" else []) for e in ("triton", "cuda")
               if e in engines_for("cpu")]


@pytest.mark.skipif(not INTERPRETED, reason="neither the Triton interpreter nor the emulated CUDA engine runs here")
@pytest.mark.parametrize("engine", INTERPRETED)
@pytest.mark.parametrize("name", TRITON_CASES)
def test_interpreted_engine_threads_match_sequential(name, engine):
    _check_threads(TINY[name], engine, repeats=1)


@pytest.mark.parametrize("name", CASES)
def test_results_do_not_depend_on_the_thread_count(name):
    case = CASES[name]
    # The selftest's medium size: large enough that the engines split their work over threads.
    grad_inputs, rest = _inputs(case, torch.float32, "medium")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = _call(case, grad_inputs, rest, "cpu")
        for n in (2, 3, 8):
            torch.set_num_threads(n)
            _assert_identical(_call(case, grad_inputs, rest, "cpu"), expected, f"{name}, {n} threads")
    finally:
        torch.set_num_threads(before)


def test_threads_with_different_intra_op_thread_counts():
    """Python threads that each set their own thread count (an inference server's workers) still agree."""
    case = CASES["attention: fused_attention GQA"]
    grad_inputs, rest = _inputs(case, torch.float32)
    expected = _call(case, grad_inputs, rest, "cpu")
    before = torch.get_num_threads()

    def work(i):
        torch.set_num_threads(1 + i % 3)
        return _call(case, grad_inputs, rest, "cpu")

    try:
        for i, result in enumerate(_in_threads(work)):
            _assert_identical(result, expected, f"thread {i}")
    finally:
        torch.set_num_threads(before)


def test_deterministic_switch_is_per_thread():
    assert not pk.is_deterministic()
    seen = {}
    switched = threading.Event()
    checked = threading.Event()

    def switcher():
        pk.set_deterministic(True)
        seen["switcher"] = pk.is_deterministic()
        switched.set()
        checked.wait(10)
        seen["switcher after"] = pk.is_deterministic()

    def other():
        switched.wait(10)
        seen["other"] = pk.is_deterministic()
        checked.set()

    threads = [threading.Thread(target=switcher), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"switcher": True, "other": False, "switcher after": True}
    # The switch did not leak into the main thread, nor into a thread started afterwards.
    assert not pk.is_deterministic()
    assert _in_threads(lambda i: pk.is_deterministic(), 2) == [False, False]


def test_torch_deterministic_algorithms_apply_to_every_thread():
    """``torch.use_deterministic_algorithms`` is process-wide, and pykernels follows it in every thread."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert _in_threads(lambda i: pk.is_deterministic(), 2) == [True, True]
    finally:
        torch.use_deterministic_algorithms(before)
    assert not pk.is_deterministic()


@pytest.mark.parametrize("name", ["graph: spmm sum", "attention: fused_attention causal", "window: msw_msa",
                                  "flow: soft_maxmin_matmul"])
def test_deterministic_threads_match_the_default(name):
    """Threads that switch determinism on and threads that do not, running together, get the same bits."""
    case = CASES[name]
    grad_inputs, rest = _inputs(case, torch.float32)
    expected = _call(case, grad_inputs, rest, "cpu")

    def work(i):
        pk.set_deterministic(i % 2 == 0)
        assert pk.is_deterministic() == (i % 2 == 0)
        return _call(case, grad_inputs, rest, "cpu")

    for i, result in enumerate(_in_threads(work)):
        _assert_identical(result, expected, f"{name}, thread {i} (deterministic={i % 2 == 0})")
