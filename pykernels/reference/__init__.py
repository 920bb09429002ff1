"""Plain-PyTorch meaning of every pykernels op: the test oracle and the ``backend="reference"`` engine."""
from . import graph

__all__ = ["graph"]
