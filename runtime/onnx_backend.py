"""onnxruntime backend: sessions created once, KV caches preallocated and updated in place.

The decoder graphs read `past_key_i`/`past_value_i` of shape (1, kv_heads, MAX, head_dim) and return
`present_*` of the same shape with the new rows written. Binding one buffer as both the input and the
output lets the scatter write in place, so a decode step never copies the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class BackendError(RuntimeError):
    """The requested execution provider or graph cannot be used on this machine."""


def resolve_providers(names: Sequence[str]) -> list[str]:
    """Map 'cpu'/'cuda'/'tensorrt' to onnxruntime providers, refusing ones this install lacks."""
    available = set(ort.get_available_providers())
    chosen = []
    for name in names:
        provider = PROVIDERS.get(name.lower(), name)
        if provider not in available:
            raise BackendError(
                f"execution provider {name!r} ({provider}) is not available in this onnxruntime "
                f"(available: {', '.join(sorted(available))}); install onnxruntime-gpu for cuda/tensorrt")
        chosen.append(provider)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def make_session(path: Path, providers: Sequence[str], threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types from C++
        raise BackendError(f"onnxruntime could not load {path}: {exc}") from exc


def input_dtypes(session: ort.InferenceSession) -> dict[str, type]:
    """numpy dtype of each graph input: an fp16 bundle's graphs take fp16 activations, an fp32 one fp32."""
    return {i.name: _NUMPY_DTYPES.get(_onnx_type(i.type), np.float32) for i in session.get_inputs()}


class CachedDecoder:
    """One decoder graph with its preallocated KV cache; `run(embeds)` advances the position."""

    def __init__(self, session: ort.InferenceSession, embed_table: np.ndarray):
        self.session = session
        self.embed_table = embed_table
        inputs = {i.name: i for i in session.get_inputs()}
        self.cache_names = sorted((n for n in inputs if n.startswith("past_")), key=_cache_order)
        if not self.cache_names:
            raise BackendError("decoder graph has no past_* cache inputs")
        first = inputs[self.cache_names[0]]
        self.max_len = int(first.shape[2])
        dtype = _NUMPY_DTYPES[_onnx_type(first.type)]
        self.embed_dtype = _NUMPY_DTYPES[_onnx_type(inputs["inputs_embeds"].type)]
        # The cache lives in numpy arrays that onnxruntime reads and writes through OrtValues.
        self.cache = {n: np.zeros([int(d) for d in inputs[n].shape], dtype=dtype) for n in self.cache_names}
        self.cache_values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.cache.items()}
        self.binding = session.io_binding()
        # Results first, so they are the first values get_outputs() returns; then the in-place cache.
        self.output_names = [o.name for o in session.get_outputs() if not o.name.startswith("present_")]
        for name in self.output_names:
            self.binding.bind_output(name, "cpu")
        for name, value in self.cache_values.items():
            self.binding.bind_ortvalue_input(name, value)
            self.binding.bind_ortvalue_output("present_" + name[len("past_"):], value)
        self.pos = 0

    def reset(self) -> None:
        """A new turn: positions restart at 0; stale rows past the position are masked, never read."""
        self.pos = 0

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        return self.embed_table[np.asarray(ids, dtype=np.int64)]

    def run(self, embeds: np.ndarray) -> dict[str, np.ndarray]:
        """Feed embeddings (T, D) at the current position; returns the last row of each output."""
        t = embeds.shape[0]
        if self.pos + t > self.max_len:
            raise ContextFull(f"the turn needs {self.pos + t} positions but the bundle's cache holds {self.max_len}"
                              " (export with a larger --max-context)")
        self.binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds[None], dtype=self.embed_dtype))
        self.binding.bind_cpu_input("start", np.array(self.pos, dtype=np.int64))
        self.session.run_with_iobinding(self.binding)
        values = self.binding.get_outputs()
        self.pos += t
        # Only the result rows are read back (copied: onnxruntime reuses its output buffers next run);
        # the cache outputs are our own buffers, already updated in place.
        return {name: np.array(values[i].numpy()[0, -1], dtype=np.float32)
                for i, name in enumerate(self.output_names)}


class ContextFull(RuntimeError):
    """The KV cache has no room for the next positions: the turn stops here."""


def _cache_order(name: str) -> tuple[int, str]:
    layer = int(name.rsplit("_", 1)[1])
    return layer, name


def _onnx_type(type_string: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
            "tensor(int32)": "int32"}.get(type_string, type_string)
