"""Weight-only int8 / int4 linear layers for the decoders' matrix-vector products (the decode step is memory-bound:
reading a byte or half a byte per weight instead of two is what makes it faster).

`quantize_linears(lm, bits)` replaces the projections of every layer of a Qwen3LM (q/k/v/o, gate/up/down) with
`QuantizedLinear` modules holding the symmetric quantized weight (kernels/reference.quantize_weight); the embeddings
and the vocabulary head stay in the model's dtype (the head's rounding errors go straight into the logits). A few
rows at a time (decode steps) run the Triton matvec kernel, which dequantizes in registers; more rows (prefill)
dequantize once and multiply with the GEMM library.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import reference
from .ops import KernelError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_BITS = {"int8": 8, "int4": 4}


class QuantizedLinear(nn.Module):
    """A bias-free linear layer over a weight-only quantized matrix. `use_kernels`: through the custom op
    (`torch.ops.opens2s.wo_linear`: Triton where it runs, else the reference); False runs the reference directly."""

    def __init__(self, qweight: Tensor, scales: Tensor, bits: int, in_features: int,
                 group_size: int = reference.INT4_GROUP, use_kernels: bool = True):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, qweight.shape[0]
        self.use_kernels = use_kernels
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = reference.INT4_GROUP,
                    use_kernels: bool = True) -> QuantizedLinear:
        if linear.bias is not None:
            raise KernelError("weight-only quantization here covers bias-free projections (Qwen3 has no biases)")
        qweight, scales = reference.quantize_weight(linear.weight, bits, group_size)
        device = linear.weight.device
        return cls(qweight.to(device), scales.to(device), bits, linear.in_features, group_size, use_kernels)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_kernels:
            return torch.ops.opens2s.wo_linear(x, self.qweight, self.scales, self.bits, self.group_size,
                                               self.in_features)
        return reference.wo_linear(x, self.qweight, self.scales, self.bits, self.group_size, self.in_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}"


def quantize_linears(lm: nn.Module, weights: str, use_kernels: bool = True) -> int:
    """Replace every decoder layer's projections of `lm` (a Qwen3LM) by int8/int4 `QuantizedLinear`s, in place; the
    float weights are released. Returns the number of layers replaced."""
    if weights not in WEIGHT_BITS:
        raise KernelError(f"weight-only quantization is one of {', '.join(WEIGHT_BITS)}, not {weights!r}")
    bits = WEIGHT_BITS[weights]
    count = 0
    with torch.no_grad():
        for layer in lm.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name in PROJECTIONS:
                    child = getattr(parent, name, None)
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, QuantizedLinear.from_linear(child, bits, use_kernels=use_kernels))
                        count += 1
    return count


__all__ = ["PROJECTIONS", "WEIGHT_BITS", "QuantizedLinear", "quantize_linears"]
