"""Test helpers shared by the test suite and the benchmarks: tolerances, engines, random graphs, peer packages."""
from __future__ import annotations

import importlib
import sys
import types

import torch

from . import _backend

# (atol, rtol) per dtype for engine-vs-reference comparisons, the reference run in float64.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def engines_for(device: torch.device | str = "cpu") -> list[str]:
    """Engines that can run on ``device`` in this process."""
    device = torch.device(device)
    return [e for e in _backend.ENGINES if _backend.engine_unavailable_reason(e, device) is None]


def runs_interpreted(device: torch.device | str, engine: str) -> bool:
    """Whether ``engine`` runs its kernels one interpreted or emulated thread at a time on ``device``: Triton
    on CPU tensors (``TRITON_INTERPRET=1``) and the CUDA engine on CPU tensors (the emulator). Tests give those
    runs small shapes of their own, which keep them affordable."""
    return torch.device(device).type == "cpu" and engine in ("triton", "cuda")


def namespaces() -> list[str]:
    """The ``torch.ops`` namespaces of the engines this process can run on CPU tensors (for opcheck)."""
    return sorted({_backend.namespace(e, torch.device("cpu")) for e in engines_for("cpu") if e != "reference"})


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0,
                 msg: str = "") -> None:
    """Compares ``actual`` with a (usually float64) ``expected`` using the tolerance of ``dtype``."""
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale,
                               equal_nan=True, msg=(lambda m: f"{msg}\n{m}") if msg else None)


def random_graph(num_nodes: int, num_edges: int, *, num_targets: int | None = None, seed: int = 0,
                 power_law: float | None = None, self_loops: bool = True, device="cpu") -> torch.Tensor:
    """A random ``edge_index``; with ``power_law`` the targets' in-degrees follow a Zipf-like law.

    Duplicate edges, self loops and isolated nodes occur naturally, which is what tests want.
    """
    g = torch.Generator().manual_seed(seed)
    num_targets = num_nodes if num_targets is None else num_targets
    if num_edges and (num_nodes == 0 or num_targets == 0):
        raise ValueError("edges need nodes")
    source = torch.randint(0, max(num_nodes, 1), (num_edges,), generator=g)
    if power_law is None:
        target = torch.randint(0, max(num_targets, 1), (num_edges,), generator=g)
    else:
        ranks = torch.arange(1, num_targets + 1, dtype=torch.float64)
        probs = ranks.pow(-power_law)
        target = torch.multinomial(probs / probs.sum(), num_edges, replacement=True, generator=g)
        target = torch.randperm(num_targets, generator=g)[target]
    if not self_loops and num_nodes == num_targets:
        source = torch.where(source == target, (source + 1) % max(num_nodes, 1), source)
    return torch.stack([source, target]).to(device)


def assert_low_precision_error(actual: torch.Tensor, expected: torch.Tensor, eager: torch.Tensor,
                               factor: float = 2.0, atol: float = 1e-3, msg: str = "") -> None:
    """Flash-attention's rule for fp16/bf16: the kernel's error against a float64 reference may be at most
    ``factor`` times the error of eager PyTorch computing the same thing in the same low dtype (plus a
    small absolute slack for outputs that eager happens to get exactly right)."""
    ours = (actual.double() - expected.double()).abs().nan_to_num(0.0).max().item() if actual.numel() else 0.0
    theirs = (eager.double() - expected.double()).abs().nan_to_num(0.0).max().item() if eager.numel() else 0.0
    assert ours <= factor * theirs + atol, f"{msg}: error {ours:.3g} > {factor} x eager error {theirs:.3g} + {atol}"


def compile_recording(model, graphs: list):
    """``torch.compile(model, fullgraph=True)`` on the aot_eager backend, appending every FX graph dynamo hands it
    to ``graphs``, so a test can check which ops the compiled model calls. Resets dynamo first."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, backend=backend)


_OLD_MULTICONTROLNET = "diffusers.pipelines.controlnet.multicontrolnet"


def import_hidiffusion():
    """``hidiffusion.hidiffusion`` (the PyPI package, 0.1.10), the peer our MSW-MSA is compared and timed against.

    It imports ``MultiControlNetModel`` from a module that newer diffusers no longer has; the old path is aliased
    to the new one just for the import. A missing package raises ImportError; any other failure propagates.
    """
    try:
        importlib.import_module(_OLD_MULTICONTROLNET)
        shimmed = False
    except ImportError:
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        alias = types.ModuleType(_OLD_MULTICONTROLNET)
        alias.MultiControlNetModel = MultiControlNetModel
        sys.modules[_OLD_MULTICONTROLNET] = alias
        shimmed = True
    try:
        return importlib.import_module("hidiffusion.hidiffusion")
    finally:
        if shimmed:
            del sys.modules[_OLD_MULTICONTROLNET]
