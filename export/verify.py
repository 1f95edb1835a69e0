"""The check every graph passes before it is recorded: onnxruntime CPU at the example and probe inputs against the
PyTorch fp32 module it came from. In-place caches are bound as the runtime binds them (one buffer as past and
present), so what is verified is what runs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper, shape_inference
from torch import Tensor

from .errors import ExportError
from .graphs import GraphSpec

# Largest allowed deviation from the PyTorch fp32 model, relative to each output's scale (max(1, |ref|)).
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 1e-1}
DEVIATION_REFERENCE = "PyTorch fp32 model: max |onnxruntime - reference| / max(1, max |reference|)"


def as_float32(feeds: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in feeds.items()}


def _float_feeds(feeds: dict[str, Tensor]) -> tuple[Tensor, ...]:
    return tuple(v.float() if v.is_floating_point() else v for v in feeds.values())


def reference_outputs(spec: GraphSpec) -> list[list[np.ndarray]]:
    """The fp32 PyTorch outputs at the example and every probe (the module must be fp32 and runnable)."""
    refs = []
    with torch.no_grad():
        for feeds in [spec.inputs, *spec.probes]:
            out = spec.module(*_float_feeds(feeds))
            out = out if isinstance(out, tuple) else (out,)
            arrays = [o.float().numpy() for o in out]
            for name, a in zip(spec.outputs, arrays, strict=True):
                if not np.isfinite(a).all():
                    raise ExportError(f"{spec.name}: the PyTorch fp32 reference output {name} is not finite")
            refs.append(arrays)
    return refs


def _numpy_feed(tensor: Tensor) -> np.ndarray:
    return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def float32_emulation(path: Path, out: Path) -> Path:
    """A float32 copy of a bf16 graph for onnxruntime CPU, which has no bf16 kernels (MatMul, Add, Mul,
    ... are not implemented for bf16 in 1.32) and no bf16 numpy feeds. Every value the bf16 graph stores
    in bf16 is rounded to bf16 (Cast to BFLOAT16 and back) right where it is produced, so the copy
    computes what a bf16 device computes with fp32 accumulation inside each op."""
    model = onnx.load(str(path))
    inferred = shape_inference.infer_shapes(model)
    bf16 = {vi.name for vi in (*inferred.graph.value_info, *inferred.graph.output)
            if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16}
    graph = model.graph
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    inits = []
    for init in graph.initializer:
        if init.data_type == TensorProto.BFLOAT16:
            array = numpy_helper.to_array(init).astype(np.float32)
            init = numpy_helper.from_array(array, init.name)
        inits.append(init)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.BFLOAT16:
                attr.i = TensorProto.FLOAT
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.BFLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32)))
        nodes.append(node)
        outputs = [o for o in node.output if o in bf16 and node.op_type != "Cast"]
        for o in outputs:
            raw = o + "__bf16_raw"
            node.output[list(node.output).index(o)] = raw
            nodes.append(helper.make_node("Cast", [raw], [o + "__bf16"], to=TensorProto.BFLOAT16))
            nodes.append(helper.make_node("Cast", [o + "__bf16"], [o], to=TensorProto.FLOAT))
    for node in nodes:
        if node.op_type == "Cast" and node.output[0].endswith("__bf16"):
            for attr in node.attribute:
                attr.i = TensorProto.BFLOAT16  # the rounding casts, reset after the blanket rewrite above
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")
    return out


def run_in_place(session: ort.InferenceSession, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One run of `session` on `feeds`, the outputs in `spec.outputs` order. An aliased input (a KV cache) is copied
    once into a buffer bound as both the input and its output, as the runtime binds it: a gqa graph's attention is
    only defined on a shared past/present buffer, and the in-place write is what the runtime relies on."""
    if not spec.aliases:
        return session.run(None, feeds)
    binding = session.io_binding()
    buffers, owned = {}, []
    for name, array in feeds.items():
        if name in spec.aliases:
            owned.append(np.array(array))  # its own copy; kept alive here: the OrtValue does not own the memory
            buffers[spec.aliases[name]] = ort.OrtValue.ortvalue_from_numpy(owned[-1])
            binding.bind_ortvalue_input(name, buffers[spec.aliases[name]])
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
    for name in spec.outputs:
        if name in buffers:
            binding.bind_ortvalue_output(name, buffers[name])
        else:
            binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    # Copied while the buffers are alive: OrtValue.numpy() of a bound output is a view of its memory.
    return [np.array(v.numpy()) for v in binding.get_outputs()]


def verify_graph(spec: GraphSpec, path: Path, refs: list[list[np.ndarray]], tolerance: float | None,
                 dtype: torch.dtype) -> dict[str, float]:
    """Largest relative deviation of onnxruntime from the PyTorch fp32 model, per output, over the example
    and probe inputs; any NaN/Inf or a deviation over `tolerance` fails the export (`tolerance` None: the
    deviation is measured and returned, not gated; weight-only quantized graphs, whose accuracy is measured by
    benchmarks/accuracy.py)."""
    run_path = path
    scratch = None
    if dtype == torch.bfloat16:
        scratch = Path(tempfile.mkdtemp(prefix="bf16-emulation-"))
        run_path = float32_emulation(path, scratch / path.name)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if dtype == torch.float16:
            # onnxruntime CPU has no fp16 MatMul: at the full optimization level it folds the casts it inserts
            # into fp32 copies of every weight (31 GB for the 8B LLM). At the basic level the weights stay
            # fp16 and are widened one op at a time, so verifying a full-size graph fits a 24 GB machine.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(str(run_path), options, providers=["CPUExecutionProvider"])
        worst = dict.fromkeys(spec.outputs, 0.0)
        for feeds, want in zip([spec.inputs, *spec.probes], refs, strict=True):
            got = run_in_place(session, spec, {k: _numpy_feed(v) for k, v in feeds.items()})
            for name, g, w in zip(spec.outputs, got, want, strict=True):
                g = g.astype(np.float32)
                if g.shape != w.shape:
                    raise ExportError(f"{spec.name}: output {name} has shape {g.shape} in ONNX, {w.shape} in PyTorch")
                if not np.isfinite(g).all():
                    raise ExportError(f"{spec.name}: output {name} has NaN or Inf on onnxruntime")
                diff = np.abs(g - w)
                if name in spec.circular_outputs:
                    diff = np.minimum(np.mod(diff, 1.0), 1.0 - np.mod(diff, 1.0))
                err = float(diff.max()) / max(1.0, float(np.abs(w).max()))
                worst[name] = max(worst[name], err)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    top = max(worst.values())
    if tolerance is not None and top > tolerance:
        raise ExportError(f"{spec.name}: onnxruntime deviates from PyTorch fp32 by {top:.2e} (allowed {tolerance:.0e})")
    return worst
