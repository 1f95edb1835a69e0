"""onnxruntime backend: sessions created once, KV caches preallocated and updated in place.

The decoder graphs read `past_key_i`/`past_value_i` of shape (1, kv_heads, MAX, head_dim) and return
`present_*` of the same shape with the new rows written. Binding one buffer as both the input and the
output lets the scatter write in place, so a decode step never copies the cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .decoder import ContextFull, KVDecoder
from .dtypes import ONNX_TYPES

__all__ = ["BackendError", "ContextFull", "OnnxRuntimeBackend", "OrtDecoder", "OrtGraph", "make_session"]

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


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


def make_session(path: Path, providers: Sequence[Any], threads: int = 0) -> ort.InferenceSession:
    """One session. `providers` as onnxruntime takes them: names, or (name, options) pairs."""
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
    return {i.name: ONNX_TYPES.get(i.type, np.float32) for i in session.get_inputs()}


def cache_device(providers: Sequence[str]) -> str:
    """Where a decoder's KV cache lives: on the GPU when the session's first (preferred) provider runs there.

    CUDA EP: the graph's nodes run on the device, so a cache bound in host memory would be copied up and back
    down every step (the whole cache, twice per token); bound as a CUDA OrtValue it never leaves the device.
    The TensorRT EP takes CUDA buffers the same way. CPU (or a GPU provider listed only as a fallback): host.
    """
    first = providers[0] if providers else "CPUExecutionProvider"
    return "cuda" if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"


class OrtDecoder(KVDecoder):
    """One sequence's KV cache on a shared decoder session, bound in place (past_* and present_* are one buffer)."""

    def __init__(self, session: ort.InferenceSession, embed_table: np.ndarray, device: str | None = None,
                 device_id: int = 0):
        inputs = {i.name: i for i in session.get_inputs()}
        cache_names = sorted((n for n in inputs if n.startswith("past_")), key=_cache_order)
        if not cache_names:
            raise BackendError("decoder graph has no past_* cache inputs")
        first = inputs[cache_names[0]]
        super().__init__(embed_table, int(first.shape[2]), ONNX_TYPES[inputs["inputs_embeds"].type])
        self.session = session
        self.device = device or cache_device(session.get_providers())
        self.cache_names = cache_names
        dtype = ONNX_TYPES[first.type]
        shapes = {n: [int(d) for d in inputs[n].shape] for n in cache_names}
        if self.device == "cpu":
            # The cache lives in numpy arrays that onnxruntime reads and writes through OrtValues.
            self.cache = {n: np.zeros(shapes[n], dtype=dtype) for n in cache_names}
            self.cache_values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.cache.items()}
        else:
            # On the device: one CUDA OrtValue per cache, created from zeros (not left uninitialized: a masked
            # row still enters attention as probability 0 times its value, and 0 * NaN garbage would be NaN).
            self.cache = {}
            self.cache_values = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros(shapes[n], dtype=dtype), self.device,
                                                                     device_id) for n in cache_names}
        self.binding = session.io_binding()
        # Results first, so they are the first values get_outputs() returns; then the in-place cache.
        self.output_names = [o.name for o in session.get_outputs() if not o.name.startswith("present_")]
        for name in self.output_names:
            self.binding.bind_output(name, "cpu")
        for name, value in self.cache_values.items():
            self.binding.bind_ortvalue_input(name, value)
            self.binding.bind_ortvalue_output("present_" + name[len("past_"):], value)

    def _run(self, embeds: np.ndarray, start: int) -> dict[str, np.ndarray]:
        self.binding.bind_cpu_input("inputs_embeds", embeds[None])
        self.binding.bind_cpu_input("start", np.array(start, dtype=np.int64))
        self.session.run_with_iobinding(self.binding)
        values = self.binding.get_outputs()
        # Only the result rows are read back (copied: onnxruntime reuses its output buffers next run);
        # the cache outputs are our own buffers, already updated in place.
        return {name: np.array(values[i].numpy()[0, -1], dtype=np.float32)
                for i, name in enumerate(self.output_names)}


