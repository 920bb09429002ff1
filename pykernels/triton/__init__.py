"""Triton engine: kernels registered as ``torch.ops.pykernels_triton.<op>`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
