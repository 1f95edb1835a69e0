"""Custom kernels (Triton) with their reference implementations."""
