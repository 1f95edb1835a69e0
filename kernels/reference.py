"""Plain PyTorch references of every kernel in this folder: the CPU fallback of the custom ops and, run in float64,
the oracle the tests compare the Triton kernels against. Written for clarity, not speed; each mirrors exactly what
training/qwen3.py computes (rounding to the activations' dtype at the same points), so the fallback path of a model
gives the default path's numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Symmetric weight-only quantization: int8 per output channel, int4 per group of input columns. Values are stored
# without zero points ([-127, 127] and [-7, 7]) so a dequantized weight is exactly q * scale.
QMAX = {8: 127, 4: 7}
INT4_GROUP = 128


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim: statistics in fp32 (float64 stays float64), normalized rows cast back to x's
    dtype, then scaled by the weight (qwen3.rms_norm)."""
    h = x.float() if x.dtype != torch.float64 else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Non-interleaved rotary embedding of (..., T, D) with cos/sin rows (T, D) (qwen3.apply_rope)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
    """One query position per head: q (B, H, 1, D) over the cache rows 0..pos of k, v (B, KV, L, D); query head h
    reads KV head h // (H / KV). Returns (B, H, 1, D). The rows after pos are never read (whatever they hold)."""
    b, h, t, d = q.shape
    if t != 1:
        raise ValueError(f"decode attention takes one query position, got {t}")
    n = int(pos.reshape(-1)[0]) + 1
    group = h // k.shape[1]
    keys = k[:, :, :n].repeat_interleave(group, dim=1)
    values = v[:, :, :n].repeat_interleave(group, dim=1)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(compute) @ keys.to(compute).transpose(-1, -2)) / math.sqrt(d)
    return (scores.softmax(-1) @ values.to(compute)).to(q.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def quantize_weight(weight: Tensor, bits: int, group_size: int = INT4_GROUP) -> tuple[Tensor, Tensor]:
    """(N, K) float weight -> (qweight, scales), symmetric. int8: qweight int8 (N, K), scales float32 (N,). int4:
    K padded with zeros to a multiple of `group_size`, qweight uint8 (N, Kp / 2) holding two values per byte (even
    column in the low nibble, odd in the high, each stored as q + 8), scales float16 (N, Kp / group_size)."""
    if bits not in QMAX:
        raise ValueError(f"weight-only quantization is int8 or int4, not int{bits}")
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    qmax = QMAX[bits]
    if bits == 8:
        scales = (w.abs().amax(dim=1) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scales[:, None]).clamp(-qmax, qmax).to(torch.int8)
        return q, scales
    if group_size % 2 or group_size < 2:
        raise ValueError(f"int4 group size must be even, got {group_size}")
    kp = -(-k // group_size) * group_size
    w = F.pad(w, (0, kp - k))
    groups = w.reshape(n, kp // group_size, group_size)
    # fp16 scales (a quarter of a byte per weight at group 128); the smallest normal fp16 keeps all-zero groups finite.
    scales = (groups.abs().amax(dim=2) / qmax).clamp_min(2.0 ** -14).to(torch.float16)
    q = torch.round(groups / scales.to(torch.float32)[:, :, None]).clamp(-qmax, qmax).reshape(n, kp)
    nibbles = (q + 8).to(torch.uint8)
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed.contiguous(), scales


def dequantize_weight(qweight: Tensor, scales: Tensor, bits: int, in_features: int, group_size: int = INT4_GROUP,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """The (N, K) weight that `quantize_weight` encoded, in `dtype` (computed in float64 when dtype is float64)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if bits == 8:
        return (qweight.to(compute) * scales.to(compute)[:, None]).to(dtype)
    n = qweight.shape[0]
    low = (qweight & 15).to(torch.int16) - 8
    high = (qweight >> 4).to(torch.int16) - 8
    q = torch.stack([low, high], dim=-1).reshape(n, -1).to(compute)
    kp = q.shape[1]
    w = q.reshape(n, kp // group_size, group_size) * scales.to(compute)[:, :, None]
    return w.reshape(n, kp)[:, :in_features].to(dtype)


def wo_linear(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int, in_features: int) -> Tensor:
    """x (..., K) @ dequantized weight^T -> (..., N), in x's dtype."""
    w = dequantize_weight(qweight, scales, bits, in_features, group_size, dtype=x.dtype)
    return F.linear(x, w)


__all__ = ["INT4_GROUP", "QMAX", "decode_attention", "dequantize_weight", "quantize_weight", "rms_norm", "rope",
           "swiglu", "wo_linear"]
