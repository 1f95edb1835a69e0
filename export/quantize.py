"""Quantized engine precisions (fp8, int8, int4-weight) through NVIDIA ModelOpt's ONNX quantization.

ModelOpt (`modelopt.onnx.quantization.quantize`) inserts Q/DQ nodes following TensorRT's rules, calibrating the
activation scales by running the graph on onnxruntime; TensorRT then builds the Q/DQ graph with explicit
quantization (export/trt_build.py). We do not quantize anything ourselves: this module only prepares real
calibration inputs and calls ModelOpt.

Calibration data are real inputs of each graph, recorded while the bundle answers voice turns on onnxruntime
(`collect_calibration`): the log-mel of the utterances for the audio encoder, and for each decoder the whole
sequence it consumed in the turn (prompt with the spliced audio embeddings plus every generated token for the LLM;
speaker start, projected hidden states and speech tokens for the TTS LM) as one prefill at position 0. The
decoders are causal, so that prefill computes at every position exactly the activations the step-by-step decode
computed, without storing a KV cache per sample (the caches are fed as zeros, the graph writes the rows it reads).
The samples are written to an .npz (`save_calibration`) kept beside the engines.
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import opens2s_edge
from opens2s_edge.runtime.bundle import Bundle

# --precision -> (ModelOpt quantize_mode, calibration_method). "max" for int8/fp8: one pass, the method ModelOpt's
# LLM recipes use; AWQ with clipping for int4 (weight-only, activation-aware scales).
MODES = {"int8": ("int8", "max"), "fp8": ("fp8", "max"), "int4-weight": ("int4", "awq_clip")}
MODELOPT_HINT = ("ModelOpt is not importable: `pip install 'opens2s-edge[quantize]'` (nvidia-modelopt plus "
                 "onnx-graphsurgeon, polygraphy, ml_dtypes, onnxslim, lief, cppimport, onnxconverter-common)")
ASSET_WAV = Path(opens2s_edge.__file__).resolve().parent / "assets" / "hello.wav"
# Per graph, at most this many calibration samples (the estimator runs 10 Euler steps per chunk: more than enough).
MAX_SAMPLES = 16
_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


class QuantizeError(RuntimeError):
    """Quantization cannot run, or its result breaks the graph's contract."""


# -- calibration inputs ----------------------------------------------------------------------------------
class _RecordingGraph:
    def __init__(self, inner: Any, sink: list[dict[str, np.ndarray]]):
        self.inner, self.sink = inner, sink

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.sink.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.inner.run(feeds)


class _RecordingDecoder:
    """A Decoder that remembers every row it is fed, in order: the sequence of one turn."""

    def __init__(self, inner: Any, sink: list[np.ndarray]):
        self.inner, self.sink = inner, sink

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def pos(self) -> int:
        return self.inner.pos

    def reset(self) -> None:
        self.sink.append(None)  # a turn boundary
        self.inner.reset()

    def run(self, embeds: np.ndarray) -> dict[str, np.ndarray]:
        self.sink.append(np.array(embeds, copy=True))
        return self.inner.run(embeds)


class RecordingBackend:
    """Wraps a runtime backend (runtime/engine.py `Backend`) and records the inputs of the graphs named."""

    def __init__(self, inner: Any, graphs: Sequence[str]):
        self.inner = inner
        self.name = f"recording({inner.name})"
        self.wanted = set(graphs)
        self.calls: dict[str, list] = {g: [] for g in graphs}

    def graph(self, name: str) -> Any:
        inner = self.inner.graph(name)
        return _RecordingGraph(inner, self.calls[name]) if name in self.wanted else inner

    def decoder(self, name: str, embed_table: np.ndarray) -> Any:
        inner = self.inner.decoder(name, embed_table)
        return _RecordingDecoder(inner, self.calls[name]) if name in self.wanted else inner

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "recording": sorted(self.wanted)}


