"""Native TensorRT backend: the bundle's engine set executed with our own KV caches, through cuda-python.

What it does, per engine (built by `opens2s-edge build`, selected for this GPU and TensorRT by runtime/engines.py):
- deserialized once; one execution context per optimization profile, all sharing ONE block of activation memory
  (TensorRT's user-managed allocation): every launch is ordered on one stream, so no two contexts run at once;
- every input/output gets a device buffer preallocated at the profile maximum, at a fixed address, bound once;
- decoders (`llm`, `tts_lm`): each KV cache is one zeroed device buffer (1, kv_heads, MAX, head_dim) bound as both
  `past_X_i` and `present_X_i`, so the engine's scatter writes the new rows in place and no step copies the cache.
  This is safe without TensorRT knowing about the alias: every row of `present` equals the same row of `past`
  except rows start..start+T-1, which the step overwrites and whose old contents nothing reads (they are in the
  future of every query), so any order in which the engine reads `past` and writes `present` gives the same
  result. The T > 1 steps run on the "prefill" profile; the 1-token steps on the "decode" profile, whose
  embeddings row and `start` live in pinned host memory and fixed device buffers: after one warm-up launch the
  whole step (copy row + start up, enqueue, copy logits/hidden down) is captured as a CUDA graph and replayed
  with one `cudaGraphLaunch` per token. A prompt longer than the prefill profile runs as several prefill chunks;
  a turn that would pass the cache's MAX positions stops with ContextFull, as on onnxruntime;
- the decoder outputs are already one row ((1, 1, V) logits, (1, 1, D) hidden): only that row comes back.

bf16 engines: numpy has no bfloat16, so bf16 tensors travel as their uint16 bit patterns (rounded to nearest
even on the way in) and are widened exactly to float32 on the way out; the host side sees float32.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .bundle import Bundle, BundleError
from .cuda_memory import Cuda, CudaError, CudaGraph, DeviceBuffer, PinnedArray, Stream
from .decoder import ContextFull, KVDecoder
from .dtypes import bf16_bits_to_float32, float32_to_bf16_bits
from .onnx_backend import BackendError

__all__ = ["ContextFull", "TensorRTBackend", "TrtDecoder", "bf16_bits_to_float32", "float32_to_bf16_bits"]

INSTALL_TENSORRT = ("install TensorRT 10 for this machine: on Jetson it comes with JetPack (apt package "
                    "python3-libnvinfer; use the system python3 or a venv made with --system-site-packages); on "
                    "a desktop `pip install tensorrt` (it downloads from NVIDIA's package index)")


class ProfileExceeded(BackendError):
    """An input is outside every optimization profile its engine was built with."""


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f"the TensorRT backend needs the tensorrt Python package, which is not importable "
                           f"({exc}); {INSTALL_TENSORRT}; or run with --backend onnxruntime") from exc
    return trt


@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor: how its values look on the host and on the device."""

    name: str
    is_input: bool
    device_dtype: np.dtype  # element layout on the device (uint16 for bf16)
    host_dtype: np.dtype  # what the host code uses (float32 for bf16)
    bf16: bool

    def to_device(self, x: np.ndarray) -> np.ndarray:
        """A host array as the contiguous bytes the engine expects."""
        if self.bf16:
            return float32_to_bf16_bits(np.asarray(x, np.float32))
        return np.ascontiguousarray(x, self.device_dtype)

    def to_host(self, raw: np.ndarray) -> np.ndarray:
        """Device-layout values -> host values; floats as float32 (what the rest of the runtime reads)."""
        if self.bf16:
            return bf16_bits_to_float32(raw)
        return raw.astype(np.float32) if raw.dtype.kind == "f" else raw.copy()


