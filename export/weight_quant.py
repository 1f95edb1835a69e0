"""Weight-only int4/int8 graphs with onnxruntime's own quantizer (`MatMulNBitsQuantizer`): every MatMul whose weight
is a constant 2-D initializer becomes a `com.microsoft.MatMulNBits` (block-wise scales along K, optional zero
points), which onnxruntime runs on the CPU and the CUDA provider. Activations stay at the graph's dtype;
`accuracy_level` 4 lets the CPU kernel quantize them to int8 per block inside the matmul (the fast path of MLAS,
what onnxruntime-genai's CPU int4 models use).

The quantized graph replaces the float one in the bundle; the manifest records what was done to it and the
quantized graph's measured deviation from the fp32 PyTorch model (accuracy over a whole reply: benchmarks/accuracy.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from .errors import ExportError

WEIGHT_BITS = {"int4": 4, "int8": 8}
BLOCK_SIZES = (32, 64, 128)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# Graphs whose MatMul weights may be quantized. The decoders by default (their weights are what a decode step reads);
# the others only when asked (see benchmarks/RESULTS.md for what each measurably gains).
QUANTIZABLE_GRAPHS = ("llm", "tts_lm", "audio_encoder", "estimator", "flow", "tts_projection")
DEFAULT_GRAPHS = ("llm", "tts_lm")
QUANTIZER = "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"


@dataclass(frozen=True)
class WeightOptions:
    """`export --weights int4|int8 [--block-size N] [--symmetric|--asymmetric] [--accuracy-level N]`."""

    weights: str = "int4"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    graphs: tuple[str, ...] = DEFAULT_GRAPHS
    # Keep the decoders' vocabulary heads (`lm_head`) in float.
    float_lm_head: bool = False

    @property
    def bits(self) -> int:
        return WEIGHT_BITS[self.weights]

    def check(self, dtype: str) -> None:
        """Every option checked before any work, each failure named."""
        if self.weights not in WEIGHT_BITS:
            raise ExportError(f"--weights must be one of float, {', '.join(WEIGHT_BITS)}, got {self.weights!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ExportError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ExportError(f"--accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))} (MatMulNBits: "
                              f"0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8), got {self.accuracy_level}")
        unknown = [g for g in self.graphs if g not in QUANTIZABLE_GRAPHS]
        if unknown or not self.graphs:
            raise ExportError(f"--weight-graphs: unknown {', '.join(unknown) or '(none given)'}; choose from "
                              f"{', '.join(QUANTIZABLE_GRAPHS)}")
        if dtype not in ("fp32", "fp16"):
            # MatMulNBits takes float or float16 activations; onnxruntime has no bf16 kernel for it.
            raise ExportError(f"--weights {self.weights} needs --dtype fp32 or fp16 (MatMulNBits has no bf16 kernel), "
                              f"got --dtype {dtype}")

    def record(self) -> dict:
        return {**asdict(self), "graphs": list(self.graphs), "bits": self.bits, "format": "MatMulNBits",
                "quantizer": QUANTIZER}


def _quantizer_class() -> type:
    """onnxruntime's quantizer, imported without its side effect: the module calls logging.basicConfig(level=INFO)
    on import, which would turn on every library's INFO lines (onnx_ir's, one per initializer) for the rest of the
    process. A handler on the root logger makes basicConfig a no-op; it is removed again after the import."""
    guard = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(guard)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        root.removeHandler(guard)
    return MatMulNBitsQuantizer


def _weight_of(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    init = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
    return init if init is not None and len(init.dims) == 2 else None


def quantize_graph(path: Path, options: WeightOptions) -> dict:
    """Quantize the MatMul weights of the graph at `path` (+ its .data) in place; returns the manifest record: the
    options, the MatMuls quantized and kept, the bytes of weights before and after."""
    MatMulNBitsQuantizer = _quantizer_class()
    t0 = time.perf_counter()
    data = path.with_name(path.name + ".data")
    before = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    exclude, kept = [], []
    quantized = 0
    for node in model.graph.node:
        weight = _weight_of(node, initializers)
        if weight is None:
            continue
        k = weight.dims[0]
        # A weight narrower than one block gains nothing (one padded block per column) and costs accuracy.
        if (options.float_lm_head and "lm_head" in weight.name) or k < options.block_size:
            exclude.append(node.name)
            kept.append(weight.name)
        else:
            quantized += 1
    if not quantized:
        raise ExportError(f"{path.name}: no MatMul weight to quantize (--weight-graphs names a graph without any)")
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # it logs one INFO line per node
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=options.bits, block_size=options.block_size,
                                         is_symmetric=options.symmetric, accuracy_level=options.accuracy_level,
                                         nodes_to_exclude=exclude)
        quantizer.process()
    finally:
        quiet.setLevel(level)
    out = quantizer.model.model
    data.unlink(missing_ok=True)
    onnx.save(out, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    after = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    nbits = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    return {**options.record(), "matmuls_quantized": nbits, "kept_float": kept, "bytes_before": before,
            "bytes_after": after, "seconds": round(time.perf_counter() - t0, 2)}
