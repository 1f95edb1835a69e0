"""The one table of tensor dtypes: bundle names (fp32/fp16/bf16), ONNX type strings, numpy host types.

numpy has no bfloat16: bf16 tensors (embedding tables, TensorRT bindings) travel as their uint16 bit patterns and
are widened to float32 on the host. Every backend converts through the two functions here.
"""

from __future__ import annotations

import numpy as np

# bundle dtype name -> (numpy dtype of the element layout, numpy dtype the host computes in)
BUNDLE_DTYPES: dict[str, tuple[type, type]] = {
    "fp32": (np.float32, np.float32),
    "fp16": (np.float16, np.float16),
    "bf16": (np.uint16, np.float32),
}
# onnxruntime's type strings -> numpy
ONNX_TYPES: dict[str, type] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint16)": np.uint16,
}
# the manifest's IO dtype names -> numpy (written by export from the ONNX graph)
NUMPY_NAMES: dict[str, type] = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
                                "bool": np.bool_, "bfloat16": np.uint16, "uint16": np.uint16}


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even like a GPU cast; NaN stays NaN."""
    x = np.ascontiguousarray(x, np.float32)
    bits = x.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def bf16_bits_to_float32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def host_rows(table: np.ndarray, ids: np.ndarray, dtype: type) -> np.ndarray:
    """Rows of an embedding table (any stored layout, bf16 bits included) in the host dtype `dtype`."""
    rows = table[np.asarray(ids, dtype=np.int64)]
    if rows.dtype == np.uint16:
        rows = bf16_bits_to_float32(rows)
    return rows.astype(dtype, copy=False)
