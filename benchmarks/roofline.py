"""The hardware floor for autoregressive decode: a decode step must read every weight and the KV cache of the
context once, so tokens/s can be no higher than memory bandwidth / bytes per step.

The bandwidth is measured in the same run (a large numpy array copy, best of N), so the fraction printed is of
what this machine delivered to a simple streaming kernel at that moment, not of a datasheet number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "int4": 0.5}


def memory_bandwidth(megabytes: int = 512, repeats: int = 7) -> dict[str, float]:
    """Copy bandwidth in bytes/s: best of `repeats` copies of a `megabytes` float64 array into another.

    A copy reads and writes each byte once, so 2 x size bytes cross the memory bus. The array is several
    times larger than any last-level cache so the copy streams from DRAM.
    """
    n = megabytes * (1 << 20) // 8
    src = np.ones(n, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault both arrays' pages in before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    moved = 2 * src.nbytes
    return {"bytes_per_s": moved / best, "array_bytes": float(src.nbytes), "best_s": best, "repeats": repeats}


def device_bandwidth(config: dict) -> dict[str, float]:
    """Copy bandwidth of GPU memory in bytes/s (torch CUDA, timed with CUDA events): the floor for decoders that
    run on the GPU, whose weights stream from device memory, not from host RAM. Run in its own process."""
    import torch

    megabytes, repeats = config.get("megabytes", 1024), config.get("repeats", 10)
    src = torch.ones(megabytes * (1 << 20), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return {"bytes_per_s": 2 * src.numel() / best, "array_bytes": float(src.numel()), "best_s": best,
            "repeats": repeats, "device": torch.cuda.get_device_name()}


@dataclass(frozen=True)
class DecoderShape:
    """The numbers of a Qwen3 decoder that fix its bytes per decode step."""

    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, c: dict) -> DecoderShape:
        return cls(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                   c["vocab_size"])

    def weights_read_per_step(self) -> int:
        """Parameters a one-token step multiplies with: every layer, the final norm and the LM head. The input
        embedding contributes one row (a gather), counted as such."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * self.heads * d + 2 * h * self.kv_heads * d + self.heads * d * h + 2 * d
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        return self.layers * per_layer + h + self.vocab_size * h + h

    def kv_values(self, context: int) -> int:
        """K and V values an attention step reads over `context` positions, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * context


def decode_bound(shape: DecoderShape, context: float, weight_dtype: str, kv_dtype: str,
                 bandwidth: float) -> dict[str, Any]:
    """Bytes per step at a context and the tokens/s bound they imply at `bandwidth` bytes/s."""
    weight_bytes = shape.weights_read_per_step() * DTYPE_BYTES[weight_dtype]
    kv_bytes = shape.kv_values(int(round(context))) * DTYPE_BYTES[kv_dtype]
    total = weight_bytes + kv_bytes
    return {"context": context, "weight_bytes": int(weight_bytes), "kv_bytes": int(kv_bytes),
            "bytes_per_step": int(total), "bound_tokens_per_s": bandwidth / total}


def fraction_of_bound(achieved_tokens_per_s: float | None, bound: dict[str, Any]) -> float | None:
    if not achieved_tokens_per_s:
        return None
    return achieved_tokens_per_s / bound["bound_tokens_per_s"]