class OrtGraph:
    """A single-shot graph: host arrays in (cast to the graph's own input dtypes, so an fp16 bundle takes the
    same float32 feeds), host arrays out in output order, float outputs as float32."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.dtypes = input_dtypes(session)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self.session.run(None, {k: np.ascontiguousarray(v, self.dtypes[k]) for k, v in feeds.items()})
        return [o.astype(np.float32, copy=False) if o.dtype.kind == "f" else o for o in outs]


def user_cache_dir() -> Path:
    """Where generated, re-creatable files go: $OPENS2S_EDGE_CACHE, else $XDG_CACHE_HOME/opens2s-edge."""
    if os.environ.get("OPENS2S_EDGE_CACHE"):
        return Path(os.environ["OPENS2S_EDGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "opens2s-edge"


def tensorrt_ep_options(manifest: dict, graph_name: str, cache_root: Path) -> dict[str, str]:
    """onnxruntime TensorRT EP options for one bundle graph.

    - precision follows the graph's dtype (an fp16 graph without `trt_fp16_enable` would be built in fp32);
    - engines and the timing cache persist under the user cache dir, keyed by the graph file's sha256, so the
      second session loads in seconds instead of rebuilding, and a changed graph never meets a stale engine;
    - explicit profiles from the manifest limits for the graphs that have them (decoders: 1..max_context
      tokens, optimized for the 1-token decode step; audio encoder: 1..max_windows windows). The EP needs all
      dynamic inputs of a graph or none, so the token2wav graphs, whose lengths the manifest does not bound,
      get none and the EP sizes their engines from the shapes it sees.
    """
    graph = manifest["graphs"][graph_name]
    digest = manifest.get("files", {}).get(graph["file"], {}).get("sha256", "unhashed")[:16]
    path = cache_root / "ort-tensorrt" / f"{graph_name}-{digest}"
    dtype = graph.get("dtype", manifest.get("dtype"))
    options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(path),
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(path)}
    if dtype == "fp16":
        options["trt_fp16_enable"] = "True"
    elif dtype == "bf16":
        options["trt_bf16_enable"] = "True"  # onnxruntime >= 1.23; bf16 needs compute capability >= 8.0
    limits = graph.get("limits", {})
    ranges: dict[str, tuple[int, int, int]] = {}
    if "max_context" in limits:
        ranges["tokens"] = (1, 1, int(limits["max_context"]))
    if "max_windows" in limits and "window_frames" in limits:
        frames = int(limits["window_frames"])
        ranges["frames"] = (frames, frames, frames * int(limits["max_windows"]))
    dynamic = [i for i in graph["inputs"] if any(isinstance(d, str) for d in i["shape"])]
    if dynamic and all(d in ranges for i in dynamic for d in i["shape"] if isinstance(d, str)):
        for key, which in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1),
                           ("trt_profile_max_shapes", 2)):
            options[key] = ",".join(
                i["name"] + ":" + "x".join(str(ranges[d][which] if isinstance(d, str) else d) for d in i["shape"])
                for i in dynamic)
    return options


def session_providers(providers: Sequence[str], manifest: dict, graph_name: str,
                      cache_root: Path | None = None) -> list[Any]:
    """Resolved provider names -> what InferenceSession takes, with TensorRT EP options attached per graph."""
    return [(p, tensorrt_ep_options(manifest, graph_name, cache_root or user_cache_dir()))
            if p == "TensorrtExecutionProvider" else p for p in providers]


class OnnxRuntimeBackend:
    """The onnxruntime backend: one session per bundle graph, on the providers asked for (CPU, CUDA EP,
    TensorRT EP). Sessions and caches are created once; the Engine asks for each graph by name."""

    name = "onnxruntime"

    def __init__(self, bundle: Any, providers: Sequence[str] = ("cpu",), threads: int = 0):
        self.bundle = bundle
        self.providers = resolve_providers(providers)
        self.threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}

    def session(self, name: str) -> ort.InferenceSession:
        """The graph's one session (loaded on first use): every sequence of a decoder shares it."""
        if name not in self._sessions:
            providers = session_providers(self.providers, self.bundle.manifest, name)
            self._sessions[name] = make_session(self.bundle.graph_path(name), providers, self.threads)
        return self._sessions[name]

    def graph(self, name: str) -> OrtGraph:
        return OrtGraph(self.session(name))

    def decoder(self, name: str, embed_table: np.ndarray) -> KVDecoder:
        """A new sequence (its own KV cache) on the decoder graph `name`."""
        # A gqa-form graph (GroupQueryAttention, issue 15) has its own binding: runtime/ort_gqa.py.
        if self.bundle.graph(name).get("form") == "gqa":
            from .ort_gqa import GqaDecoder

            return GqaDecoder(self.session(name), embed_table)
        return OrtDecoder(self.session(name), embed_table)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": list(self.providers)}


def _cache_order(name: str) -> tuple[int, str]:
    layer = int(name.rsplit("_", 1)[1])
    return layer, name