def _tensor_specs(trt: ModuleType, engine: Any) -> dict[str, TensorSpec]:
    dt = trt.DataType
    layouts = {dt.FLOAT: (np.float32, np.float32), dt.HALF: (np.float16, np.float16),
               dt.BF16: (np.uint16, np.float32), dt.INT32: (np.int32, np.int32), dt.INT64: (np.int64, np.int64),
               dt.BOOL: (np.bool_, np.bool_), dt.UINT8: (np.uint8, np.uint8), dt.INT8: (np.int8, np.int8)}
    specs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name)
        if dtype not in layouts:
            raise BackendError(f"engine I/O tensor {name!r} has type {dtype}, which the runtime cannot feed or read "
                               "(quantized types belong inside the engine, not at its inputs and outputs)")
        device, host = layouts[dtype]
        specs[name] = TensorSpec(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, np.dtype(device),
                                 np.dtype(host), dtype == dt.BF16)
    return specs


def _volume(shape: Sequence[int]) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.int64))


class _Engine:
    """One deserialized engine: its tensors, its profiles (by name and shape range), its contexts."""

    def __init__(self, backend: TensorRTBackend, graph: str, path: Path, profiles: list[dict]):
        trt = backend.trt
        self.backend, self.graph = backend, graph
        if not path.is_file():
            raise BackendError(f"engine file {path} for graph {graph!r} is missing (rebuild with `opens2s-edge build`)")
        backend.logger.errors.clear()
        self.engine = backend.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            detail = "; ".join(backend.logger.errors[-3:]) or "no detail from TensorRT"
            raise BackendError(f"TensorRT {trt.__version__} could not load engine {path} ({detail}); engines are "
                               "specific to one GPU model and TensorRT version: rebuild with `opens2s-edge build`")
        self.plan_bytes = path.stat().st_size
        self.specs = _tensor_specs(trt, self.engine)
        shape_io = [n for n in self.specs if self.engine.is_shape_inference_io(n)]
        if shape_io:
            raise BackendError(f"engine {path} treats {', '.join(shape_io)} as shape tensors (host values); this "
                               "runtime binds device buffers only: rebuild the engine from this bundle")
        self.inputs = [n for n, s in self.specs.items() if s.is_input]
        self.outputs = [n for n, s in self.specs.items() if not s.is_input]
        count = self.engine.num_optimization_profiles
        names = [p.get("name", str(i)) for i, p in enumerate(profiles)] if profiles else [str(i) for i in range(count)]
        if len(names) != count:
            raise BackendError(f"engine {path} has {count} optimization profiles but the engine set lists "
                               f"{len(names)} ({', '.join(names)}): the engine set is inconsistent, rebuild it")
        self.profile_names = names
        self.static = {n: tuple(int(d) for d in self.engine.get_tensor_shape(n)) for n in self.specs}
        self.dynamic = [n for n in self.inputs if any(d < 0 for d in self.static[n])]
        # (min, opt, max) per dynamic input and profile, as the engine itself reports them (authoritative).
        self.ranges: list[dict[str, tuple[tuple[int, ...], ...]]] = [
            {n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, p))
             for n in self.dynamic} for p in range(count)]

    def profile_index(self, name: str) -> int | None:
        return self.profile_names.index(name) if name in self.profile_names else None

    def profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """The first profile whose ranges hold every input shape, or ProfileExceeded naming the limit."""
        for n in self.inputs:
            if n not in self.dynamic and tuple(shapes[n]) != self.static[n]:
                raise ProfileExceeded(f"graph {self.graph!r}: input {n!r} has shape {tuple(shapes[n])}, the engine "
                                      f"takes exactly {self.static[n]}")
        for p, ranges in enumerate(self.ranges):
            if all(len(shapes[n]) == len(lo) and all(a <= d <= b for a, d, b in zip(lo, shapes[n], hi, strict=True))
                   for n, (lo, _opt, hi) in ranges.items()):
                return p
        limits = "; ".join(f"{n} {lo}..{hi}" for n, (lo, _o, hi) in self.ranges[-1].items())
        given = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ProfileExceeded(f"graph {self.graph!r}: inputs {given} are outside the engine's optimization "
                              f"profiles (largest: {limits}); rebuild the engines with larger limits")

    def context(self, profile: int) -> Any:
        """A new execution context on `profile`, using the backend's shared activation memory."""
        trt, b = self.backend.trt, self.backend
        if b.shared_scratch is not None:
            ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:
            ctx = self.engine.create_execution_context()
        if ctx is None:
            raise BackendError(f"TensorRT could not create an execution context for {self.graph!r} (out of memory?)")
        if b.shared_scratch is not None:
            ctx.set_device_memory(b.shared_scratch.ptr, b.shared_scratch.nbytes)
        ctx.set_optimization_profile_async(profile, b.stream.ptr)
        b.stream.sync()
        return ctx

    def max_input_shape(self, name: str) -> tuple[int, ...]:
        if name not in self.dynamic:
            return self.static[name]
        return max((r[name][2] for r in self.ranges), key=_volume)

    def set_shapes(self, ctx: Any, shapes: dict[str, tuple[int, ...]]) -> None:
        """Set the dynamic inputs' shapes on a context (static ones are fixed in the engine)."""
        for name in self.dynamic:
            if not ctx.set_input_shape(name, tuple(shapes[name])):
                raise ProfileExceeded(f"graph {self.graph!r}: TensorRT refused shape {tuple(shapes[name])} for "
                                      f"input {name!r}")

    def execute(self, ctx: Any) -> None:
        if not ctx.execute_async_v3(self.backend.stream.ptr):
            raise BackendError(f"TensorRT failed to enqueue graph {self.graph!r}: "
                               + ("; ".join(self.backend.logger.errors[-3:]) or "see the TensorRT log above"))


