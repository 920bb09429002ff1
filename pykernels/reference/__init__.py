"""Plain-PyTorch meaning of every pykernels op: the test oracle and the ``backend="reference"`` engine."""
from . import attention, flow, graph, neighborhood, window

__all__ = ["attention", "flow", "graph", "neighborhood", "window"]