def _turn_sequences(rows: list) -> list[np.ndarray]:
    """Decoder feeds, split at each reset into one (T, D) sequence per turn."""
    out, current = [], []
    for item in [*rows, None]:
        if item is None:
            if current:
                out.append(np.concatenate(current))
            current = []
        else:
            current.append(item)
    return out


def _graph_inputs(bundle: Bundle, name: str) -> dict[str, dict]:
    return {i["name"]: i for i in bundle.graph(name)["inputs"]}


def collect_calibration(bundle: Bundle, graphs: Sequence[str], wavs: Sequence[Path] | None = None,
                        max_text_tokens: int = 24, max_speech_tokens: int = 64, providers: Sequence[str] = ("cpu",),
                        max_samples: int = MAX_SAMPLES) -> dict[str, list[dict[str, np.ndarray]]]:
    """Real inputs of `graphs`, recorded while the bundle answers one greedy turn per utterance on onnxruntime.
    Decoder samples hold only `inputs_embeds` and `start`: the caches are zeros (see the module docstring)."""
    from opens2s_edge.runtime.audio import load_wav
    from opens2s_edge.runtime.engine import Engine, TurnOptions
    from opens2s_edge.runtime.onnx_backend import OnnxRuntimeBackend

    recorder = RecordingBackend(OnnxRuntimeBackend(bundle, providers), graphs)
    engine = Engine.from_bundle(bundle, backend=recorder)
    options = TurnOptions(greedy=True, max_text_tokens=max_text_tokens, max_speech_tokens=max_speech_tokens)
    for wav_path in wavs or [ASSET_WAV]:
        wav = load_wav(Path(wav_path))
        for _ in engine.turn(wav, options):
            pass
    samples: dict[str, list[dict[str, np.ndarray]]] = {}
    for name in graphs:
        inputs = _graph_inputs(bundle, name)
        calls = recorder.calls[name]
        if bundle.graph(name).get("aliases"):
            calls = [{"inputs_embeds": seq[None], "start": np.array(0, np.int64)} for seq in _turn_sequences(calls)]
        if not calls:
            raise QuantizeError(f"no calibration input was recorded for graph {name!r}")
        keep = np.unique(np.linspace(0, len(calls) - 1, min(max_samples, len(calls))).round().astype(int))
        samples[name] = [{k: np.asarray(v, _NUMPY.get(inputs[k]["dtype"], np.float32)) for k, v in calls[i].items()}
                         for i in keep]
    return samples


