"""The engines' twin ops: ``pykernels_triton::<op>`` (the Triton engine) and, in an emulation build,
``pykernels_cuda_emulated::<op>`` (the CUDA engine on CPU tensors), with the schema of the C++ ``pykernels::<op>``.

Schemas are read from the C++ declarations (never re-typed); the implementation is looked up by name in
``pykernels.triton.<family>`` at call time, so importing pykernels does not import triton.
"""
from __future__ import annotations

import importlib
import threading

import torch

from . import _C  # noqa: F401  (loads the op schemas and the C++ engines)
from ._backend import cuda_emulated, triton_interpreted

# pykernels_cuda_emulated::<op> (only in a PYKERNELS_CUDA_EMULATE=1 build): the CUDA engine's launchers for CPU
# tensors, whose kernels _cuda_emulated registered before the schemas below exist.
NAMESPACES = ("pykernels", "pykernels_triton") + (("pykernels_cuda_emulated",) if cuda_emulated() else ())

_triton_lib = torch.library.Library("pykernels_triton", "DEF")
_emulated_lib = torch.library.Library("pykernels_cuda_emulated", "DEF") if cuda_emulated() else None


def ops(namespace: str):
    return getattr(torch.ops, namespace)


def _schema_without_namespace(op: str) -> str:
    return str(getattr(torch.ops.pykernels, op).default._schema).split("::", 1)[1]


# Triton's interpreter (TRITON_INTERPRET=1) patches triton.language's functions while a kernel runs and puts
# them back when it ends, so a kernel interpreted in one Python thread fails when another thread's kernel ends
# first. Interpreted calls therefore run one at a time; compiled launches (GPU) are not serialised. Reentrant:
# an op's implementation may call other Triton ops.
_INTERPRETER_LOCK = threading.RLock()


def _triton_impl(family: str, op: str):
    def impl(*args):
        fn = getattr(importlib.import_module(f"pykernels.triton.{family}"), op)
        if triton_interpreted():
            with _INTERPRETER_LOCK:
                return fn(*args)
        return fn(*args)

    impl.__name__ = f"triton_{op}"
    return impl


def define_triton_twins(family: str, op_names) -> None:
    """The Triton twins of ``op_names``, and their emulated CUDA twins where that engine is built."""
    for op in op_names:
        _triton_lib.define(_schema_without_namespace(op))
        for key in ("CPU", "CUDA"):
            _triton_lib.impl(op, _triton_impl(family, op), key)
        if _emulated_lib is not None:
            _emulated_lib.define(_schema_without_namespace(op))


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp and other softmax statistics are kept in the accumulation type."""
    return torch.float64 if dtype == torch.float64 else torch.float32
