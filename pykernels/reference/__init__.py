"""Plain-PyTorch meaning of every pykernels op: the test oracle and the ``backend="reference"`` engine."""
from . import attention, flow, graph

__all__ = ["attention", "flow", "graph"]
