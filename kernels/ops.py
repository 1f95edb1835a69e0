"""The kernels as torch custom ops (`torch.ops.opens2s.*`, torch.library), and the Qwen3 primitive set built on them.

Each op runs the Triton kernel for CUDA tensors (and for CPU tensors when the kernels were loaded under
TRITON_INTERPRET=1) and otherwise its reference in kernels/reference.py: that is the CPU fallback, so a model set
to these ops runs anywhere. Every op has a fake (meta) implementation, so torch.compile traces through it without
a graph break, and none mutates its inputs or syncs with the host, so CUDA graph capture records it as is.

`TRITON_OPS` is the `Qwen3Ops` the CUDA backend installs with `kernels="triton"`: RMSNorm (hidden state and the
per-head q/k norms), rotary embedding, SwiGLU, and single-position attention that reads only the cache rows up to
the position. Prefill (several positions) keeps the PyTorch attention.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from opens2s_edge.training.qwen3 import Qwen3Ops, gqa_attention

from . import reference

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_kernels = None  # kernels/triton_kernels.py, imported on first use (it compiles nothing until a launch)


class KernelError(RuntimeError):
    """The Triton kernels cannot run here (Triton missing, or an input they do not take)."""


def triton_kernels():
    """The Triton kernel module, or KernelError saying how to get Triton."""
    global _kernels
    if _kernels is None:
        if not TRITON_INSTALLED:
            raise KernelError("Triton is not installed: `pip install triton` (it ships with the CUDA builds of "
                              "PyTorch on Linux), or use kernels='torch'")
        from . import triton_kernels as module

        _kernels = module
    return _kernels


def uses_triton(t: Tensor) -> bool:
    """Whether an op on `t` runs the Triton kernel: CUDA tensors, or CPU tensors in Triton's interpreter."""
    if not TRITON_INSTALLED:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and triton_kernels().INTERPRETED


def interpreted() -> bool:
    """Whether the kernels were loaded under TRITON_INTERPRET=1 (they then also run on CPU tensors)."""
    return TRITON_INSTALLED and triton_kernels().INTERPRETED


# -- the custom ops ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("opens2s::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if uses_triton(x):
        return triton_kernels().rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("opens2s::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    if uses_triton(x):
        return triton_kernels().rope(x, cos, sin)
    return reference.rope(x, cos, sin).contiguous()


@rope.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype))


@torch.library.custom_op("opens2s::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    if uses_triton(gate):
        return triton_kernels().swiglu(gate, up)
    return reference.swiglu(gate, up)


@swiglu.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("opens2s::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, splits: int = 0) -> Tensor:
    if uses_triton(q):
        return triton_kernels().decode_attention(q, k, v, pos, splits)
    # The fallback reads the position on the host: fine on the CPU, where nothing is captured.
    return reference.decode_attention(q, k, v, pos)


@decode_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, splits: int = 0) -> Tensor:
    return q.new_empty(q.shape)


@torch.library.custom_op("opens2s::wo_linear", mutates_args=())
def wo_linear(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int, in_features: int) -> Tensor:
    rows = x.numel() // max(x.shape[-1], 1)
    if uses_triton(x) and rows <= triton_kernels().MATVEC_MAX_ROWS:
        return triton_kernels().wo_linear(x, qweight, scales, bits, group_size, in_features)
    # Many rows (a prefill): dequantize once and let the GEMM library do the matrix product.
    return reference.wo_linear(x, qweight, scales, bits, group_size, in_features)


@wo_linear.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int, in_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# -- the Qwen3 primitive set ------------------------------------------------------------------------------------------
def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
    # The decoders' mask is exactly `pos[:, None] >= arange(L)` (training/qwen3.py), so one query position is fully
    # described by `pos`; the kernel reads rows 0..pos and ignores the rest of the cache.
    if q.shape[0] == 1 and q.shape[2] == 1:
        return torch.ops.opens2s.decode_attention(q, k, v, pos.reshape(1))
    return gqa_attention(q, k, v, mask, pos)


TRITON_OPS = Qwen3Ops(rms_norm=torch.ops.opens2s.rms_norm, rope=torch.ops.opens2s.rope, attention=_attention,
                      swiglu=torch.ops.opens2s.swiglu, name="triton", reads_filled_rows=True)

__all__ = ["TRITON_INSTALLED", "TRITON_OPS", "KernelError", "decode_attention", "interpreted", "rms_norm", "rope",
           "swiglu", "triton_kernels", "uses_triton", "wo_linear"]