def save_calibration(path: Path, samples: dict[str, list[dict[str, np.ndarray]]]) -> Path:
    """One .npz: key "<graph>/<sample index>/<input name>"."""
    arrays = {f"{g}/{i:04d}/{k}": v
              for g, rows in samples.items() for i, row in enumerate(rows) for k, v in row.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_calibration(path: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    out: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    with np.load(path) as data:
        for key in data.files:
            graph, index, name = key.split("/", 2)
            out.setdefault(graph, {}).setdefault(int(index), {})[name] = data[key]
    return {g: [rows[i] for i in sorted(rows)] for g, rows in out.items()}


# -- ModelOpt --------------------------------------------------------------------------------------------
def import_modelopt() -> Callable:
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise QuantizeError(f"{MODELOPT_HINT} ({exc})") from exc
    if "calibration_data_reader" not in inspect.signature(quantize).parameters:
        # Older releases only take stacked arrays, which cannot hold prompts of different lengths or the
        # decoders' scalar `start`.
        raise QuantizeError("this nvidia-modelopt has no calibration_data_reader; upgrade: pip install -U "
                            "'nvidia-modelopt>=0.47'")
    return quantize


def _reader(samples: list[dict[str, np.ndarray]], inputs: dict[str, dict]):
    """An onnxruntime CalibrationDataReader (what ModelOpt takes) over our samples; inputs a sample lacks (the
    decoder caches) are zeros of their static shape, one shared array each."""
    from onnxruntime.quantization import CalibrationDataReader

    zeros = {}
    for name, spec in inputs.items():
        if any(name not in s for s in samples):
            if any(isinstance(d, str) for d in spec["shape"]):
                raise QuantizeError(f"calibration samples lack input {name!r}, whose shape is dynamic")
            zeros[name] = np.zeros(spec["shape"], _NUMPY.get(spec["dtype"], np.float32))
    feeds = [{**zeros, **s} for s in samples]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def get_first(self) -> dict[str, np.ndarray]:
            return feeds[0]

        def rewind(self) -> None:
            self._it = iter(feeds)

    return Reader()


def _same_length(samples: list[dict[str, np.ndarray]], inputs: dict[str, dict]) -> list[dict[str, np.ndarray]]:
    """AWQ stacks the samples of each input: crop every dynamic dim to the shortest sample's length."""
    out = [dict(s) for s in samples]
    for name, spec in inputs.items():
        for axis, dim in enumerate(spec["shape"]):
            if isinstance(dim, str) and all(name in s for s in out):
                n = min(s[name].shape[axis] for s in out)
                for s in out:
                    s[name] = np.take(s[name], np.arange(n), axis=axis)
    return out


def _external_files(path: Path) -> list[Path]:
    model = onnx.load(str(path), load_external_data=False)
    names = {kv.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for kv in t.external_data if kv.key == "location"}
    return [path.parent / n for n in sorted(names)]


def _run_modelopt(quantize: Callable, src: Path, dst: Path, mode: str, method: str, samples: list, inputs: dict,
                  high_precision: str, calibration_eps: Sequence[str]) -> None:
    quantize(onnx_path=str(src), quantize_mode=mode, calibration_data_reader=_reader(samples, inputs),
             calibration_method=method, calibration_eps=list(calibration_eps), high_precision_dtype=high_precision,
             use_external_data_format=True, output_path=str(dst), log_level="WARNING")


def _io(model: onnx.ModelProto) -> list[tuple[str, int, int]]:
    return [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
            for v in (*model.graph.input, *model.graph.output)]


def quantize_graph(src: Path, dst: Path, precision: str, samples: list[dict[str, np.ndarray]], inputs: dict[str, dict],
                   high_precision: str, calibration_eps: Sequence[str] = ("cpu",), method: str | None = None) -> Path:
    """`src` (a bundle graph, only read) -> `dst`, a Q/DQ graph with external data beside it. The inputs and
    outputs keep their names, dtypes and ranks (the runtime binds the caches in place: they must not change)."""
    if precision not in MODES:
        raise QuantizeError(f"no ModelOpt mode for precision {precision!r} (choose from: {', '.join(MODES)})")
    if high_precision not in ("fp32", "fp16"):
        raise QuantizeError(f"quantization calibrates on onnxruntime, which has no bf16 kernels on the CPU: quantize "
                            f"from an fp16 (or fp32) bundle, not {high_precision}")
    quantize = import_modelopt()
    mode, default_method = MODES[precision]
    method = method or default_method
    if method.startswith("awq"):
        samples = _same_length(samples, inputs)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # ModelOpt rewrites the model it is given (onnx.shape_inference.infer_shapes_path in place) and writes its
    # intermediates beside the output: it works on a copy, never on the bundle's graph. The weights are copied
    # too, since onnx refuses external data reached through a link.
    work = dst.parent / f".{dst.stem}.source"
    work.mkdir(exist_ok=True)
    copy = work / src.name
    for path in (src, *_external_files(src)):
        shutil.copyfile(path, work / path.name)
    try:
        _run_modelopt(quantize, copy, dst, mode, method, samples, inputs, high_precision, calibration_eps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not dst.is_file():
        raise QuantizeError(f"ModelOpt wrote no {dst}")
    before = _io(onnx.load(str(src), load_external_data=False))
    after = _io(onnx.load(str(dst), load_external_data=False))
    if sorted(before) != sorted(after):
        raise QuantizeError(f"{src.name}: quantization changed the graph's inputs/outputs:\n  before {before}\n  "
                            f"after  {after}")
    return dst


# -- symmetric weights for TensorRT ------------------------------------------------------------------------------------
# Integer weight types a DequantizeLinear may read, by ONNX element type: (bits, signed).
_WEIGHT_TYPES = {onnx.TensorProto.INT8: (8, True), onnx.TensorProto.UINT8: (8, False),
                 onnx.TensorProto.INT4: (4, True), onnx.TensorProto.UINT4: (4, False)}


def _expand(scale: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """A DequantizeLinear scale (or zero point) broadcast to the quantized tensor's shape, per the ONNX spec:
    a scalar (per tensor), a 1-D vector along `axis` (per axis), or a blocked tensor of the input's rank."""
    if scale.ndim == 0 or scale.size == 1:
        return np.broadcast_to(scale.reshape(()), shape)
    if block:
        return np.repeat(scale, block, axis=axis).take(np.arange(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = scale.shape[0]
    return np.broadcast_to(scale.reshape(view), shape)


def _group_amax(w: np.ndarray, scale_shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """max |w| over the elements that share one scale, in the scale's shape."""
    if len(scale_shape) == 0 or int(np.prod(scale_shape)) == 1:
        return np.abs(w).max().reshape(scale_shape)
    if block:
        n = w.shape[axis]
        pad = [(0, 0)] * w.ndim
        pad[axis] = (0, -n % block)
        padded = np.abs(np.pad(w, pad))
        grouped = padded.reshape(*padded.shape[:axis], padded.shape[axis] // block, block, *padded.shape[axis + 1:])
        return grouped.max(axis=axis + 1)
    others = tuple(i for i in range(w.ndim) if i != axis)
    return np.abs(w).max(axis=others)


def _int4():
    try:
        import ml_dtypes
    except ImportError as exc:
        raise QuantizeError(f"int4 weights are written through ml_dtypes: {MODELOPT_HINT} ({exc})") from exc
    return ml_dtypes.int4


def fold_zero_points(src: Path, dst: Path | None = None, widen: bool = False) -> int:
    """Rewrite every DequantizeLinear of a constant weight that has a nonzero zero point (asymmetric quantization,
    e.g. onnxruntime's int4 weight-only QDQ: UINT4 with zero points) as a symmetric one, which is what TensorRT's
    DequantizeLinear takes: the weight is dequantized exactly (float64), then quantized again with a zero zero point
    and one new scale per group of the same granularity (per tensor, per axis or per block), as INT8 / INT4. Each
    weight moves by at most half a new quantization step. `widen`: a 4-bit weight becomes INT8 `x - zero_point`
    with its scale unchanged instead, which is exact (both lie in 0..15, so the difference fits) at twice the bytes.
    Activations (computed inputs) are left alone: an asymmetric activation cannot be folded away. Writes `dst`
    (default: `src` in place, external data beside it); returns the number of weights rewritten (0: nothing
    written)."""
    from onnx import numpy_helper

    model = onnx.load(str(src))  # with its external data: the weights are rewritten
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or not node.input[2]:
            continue
        x_name, s_name, z_name = node.input[:3]
        if not all(n in inits for n in (x_name, s_name, z_name)) or inits[x_name].data_type not in _WEIGHT_TYPES:
            continue
        zero = numpy_helper.to_array(inits[z_name]).astype(np.float64)
        if not zero.any():
            continue
        bits, _ = _WEIGHT_TYPES[inits[x_name].data_type]
        attrs = {a.name: a.i for a in node.attribute if a.name in ("axis", "block_size")}
        x = numpy_helper.to_array(inits[x_name]).astype(np.float64)
        axis, block = attrs.get("axis", 1) % max(x.ndim, 1), attrs.get("block_size", 0)
        scale_arr = numpy_helper.to_array(inits[s_name])
        weight = (x - _expand(zero, x.shape, axis, block)) * _expand(scale_arr.astype(np.float64), x.shape, axis, block)
        if widen and bits == 4:
            q, new_scale, bits = x - _expand(zero, x.shape, axis, block), scale_arr, 8
        else:
            qmax = 127 if bits == 8 else 7
            new_scale = (_group_amax(weight, scale_arr.shape, axis, block) / qmax).astype(scale_arr.dtype)
            new_scale = np.where(new_scale > 0, new_scale, np.finfo(scale_arr.dtype).tiny).astype(scale_arr.dtype)
            q = np.clip(np.round(weight / _expand(new_scale.astype(np.float64), x.shape, axis, block)), -qmax, qmax)
        q_tensor = numpy_helper.from_array(q.astype(np.int8 if bits == 8 else _int4()), f"{x_name}_symmetric")
        s_tensor = numpy_helper.from_array(new_scale, f"{s_name}_symmetric")
        model.graph.initializer.extend([q_tensor, s_tensor])
        del node.input[2:]  # no zero point: zero
        node.input[0], node.input[1] = q_tensor.name, s_tensor.name
        for name in (x_name, s_name, z_name):
            consumers[name] -= 1
        folded += 1
    if not folded:
        return 0
    unused = {n for n, c in consumers.items() if c == 0}
    kept = [t for t in model.graph.initializer if t.name not in unused]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    dst = Path(dst or src)
    names = _external_files(Path(src))
    location = names[0].name if names and dst == Path(src) else f"{dst.name}.data"
    dst.parent.mkdir(parents=True, exist_ok=True)
    (dst.parent / location).unlink(missing_ok=True)  # onnx appends to an existing external data file
    onnx.save(model, str(dst), save_as_external_data=True, location=location, size_threshold=1024)
    return folded


def calibration_providers() -> list[str]:
    """ModelOpt calibration EPs: the GPU when this onnxruntime has the CUDA EP, else the CPU."""
    import onnxruntime as ort

    return ["cuda:0", "cpu"] if "CUDAExecutionProvider" in ort.get_available_providers() else ["cpu"]


def quantize_bundle_graphs(bundle: Bundle, graphs: Sequence[str], precision: str, out_dir: Path, npz: Path,
                           wavs: Sequence[Path] | None = None,
                           progress: Callable[[str], None] = print) -> dict[str, Path]:
    """Calibrate on real turns, save the samples to `npz`, quantize each graph into `out_dir`."""
    import time

    import_modelopt()  # fail before the calibration turn, not after
    t0 = time.perf_counter()
    progress(f"[quantize] recording calibration inputs of {', '.join(graphs)} on onnxruntime")
    import onnxruntime as ort

    # The calibration turns run on the GPU when this onnxruntime can (onnxruntime-gpu), else on the CPU.
    providers = ("cuda",) if "CUDAExecutionProvider" in ort.get_available_providers() else ("cpu",)
    samples = collect_calibration(bundle, graphs, wavs, providers=providers)
    save_calibration(npz, samples)
    progress(f"[quantize] {sum(len(v) for v in samples.values())} samples saved to {npz.name} "
             f"({time.perf_counter() - t0:.1f} s)")
    out = {}
    eps = calibration_providers()
    for name in graphs:
        t0 = time.perf_counter()
        dtype = bundle.graph(name).get("dtype", bundle.manifest.get("dtype"))
        out[name] = quantize_graph(bundle.graph_path(name), out_dir / f"{name}.onnx", precision, samples[name],
                                   _graph_inputs(bundle, name), dtype, eps)
        # TensorRT's DequantizeLinear needs zero zero points: an asymmetric weight (if any) becomes symmetric.
        folded = fold_zero_points(out[name])
        progress(f"[quantize] {name}: {precision} with ModelOpt ({time.perf_counter() - t0:.1f} s)"
                 + (f"; {folded} asymmetric weight(s) folded to symmetric" if folded else ""))
    return out
