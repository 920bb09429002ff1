import collections
import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton engine runs under its interpreter on CPU tensors; set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)


def _cuda_emulated(item) -> bool:
    """A test of the CUDA engine on CPU tensors (the emulation build): -m cuda_emulated selects them."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("namespace") == "pykernels_cuda_emulated":
        return True
    return params.get("engine") == "cuda" and str(params.get("device", "cpu")) == "cpu"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # An engine-only parametrisation names the emulated run "cuda" too; it needs no device.
        if _cuda_emulated(item):
            item.add_marker(pytest.mark.cuda_emulated)
        elif "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def pytest_sessionfinish(session, exitstatus):
    """With PYKERNELS_EMU_LAUNCHES=path, writes how often the emulated runs launched each CUDA kernel (by mangled
    name) there, merged with what the file already holds: tools/check_cuda_kernels.py --launch-coverage compares
    it with the kernels the real build compiles."""
    path = os.environ.get("PYKERNELS_EMU_LAUNCHES")
    emulated = sys.modules.get("pykernels._cuda_emulated")
    if not path or emulated is None:
        return
    counts = collections.Counter(json.loads(Path(path).read_text()) if Path(path).is_file() else {})
    counts.update(emulated.launch_counts())
    Path(path).write_text(json.dumps(dict(sorted(counts.items())), indent=1))


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="property-based fuzzing (tests/fuzz): 20x the CI budget of draws, with a fresh seed")


@pytest.fixture(scope="session")
def fuzz_long(request) -> bool:
    return request.config.getoption("--fuzz-long")


@pytest.fixture
def serve_small_calls(monkeypatch):
    """Lets ``accelerate``'s auto backend serve the tiny SDPA calls of test-sized models, which it otherwise hands
    back to torch as faster on the CPU; the tests that use it check what is served, not that size rule."""
    # The module, not the function pykernels re-exports under the same name.
    monkeypatch.setattr(importlib.import_module("pykernels.accelerate"), "_CPU_MIN_WORK", 0)
