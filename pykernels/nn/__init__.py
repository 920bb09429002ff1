"""torch.nn modules built on pykernels ops."""
