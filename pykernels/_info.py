"""What this installation of pykernels was built with and can run."""
from __future__ import annotations

import os
import platform

import torch

from . import _backend


def info() -> dict:
    """Engines built, versions, CPU capability and threads, as a dict (``python -m pykernels info`` prints it)."""
    build = dict(_backend._build_info())
    triton_version = None
    if _backend.triton_importable():
        import triton

        triton_version = triton.__version__
    cuda_device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "pykernels": __import__("pykernels").__version__,
        "torch": torch.__version__,
        "torch_built_with": build.get("torch_built_with"),
        "python": platform.python_version(),
        "engines": {
            "cpu": build["cpp"],
            "cuda": build.get("cuda", False),
            "triton": _backend.triton_importable(),
            "reference": True,
        },
        "cuda_status": build.get("cuda_status"),
        "cuda_emulated": _backend.cuda_emulated(),
        "cuda_device": cuda_device,
        "triton": triton_version,
        "triton_interpreted": _backend.triton_interpreted(),
        "compiler": build.get("compiler"),
        "cpu_dispatch": build.get("cpu_dispatch"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "deterministic": _backend.is_deterministic(),
    }


def _engine_text(engine: str, available: bool, data: dict) -> str:
    if not available:
        return "no"
    if engine == "cuda":
        return "yes (built" + ("" if data.get("cuda_device") else ", no CUDA device present") + ")"
    if engine == "triton" and data.get("triton_interpreted"):
        return "yes (interpreted)"
    return "yes"


def format_info(data: dict | None = None) -> str:
    data = info() if data is None else data
    lines = []
    for key, value in data.items():
        if key == "engines":
            value = ", ".join(f"{k}={_engine_text(k, v, data)}" for k, v in value.items())
        elif key == "cuda_emulated":
            value = "yes (backend='cuda' on CPU tensors runs the CUDA engine emulated)" if value else "no"
        elif key == "cuda_device" and value is None:
            value = "none present" if torch.version.cuda else "none (CPU build of torch)"
        lines.append(f"{key:>18}: {value}")
    return "\n".join(lines)