class TrtGraph:
    """A single-shot graph (audio encoder, projections, flow, estimator, HiFT) on its engine."""

    def __init__(self, backend: TensorRTBackend, engine: _Engine, output_names: list[str]):
        self.backend, self.engine = backend, engine
        missing = [n for n in output_names if n not in engine.outputs]
        if missing:
            raise BackendError(f"engine for {engine.graph!r} lacks outputs {missing}: it was built from another graph")
        self.output_names = output_names
        self.contexts = [engine.context(p) for p in range(len(engine.ranges))]
        self.buffers: dict[str, DeviceBuffer] = {}
        for name in engine.inputs:
            self._buffer(name, _volume(engine.max_input_shape(name)) * engine.specs[name].device_dtype.itemsize)
        # Outputs at the largest shape any profile gives when every input is at that profile's maximum.
        for p, ctx in enumerate(self.contexts):
            engine.set_shapes(ctx, {n: hi for n, (_lo, _opt, hi) in engine.ranges[p].items()})
            for name in engine.outputs:
                self._buffer(name, self._output_bytes(ctx, name))
        for ctx in self.contexts:
            self._bind(ctx)

    def _output_bytes(self, ctx: Any, name: str) -> int:
        shape = tuple(ctx.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise BackendError(f"engine for {self.engine.graph!r}: output {name!r} has a data-dependent shape "
                               f"{shape}; the runtime preallocates outputs and cannot run it")
        return _volume(shape) * self.engine.specs[name].device_dtype.itemsize

    def _buffer(self, name: str, nbytes: int) -> None:
        if name not in self.buffers or self.buffers[name].nbytes < nbytes:
            if name in self.buffers:
                self.backend.release(self.buffers[name])
            self.buffers[name] = self.backend.allocate(nbytes, "io")

    def _bind(self, ctx: Any) -> None:
        for name, buf in self.buffers.items():
            ctx.set_tensor_address(name, buf.ptr)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        engine, cuda, stream = self.engine, self.backend.cuda, self.backend.stream
        missing = [n for n in engine.inputs if n not in feeds]
        if missing:
            raise BackendError(f"graph {engine.graph!r} needs inputs {missing}")
        arrays = {n: engine.specs[n].to_device(feeds[n]) for n in engine.inputs}
        shapes = {n: a.shape for n, a in arrays.items()}
        ctx = self.contexts[engine.profile_for(shapes)]
        engine.set_shapes(ctx, shapes)
        grown = False
        for name in self.output_names:
            nbytes = self._output_bytes(ctx, name)
            if nbytes > self.buffers[name].nbytes:  # outputs not monotone in the inputs: grow once, rebind
                self._buffer(name, nbytes)
                grown = True
        if grown:
            for c in self.contexts:
                self._bind(c)
        for name, a in arrays.items():
            cuda.h2d(self.buffers[name].ptr, a.ctypes.data, a.nbytes, stream)
        engine.execute(ctx)
        raws = []
        for name in self.output_names:
            spec = engine.specs[name]
            raw = np.empty(tuple(ctx.get_tensor_shape(name)), spec.device_dtype)
            cuda.d2h(raw.ctypes.data, self.buffers[name].ptr, raw.nbytes, stream)
            raws.append((spec, raw))
        stream.sync()  # `arrays` stay referenced until here, so pageable sources outlive their copies
        return [spec.to_host(raw) for spec, raw in raws]


class TrtDecoder(KVDecoder):
    """One sequence on a decoder engine: its KV caches on the device, bound in place (see the module docstring)."""

    def __init__(self, backend: TensorRTBackend, engine: _Engine, embed_table: np.ndarray, cuda_graphs: bool):
        self.backend, self.engine = backend, engine
        specs = engine.specs
        for required in ("inputs_embeds", "start"):
            if required not in specs:
                raise BackendError(f"engine for {engine.graph!r} has no {required!r} input: not a decoder engine")
        self.cache_names = [n for n in engine.inputs if n.startswith("past_")]
        if not self.cache_names:
            raise BackendError(f"engine for {engine.graph!r} has no past_* cache inputs")
        self.result_names = [n for n in engine.outputs if not n.startswith("present_")]
        self.embeds_spec, self.start_spec = specs["inputs_embeds"], specs["start"]
        self.prefill_profile = engine.profile_index("prefill")
        if self.prefill_profile is None:
            self.prefill_profile = 0
        self.decode_profile = engine.profile_index("decode")
        lo, _opt, hi = engine.ranges[self.prefill_profile]["inputs_embeds"] \
            if "inputs_embeds" in engine.dynamic else (engine.static["inputs_embeds"],) * 3
        self.min_rows, self.max_rows, self.width = int(lo[1]), int(hi[1]), int(hi[2])

        # KV caches: one zeroed buffer per layer and kind, bound as past AND present (see the module docstring).
        # Zeroed, not left as they come: a masked row still enters attention as probability 0 times its value,
        # and 0 * NaN garbage would be NaN.
        self.addresses: dict[str, int] = {}
        first = engine.max_input_shape(self.cache_names[0])
        super().__init__(embed_table, int(first[2]), self.embeds_spec.host_dtype.type,
                         "--max-context at export, and build again")
        self.cache_shape = first
        for name in self.cache_names:
            present = "present_" + name[len("past_"):]
            if present not in specs:
                raise BackendError(f"engine for {engine.graph!r} has {name} but no {present}")
            buf = backend.allocate(_volume(first) * specs[name].device_dtype.itemsize, "kv_cache", zero=True)
            self.addresses[name] = self.addresses[present] = buf.ptr

        # Inputs and results: fixed device buffers plus pinned host mirrors (copies from pinned memory are truly
        # asynchronous and may be recorded in a CUDA graph).
        self.host_embeds = backend.pinned((self.max_rows, self.width), self.embeds_spec.device_dtype)
        self.host_start = backend.pinned((), self.start_spec.device_dtype)
        self.addresses["inputs_embeds"] = backend.allocate(self.host_embeds.array.nbytes, "io").ptr
        self.addresses["start"] = backend.allocate(self.host_start.array.nbytes, "io").ptr
        self.prefill = engine.context(self.prefill_profile)
        self.decode = engine.context(self.decode_profile) if self.decode_profile is not None else None
        self._shape(self.prefill, self.min_rows)
        self.host_results: dict[str, PinnedArray] = {}
        for name in self.result_names:
            shape = tuple(int(d) for d in self.prefill.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"engine for {engine.graph!r}: output {name!r} has no fixed shape ({shape})")
            self.host_results[name] = backend.pinned(shape, specs[name].device_dtype)
            self.addresses[name] = backend.allocate(self.host_results[name].array.nbytes, "io").ptr
        for ctx in (self.prefill, self.decode):
            if ctx is not None:
                for name, ptr in self.addresses.items():
                    ctx.set_tensor_address(name, ptr)
        if self.decode is not None:
            self._shape(self.decode, 1)  # the decode context's shapes never change: what makes it capturable
        self.use_graphs = cuda_graphs and self.decode is not None
        self.graph: CudaGraph | None = None
        self.decode_warm = False

    def _shape(self, ctx: Any, rows: int) -> None:
        shapes = {name: self.cache_shape for name in self.cache_names}
        self.engine.set_shapes(ctx, {**shapes, "inputs_embeds": (1, rows, self.width), "start": ()})

    def _run(self, embeds: np.ndarray, start: int) -> dict[str, np.ndarray]:
        # A prompt longer than the prefill profile runs as consecutive chunks: attention over the cache makes
        # a chunked prefill compute what one long prefill would.
        for begin in range(0, embeds.shape[0], self.max_rows):
            self._launch(embeds[begin:begin + self.max_rows], start + begin)
        self.backend.stream.sync()
        return {name: self.results_spec(name).to_host(host.array.reshape(-1, host.array.shape[-1])[-1])
                for name, host in self.host_results.items()}

    def results_spec(self, name: str) -> TensorSpec:
        return self.engine.specs[name]

    def _launch(self, rows: np.ndarray, start: int) -> None:
        n = rows.shape[0]
        self.backend.stream.sync()  # the pinned inputs may still be read by the previous launch
        self.host_embeds.array[:n] = self.embeds_spec.to_device(rows)
        self.host_start.array[...] = start
        if n == 1 and self.decode is not None:
            self._decode_step()
        else:
            self._shape(self.prefill, n)
            self._enqueue(self.prefill, n)

    def _enqueue(self, ctx: Any, n: int) -> None:
        cuda, stream = self.backend.cuda, self.backend.stream
        cuda.h2d(self.addresses["inputs_embeds"], self.host_embeds.ptr, n * self.width *
                 self.embeds_spec.device_dtype.itemsize, stream)
        cuda.h2d(self.addresses["start"], self.host_start.ptr, self.host_start.array.nbytes, stream)
        self.engine.execute(ctx)
        for name, host in self.host_results.items():
            cuda.d2h(host.ptr, self.addresses[name], host.array.nbytes, stream)

    def _decode_step(self) -> None:
        assert self.decode is not None
        if self.graph is not None:
            self.graph.launch()
            return
        if self.use_graphs and self.decode_warm:
            # The first decode launch ran normally (TensorRT finishes its lazy setup there); now record one step.
            graph = CudaGraph(self.backend.cuda, self.backend.stream)
            try:
                graph.capture(lambda: self._enqueue(self.decode, 1))
            except (CudaError, BackendError) as exc:
                self.backend.cuda.rt.cudaGetLastError()  # clear the capture's error state before going on
                print(f"[tensorrt] {self.engine.graph}: CUDA graph capture failed, decoding without it ({exc})",
                      file=sys.stderr)
                self.use_graphs = False
            else:
                self.graph = graph
                graph.launch()
                return
        self._enqueue(self.decode, 1)
        self.decode_warm = True


class TensorRTBackend:
    """The bundle's engine set on this GPU. Raises BackendError (named, saying what to install or build) when
    TensorRT, cuda-python, a GPU or a matching engine set is missing."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, engines: str | None = None, precision: str | None = None,
                 cuda_graphs: bool = True, device: int = 0):
        self.trt = trt = import_tensorrt()
        self.cuda = cuda = Cuda()
        if cuda.device_count() == 0:
            err = cuda.rt.cudaGetDeviceCount()[0]
            raise BackendError(f"the TensorRT backend needs an NVIDIA GPU and driver, and CUDA sees none "
                               f"({cuda.error_text(err)}); run with --backend onnxruntime")
        self.gpu_name, self.compute_capability = cuda.device(device)
        self.engine_set = _select_engine_set(bundle, self.gpu_name, self.compute_capability, trt.__version__,
                                             engines, precision)
        self.bundle, self.cuda_graphs = bundle, cuda_graphs
        self.free_before, self.total = cuda.mem_info()
        self.stream = Stream(cuda)
        self.bytes = {"kv_cache": 0, "io": 0, "scratch": 0, "pinned_host": 0}
        self._device: list[DeviceBuffer] = []
        self._pinned: list[PinnedArray] = []
        self.logger = _make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {name: _Engine(self, name, Path(self.engine_set.graph_path(name)),
                                      self.engine_set.profiles(name)) for name in bundle.manifest["graphs"]}
        # One activation block for every context: launches are serialized on one stream, so they can share it.
        self.shared_scratch: DeviceBuffer | None = None
        if all(hasattr(e.engine, "device_memory_size_v2") for e in self.engines.values()):
            self.shared_scratch = self.allocate(max(e.engine.device_memory_size_v2 for e in self.engines.values()),
                                                "scratch")

    # -- what the Engine asks for ---------------------------------------------------------------------
    def graph(self, name: str) -> TrtGraph:
        return TrtGraph(self, self._engine(name), [o["name"] for o in self.bundle.graph(name)["outputs"]])

    def decoder(self, name: str, embed_table: np.ndarray) -> TrtDecoder:
        return TrtDecoder(self, self._engine(name), embed_table, self.cuda_graphs)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "tensorrt": self.trt.__version__, "gpu": self.gpu_name,
                "compute_capability": ".".join(map(str, self.compute_capability)),
                "engine_set": getattr(self.engine_set, "key", None), "cuda_graphs": self.cuda_graphs,
                "memory": self.memory_report()}

    def memory_report(self) -> dict[str, int]:
        """Device memory: what the driver reports free before loading and now, and what we allocated by kind
        (engines' weights are the difference not listed: TensorRT allocates them on deserialization)."""
        free_now, total = self.cuda.mem_info()
        plans = sum(e.plan_bytes for e in self.engines.values())
        return {"device_total": total, "device_free_before": self.free_before, "device_free_now": free_now,
                "device_used": self.free_before - free_now, "engine_plan_bytes": plans,
                **{f"{k}_bytes": v for k, v in self.bytes.items()}}

    # -- memory, all owned here so close() can give it back ------------------------------------------
    def allocate(self, nbytes: int, kind: str, zero: bool = False) -> DeviceBuffer:
        buf = DeviceBuffer(self.cuda, nbytes, zero_on=self.stream if zero else None)
        self._device.append(buf)
        self.bytes[kind] += buf.nbytes
        return buf

    def release(self, buf: DeviceBuffer) -> None:
        self._device.remove(buf)
        self.bytes["io"] -= buf.nbytes
        buf.free()

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> PinnedArray:
        arr = PinnedArray(self.cuda, shape, dtype)
        self._pinned.append(arr)
        self.bytes["pinned_host"] += arr.array.nbytes
        return arr

    def _engine(self, name: str) -> _Engine:
        if name not in self.engines:
            raise BundleError(f"the engine set has no engine for graph {name!r}")
        return self.engines[name]

    def close(self) -> None:
        """Free device and pinned memory now (otherwise the process exit does)."""
        self.stream.sync()
        for buf in self._device:
            buf.free()
        for arr in self._pinned:
            arr.free()
        self._device, self._pinned = [], []


def _make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that prints warnings and keeps the errors, so a failure can quote them."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[tensorrt] {msg}", file=sys.stderr)

    return Logger()


def _select_engine_set(bundle: Bundle, gpu_name: str, capability: tuple[int, int], trt_version: str,
                       key: str | None, precision: str | None) -> Any:
    """The bundle's engine set for this GPU and TensorRT (runtime/engines.py decides, and explains a mismatch);
    `key` names one set explicitly (`run --engines KEY`), which must then fit this machine too."""
    from .engines import EngineMismatch, GpuInfo, select_engine_set

    gpu = GpuInfo(gpu_name, f"{capability[0]}.{capability[1]}")
    if key is None:
        return select_engine_set(bundle, gpu, trt_version, precision)
    sets = bundle.manifest.get("engines") or {}
    if key not in sets:
        raise EngineMismatch(f"bundle {bundle.root} has no engine set {key!r} (has: {', '.join(sets) or 'none'})")
    chosen = select_engine_set(bundle, gpu, trt_version, sets[key].get("precision"))
    if chosen.key != key:
        raise EngineMismatch(f"engine set {key!r} was not built for this machine ({gpu.name}, compute capability "
                             f"{gpu.compute_capability}, TensorRT {trt_version}); {chosen.key!r} was")
    return chosen
