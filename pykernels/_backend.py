"""Engine registry: which engines were built, which one serves a call, and the deterministic switch.

Every op has one meaning (its reference in ``pykernels.reference``) and several engines:

* ``"cpu"``: the C++ engine in ``pykernels._C`` (CPU tensors).
* ``"cuda"``: the CUDA engine in ``pykernels._C`` (CUDA tensors; built only against a CUDA torch), and, in a
  ``PYKERNELS_CUDA_EMULATE=1`` build, the same kernels and launchers in ``pykernels._cuda_emulated`` for CPU
  tensors, run by the CUDA emulator (slow: a check of the CUDA engine, never picked by ``auto``).
* ``"triton"``: Triton kernels (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``).
* ``"reference"``: plain PyTorch, differentiable by autograd.
"""
from __future__ import annotations

import importlib.util
import os
import threading

import torch

ENGINES = ("cpu", "cuda", "triton", "reference")
BACKENDS = ("auto",) + ENGINES

_state = threading.local()
_deterministic_default = False


def _load_build_info() -> dict:
    try:
        from . import _C
    except ImportError as exc:  # pragma: no cover - only when the extension is missing
        return {"cpp": False, "cuda": False, "cuda_status": f"extension not importable: {exc}"}
    info = dict(_C.build_info())
    info["cpp"] = True
    return info


def _load_cuda_emulated() -> bool:
    try:
        from . import _cuda_emulated  # noqa: F401  (registers the pykernels_cuda_emulated kernels)
    except ImportError:
        return False
    return True


# Read once at import: engine selection runs inside traced code, where these must be constants.
BUILD_INFO = _load_build_info()
_CUDA_EMULATED = _load_cuda_emulated()
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _build_info() -> dict:
    return BUILD_INFO


def cpp_available() -> bool:
    return BUILD_INFO["cpp"]


def cuda_built() -> bool:
    return bool(BUILD_INFO.get("cuda"))


def cuda_emulated() -> bool:
    """Whether the CUDA engine runs on CPU tensors, emulated (a ``PYKERNELS_CUDA_EMULATE=1`` build)."""
    return _CUDA_EMULATED


def namespace(engine: str, device: torch.device) -> str:
    """The ``torch.ops`` namespace of ``engine``'s ops for tensors on ``device``."""
    if engine == "triton":
        return "pykernels_triton"
    if engine == "cuda" and device.type == "cpu":
        return "pykernels_cuda_emulated"
    return "pykernels"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def triton_usable_on(device: torch.device) -> bool:
    if not triton_importable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def engine_unavailable_reason(engine: str, device: torch.device) -> str | None:
    """Why ``engine`` cannot run on ``device``, or None when it can."""
    if engine == "reference":
        return None
    if engine == "cpu":
        if device.type != "cpu":
            return f"the cpu engine takes CPU tensors, got {device.type} tensors"
        return None if cpp_available() else _build_info()["cuda_status"]
    if engine == "cuda":
        if device.type == "cpu" and cuda_emulated():
            return None
        if device.type != "cuda":
            return (f"the cuda engine takes CUDA tensors, got {device.type} tensors (CPU tensors only in a "
                    "PYKERNELS_CUDA_EMULATE=1 build, emulated)")
        return None if cuda_built() else f"pykernels was built without CUDA ({_build_info()['cuda_status']})"
    if engine == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        return None
    raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")


def select(op: str, backend: str, device: torch.device) -> str:
    """The engine that serves ``op`` for tensors on ``device``.

    ``auto`` picks the C++ engine for CPU tensors. For CUDA tensors it picks the CUDA engine when built,
    else Triton. No GPU has yet measured the two against each other, so the choice rests on correctness
    evidence: every op's CUDA kernels and launchers run in CI in the project's emulator of the CUDA execution
    model (``PYKERNELS_CUDA_EMULATE=1``; the tests marked ``cuda_emulated``), forward and backward in four
    dtypes against the reference, with race, bounds and barrier checks; Triton's semantics run only under its
    interpreter. Run ``python -m pykernels selftest --device cuda`` on a GPU to see both engines checked there.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if cpp_available() else "reference"
        if device.type == "cuda":
            if cuda_built():
                return "cuda"
            if triton_importable():
                return "triton"
        return "reference"
    reason = engine_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend={backend!r} is not available: {reason}")
    return backend


def set_deterministic(enabled: bool) -> None:
    """Ask every pykernels op for results that do not depend on thread or block scheduling.

    ``torch.use_deterministic_algorithms(True)`` has the same effect. The setting is per thread.
    """
    _state.deterministic = bool(enabled)


def is_deterministic() -> bool:
    return getattr(_state, "deterministic", _deterministic_default) or torch.are_deterministic_algorithms_enabled()
