"""The benchmark runner behind ``python -m pykernels bench``."""
