"""Checkpoint + decoder -> verified bundle.

Each graph is exported, checked (onnx full check, TensorRT readiness), run on onnxruntime at several
input sizes against the PyTorch module it came from, and only then recorded. The bundle is assembled
in a temporary folder beside the target and renamed into place once the manifest is written.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript.optimizer
import torch
from onnx import TensorProto, helper, numpy_helper, shape_inference
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

import opens2s_edge
from opens2s_edge.runtime.audio import Frontend
from opens2s_edge.runtime.bundle import FORMAT_VERSION, MANIFEST, sha256_file
from opens2s_edge.runtime.files import atomic_dir
from opens2s_edge.runtime.prompt import AUDIO_PLACEHOLDER_ID, DEFAULT_SYSTEM_PROMPT, SpeechVocab
from opens2s_edge.training.checkpoint import (
    TOKENIZER_FILES,
    CheckpointError,
    check_state_dict,
    read_config,
    read_frontend,
    read_generation_defaults,
    tie_missing_heads,
    weight_files,
)
from opens2s_edge.training.opens2s import OpenS2S
from opens2s_edge.training.qwen3 import rope_tables
from opens2s_edge.training.token2wav.decoder import load_decoder

from . import lm as lm_forms
from .checks import check_graph
from .graphs import GraphSpec, fp32_islands, opens2s_graphs, precision_ops, to_export_dtype, token2wav_graphs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Largest allowed deviation from the PyTorch fp32 model, relative to each output's scale (max(1, |ref|)).
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 1e-1}
_NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64,
          TensorProto.INT32: np.int32, TensorProto.BOOL: np.bool_}
_TORCH = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
          TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32}
DEVIATION_REFERENCE = "PyTorch fp32 model: max |onnxruntime - reference| / max(1, max |reference|)"
# External data: every initializer starts on a 64-byte boundary (mmap-friendly, what onnx itself writes).
_ALIGN = 64


class ExportError(RuntimeError):
    """Export could not produce a verified bundle; nothing is left at the target."""


def _onnx_dtype_name(elem: int) -> str:
    if elem == TensorProto.BFLOAT16:
        return "bfloat16"
    return onnx.helper.tensor_dtype_to_np_dtype(elem).name


def _io_spec(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": _onnx_dtype_name(t.elem_type), "shape": shape})
        return out

    return describe(model.graph.input), describe(model.graph.output)


# -- weights, streamed per tensor ----------------------------------------------------------------------
class CheckpointWeights:
    """The tensors of a checkpoint's safetensors files, read one at a time (the files are memory-mapped by
    safe_open; nothing is loaded until `get`)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._handles: dict[Path, object] = {}
        for path in weight_files(folder):
            handle = self._open(path)
            for key in handle.keys():
                self.where[key] = path
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
        return self._handles[path]

    def get(self, key: str) -> Tensor:
        return self._open(self.where[key]).get_tensor(key)


def open_model(folder: Path, max_context: int) -> tuple[OpenS2S, CheckpointWeights]:
    """The OpenS2S model on the meta device (no memory) and a per-tensor reader of its weights; the
    checkpoint's keys and shapes are checked against config.json as `load_checkpoint` does."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    config = read_config(folder)
    weights = CheckpointWeights(folder)
    with torch.device("meta"):
        model = OpenS2S(config)
    check_state_dict(model, {k: torch.empty(s, device="meta") for k, s in weights.shapes.items()}, str(folder))
    tie_missing_heads(model, set(weights.where), folder)
    for lm in (model.llm_model, model.tts_lm_model):
        # RoPE tables are computed, not stored: real (CPU) buffers, constants in the graph.
        cos, sin = rope_tables(lm.config.head_dim, max_context, lm.config.rope_theta)
        lm.register_buffer("rope_cos", cos, persistent=False)
        lm.register_buffer("rope_sin", sin, persistent=False)
        lm._rope_len = max_context
    return model.eval(), weights


def checkpoint_keys(model: nn.Module, module: nn.Module, present: set[str]) -> dict[str, str]:
    """Parameter name inside `module` -> its checkpoint key (tied weights resolve to the stored one)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return {name: next(k for k in names[id(p)] if k in present)
            for name, p in module.named_parameters(remove_duplicate=False)}


def _set_params(module: nn.Module, names: list[str], make: Callable[[str], Tensor], keys: dict[str, str]) -> None:
    # One Parameter per checkpoint key, so tied weights (lm_head = embed_tokens) stay one tensor.
    made: dict[str, nn.Parameter] = {}
    for name in names:
        key = keys[name]
        if key not in made:
            made[key] = nn.Parameter(make(name), requires_grad=False)
        owner_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner_name), leaf, made[key])


def release(module: nn.Module, keys: dict[str, str]) -> None:
    """Back to the meta device: the memory of `module`'s weights is freed."""
    params = dict(module.named_parameters(remove_duplicate=False))
    _set_params(module, list(keys), lambda n: torch.empty(params[n].shape, dtype=params[n].dtype, device="meta"),
                keys)


def materialize(module: nn.Module, keys: dict[str, str], weights: CheckpointWeights, dtype: torch.dtype,
                names: list[str] | None = None) -> None:
    _set_params(module, list(keys) if names is None else names, lambda n: weights.get(keys[n]).to(dtype), keys)


def _units(module: nn.Module) -> dict[str, nn.Module]:
    """The members of the outermost ModuleLists (transformer layers): what is streamed one at a time."""
    units: dict[str, nn.Module] = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and not any(name.startswith(u + ".") for u in units):
            for i, child in enumerate(m):
                units[f"{name}.{i}" if name else str(i)] = child
    return units


@contextmanager
def streamed(module: nn.Module, keys: dict[str, str], weights: CheckpointWeights,
             dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """`module` runnable at `dtype` with one layer's weights in memory at a time: everything outside the
    layer lists is loaded now, each layer just before it runs and freed just after."""
    units = _units(module)
    in_unit = {u: [n for n in keys if n.startswith(u + ".")] for u in units}
    inside = {n for names in in_unit.values() for n in names}
    hooks = []
    try:
        materialize(module, keys, weights, dtype, [n for n in keys if n not in inside])
        for prefix, unit in units.items():
            names = in_unit[prefix]
            sub = {n[len(prefix) + 1:]: keys[n] for n in names}

            def pre(m, args, sub=sub):
                _set_params(m, list(sub), lambda name: weights.get(sub[name]).to(dtype), sub)

            def post(m, args, out, sub=sub):
                release(m, sub)

            hooks += [unit.register_forward_pre_hook(pre), unit.register_forward_hook(post)]
        yield
    finally:
        for h in hooks:
            h.remove()
        release(module, keys)


def placeholders(module: nn.Module, keys: dict[str, str], dtype: torch.dtype, keep_fp32: tuple[type, ...]) -> None:
    """Weights that occupy no memory (one scalar, expanded): enough to trace the graph, whose weights are
    then written from the checkpoint one tensor at a time (`attach_weights`)."""
    island = {f"{mn}.{pn}" if mn else pn
              for mn, m in module.named_modules() if keep_fp32 and isinstance(m, keep_fp32)
              for pn, _ in m.named_parameters(recurse=False)} if dtype != torch.float32 else set()
    params = dict(module.named_parameters(remove_duplicate=False))
    order = {key: i for i, key in enumerate(dict.fromkeys(keys.values()))}

    def make(name: str) -> Tensor:
        return _distinct_scalar(order[keys[name]], torch.float32 if name in island else dtype).expand(
            params[name].shape)

    _set_params(module, list(keys), make, keys)


def _distinct_scalar(i: int, dtype: torch.dtype) -> Tensor:
    # The exporter merges initializers of equal value: every placeholder holds a different finite number
    # (consecutive bit patterns from the smallest normal upward), so each weight keeps its own input.
    bits, smallest_normal = {torch.float32: (torch.int32, 0x00800000), torch.float16: (torch.int16, 0x0400),
                             torch.bfloat16: (torch.int16, 0x0080)}[dtype]
    return torch.tensor(smallest_normal + i, dtype=bits).view(dtype)


# -- one graph -----------------------------------------------------------------------------------------
def _as_float32(feeds: dict[str, Tensor]) -> dict[str, Tensor]:
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


def trace_graph(spec: GraphSpec, path: Path, dtype: torch.dtype) -> onnx.ModelProto:
    """The graph of `spec.module` in its form with its weights as named inputs (no weight bytes in the
    proto) and its constants folded."""
    buffer = io.BytesIO()
    lowering = spec.lowering() if spec.lowering is not None else contextlib.nullcontext()
    with torch.no_grad(), warnings.catch_warnings(), lowering, precision_ops(spec, dtype):
        warnings.simplefilter("ignore")
        # export_params=False + no torch folding: the weights stay graph inputs named as in state_dict
        # (torch's folding would turn each Linear weight into an anonymous transposed copy, and needs the
        # weights in memory twice).
        torch.onnx.export(spec.module, tuple(spec.inputs.values()), buffer, input_names=list(spec.inputs),
                          output_names=spec.outputs, dynamic_axes=spec.dynamic,
                          opset_version=lm_forms.export_opset(spec.form),
                          custom_opsets=lm_forms.custom_opsets(spec.form),
                          dynamo=False, export_params=False, do_constant_folding=False)
    model = onnxscript.optimizer.optimize(onnx.load_from_string(buffer.getvalue()))
    if dtype == torch.bfloat16:
        _bf16_fp32_ops(model)
    onnx.save(model, str(path))
    if spec.form == "modern":
        lm_forms.finish_modern(path)
    if spec.output_shapes:
        _stamp_output_shapes(path, spec.output_shapes)
    return onnx.load(str(path))


def _lacks_bf16(node: onnx.NodeProto, opset: int, types: dict[str, int]) -> bool:
    """Whether the op's schema at `opset` refuses bfloat16 for one of the inputs that are bf16 here (Conv,
    AveragePool, Sin, ... gained bf16 only in opset 22)."""
    if node.domain not in ("", "ai.onnx") or node.op_type in ("Cast", "Constant"):
        return False
    schema = onnx.defs.get_schema(node.op_type, opset)
    constraints = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    for j, name in enumerate(node.input):
        if not name or types.get(name) != TensorProto.BFLOAT16 or not schema.inputs:
            continue
        type_str = schema.inputs[min(j, len(schema.inputs) - 1)].type_str
        if "tensor(bfloat16)" not in constraints.get(type_str, [type_str]):
            return True
    return False


def _bf16_fp32_ops(model: onnx.ModelProto) -> None:
    """In a bf16 graph, ops the graph's opset has no bf16 for run on fp32 casts of their inputs and hand
    bf16 on, so the classic opset stays valid for the checker and TensorRT 10.3."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    for node in model.graph.node:
        if node.op_type == "Cast":
            for attr in node.attribute:
                # The TorchScript exporter writes torch's ScalarType number for bf16 (15) in some Casts
                # (bool masks times bf16); 15 is COMPLEX128 in ONNX, which no graph here uses.
                if attr.name == "to" and attr.i == TensorProto.COMPLEX128:
                    attr.i = TensorProto.BFLOAT16
    del model.graph.value_info[:]  # the tracer's types carry the same wrong number; the checker infers anew
    nodes = []
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "ConstantOfShape" and value is not None and value.t.data_type == TensorProto.BFLOAT16:
            # ConstantOfShape has bf16 from opset 20: fill in fp32, then cast.
            value.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(value.t).astype(np.float32)))
            out = node.output[0]
            node.output[0] = out + "__fp32"
            nodes += [node, helper.make_node("Cast", [out + "__fp32"], [out], to=TensorProto.BFLOAT16)]
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    wrapped: set[str] = set()
    while True:
        # Shape inference stops at the first op that refuses bf16: wrap what it reached, infer again.
        inferred = shape_inference.infer_shapes(model)
        types = {vi.name: vi.type.tensor_type.elem_type
                 for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
        types.update({init.name: init.data_type for init in model.graph.initializer})
        todo = [n for n in model.graph.node if n.name not in wrapped
                and _lacks_bf16(n, opset, types)]
        if not todo:
            return
        nodes = []
        for node in model.graph.node:
            if node not in todo:
                nodes.append(node)
                continue
            node.name = node.name or f"{node.op_type}_{len(wrapped)}"
            wrapped.add(node.name)
            # The result is bf16 again when the data input was (an fp32 input with bf16 weights stays fp32).
            back = types.get(node.input[0]) == TensorProto.BFLOAT16
            for j, name in enumerate(node.input):
                if types.get(name) == TensorProto.BFLOAT16:
                    cast = f"{name}__fp32_{node.name}_{j}"
                    nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT))
                    node.input[j] = cast
            nodes.append(node)
            for j, name in enumerate(node.output if back else ()):
                node.output[j] = name + "__fp32"
                nodes.append(helper.make_node("Cast", [name + "__fp32"], [name], to=TensorProto.BFLOAT16))
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def _stamp_output_shapes(path: Path, shapes: dict[str, list[int | str]]) -> None:
    """The tracer cannot see through `last_only` slicing or the modern ops' outputs and invents symbolic
    dims; the manifest and TensorRT profiles need the real contract."""
    model = onnx.load(str(path), load_external_data=False)
    for out in model.graph.output:
        if out.name not in shapes:
            continue
        dims = out.type.tensor_type.shape.dim
        del dims[:]
        for d in shapes[out.name]:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    onnx.save(model, str(path))


def attach_weights(model: onnx.ModelProto, data_inputs: list[str], value: Callable[[str], Tensor],
                   data_path: Path) -> None:
    """Turn every weight input into an initializer whose bytes go to `data_path`, one tensor at a time,
    cast to the dtype the graph declares. A weight read only through a Transpose is stored transposed
    and the Transpose dropped (what torch's constant folding would do, without holding two copies)."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    keep_inputs, drop_nodes, rename = [], set(), {}
    offset = 0
    with open(data_path, "wb") as f:
        for vi in graph.input:
            if vi.name in data_inputs:
                keep_inputs.append(vi)
                continue
            if not consumers.get(vi.name):
                continue  # a weight this graph never reads (the TTS LM's speaker head in the decoder step)
            tensor = value(vi.name).detach().to(_TORCH[vi.type.tensor_type.elem_type])
            name = vi.name
            users = consumers[vi.name]
            if len(users) == 1 and users[0].op_type == "Transpose":
                perm = next((list(a.ints) for a in users[0].attribute if a.name == "perm"),
                            list(range(tensor.dim()))[::-1])
                tensor = tensor.permute(perm)
                drop_nodes.add(id(users[0]))
                rename[users[0].output[0]] = name
            tensor = tensor.contiguous()
            raw = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else np.zeros(0, np.uint8)
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw.tobytes())
            init = TensorProto(name=name, data_type=vi.type.tensor_type.elem_type, dims=list(tensor.shape))
            init.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(raw.nbytes))):
                init.external_data.add(key=k, value=v)
            graph.initializer.append(init)
            offset += raw.nbytes
    nodes = [n for n in graph.node if id(n) not in drop_nodes]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for out in graph.output:
        if out.name in rename:
            raise ExportError(f"graph output {out.name} is a transposed weight")
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(keep_inputs)


def export_graph(spec: GraphSpec, path: Path, dtype: torch.dtype, value: Callable[[str], Tensor]) -> int:
    """Write `spec` as ONNX at `path` (+ `path`.data) in its form; returns the graph's opset. `value(name)`
    gives each weight by its state_dict name, one at a time."""
    model = trace_graph(spec, path, dtype)
    attach_weights(model, list(spec.inputs), value, path.with_name(path.name + ".data"))
    onnx.save(model, str(path))
    return lm_forms.OPSETS[spec.form]


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


def verify_graph(spec: GraphSpec, path: Path, refs: list[list[np.ndarray]], tolerance: float,
                 dtype: torch.dtype) -> dict[str, float]:
    """Largest relative deviation of onnxruntime from the PyTorch fp32 model, per output, over the example
    and probe inputs; any NaN/Inf or a deviation over `tolerance` fails the export."""
    run_path = path
    scratch = None
    if dtype == torch.bfloat16:
        scratch = Path(tempfile.mkdtemp(prefix="bf16-emulation-"))
        run_path = float32_emulation(path, scratch / path.name)
    try:
        options = ort.SessionOptions()
        if dtype == torch.float16:
            # onnxruntime CPU has no fp16 MatMul: at the full optimization level it folds the casts it inserts
            # into fp32 copies of every weight (31 GB for the 8B LLM). At the basic level the weights stay
            # fp16 and are widened one op at a time, so verifying a full-size graph fits a 24 GB machine.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(str(run_path), options, providers=["CPUExecutionProvider"])
        worst = dict.fromkeys(spec.outputs, 0.0)
        for feeds, want in zip([spec.inputs, *spec.probes], refs, strict=True):
            got = session.run(None, {k: _numpy_feed(v) for k, v in feeds.items()})
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
    if top > tolerance:
        raise ExportError(f"{spec.name}: onnxruntime deviates from PyTorch fp32 by {top:.2e} (allowed {tolerance:.0e})")
    return worst


def _embedding_table(weights: CheckpointWeights, key: str, dtype: str) -> tuple[np.ndarray, dict]:
    table = weights.get(key)
    if dtype == "bf16":
        # numpy has no bfloat16: the bit patterns are stored as uint16 (view them as bfloat16 to use them).
        bits = table.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        return bits, {"dtype": "bfloat16", "storage": "uint16"}
    array = table.to(torch.float16 if dtype == "fp16" else torch.float32).numpy()
    return array, {"dtype": array.dtype.name}


def export_bundle(checkpoint: Path, decoder: Path, out: Path, dtype: str = "fp32", max_context: int = 2048,
                  max_audio_seconds: int = 30, force: bool = False,
                  progress: Callable[[str], None] = print, form: str = "classic",
                  before_export: Callable[[GraphSpec, OpenS2S], None] | None = None) -> Path:
    """Write a verified bundle. Graph by graph: the fp32 reference runs with one layer's weights in memory
    at a time, the graph is traced on weightless placeholders, its weights are streamed from the
    safetensors files into external data one tensor at a time, and onnxruntime checks it; all other
    components stay on the meta device. `before_export(spec, model)` is called just before each trace."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if form not in lm_forms.FORMS:
        raise ExportError(f"--form must be one of {', '.join(lm_forms.FORMS)}, got {form!r}")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if max_context < 16:
        raise ExportError(f"--max-context must be at least 16, got {max_context}")
    if max_audio_seconds < 1:
        raise ExportError(f"--max-audio-seconds must be at least 1, got {max_audio_seconds}")
    torch_dtype = DTYPES[dtype]
    progress(f"[export] opening checkpoint {checkpoint} (weights streamed per tensor)")
    model, weights = open_model(checkpoint, max_context)
    try:
        audio_frontend = read_frontend(checkpoint, model.config)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    progress(f"[export] loading decoder {decoder}")
    token2wav = load_decoder(decoder)
    windows = -(-max_audio_seconds // audio_frontend.window_seconds)
    specs = opens2s_graphs(model, max_context, windows, torch_dtype, form)
    n_opens2s = len(specs)
    specs += token2wav_graphs(token2wav, torch_dtype)
    present = set(weights.where)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        graphs = {}
        for i, spec in enumerate(specs, 1):
            t0 = time.perf_counter()
            progress(f"[export] {i}/{len(specs)} {spec.name}: exporting")
            path = tmp / f"{spec.name}.onnx"
            graph_dtype = torch_dtype
            if spec.fp32_in_bf16 and torch_dtype == torch.bfloat16:
                graph_dtype = torch.float32
                spec = dataclasses.replace(spec, inputs=_as_float32(spec.inputs),
                                           probes=[_as_float32(p) for p in spec.probes])
            if i <= n_opens2s:
                keys = checkpoint_keys(model, spec.module, present)
                with streamed(spec.module, keys, weights):
                    refs = reference_outputs(spec)
                placeholders(spec.module, keys, graph_dtype, spec.keep_fp32)
                islands = fp32_islands(spec.module, spec.keep_fp32) if graph_dtype != torch.float32 else []
                if before_export is not None:
                    before_export(spec, model)
                try:
                    opset = export_graph(spec, path, graph_dtype, lambda n, keys=keys: weights.get(keys[n]))
                finally:
                    release(spec.module, keys)
                    for m in islands:
                        del m.forward
            else:
                refs = reference_outputs(spec)
                # A copy is cast: the token2wav modules nest (the flow holds the estimator), and each
                # graph's fp32 reference must see fp32 weights. They are small enough to copy.
                spec = dataclasses.replace(spec, module=copy.deepcopy(spec.module))
                to_export_dtype(spec.module, graph_dtype, spec.keep_fp32, spec.fp32_entry, spec.fp32_entry_names)
                state = spec.module.state_dict()
                if before_export is not None:
                    before_export(spec, model)
                opset = export_graph(spec, path, graph_dtype, state.__getitem__)
            check_graph(path)
            tolerance = max(TOLERANCE[dtype], spec.min_tolerance)
            deviation = verify_graph(spec, path, refs, tolerance, graph_dtype)
            model_proto = onnx.load(str(path), load_external_data=False)
            inputs, outputs = _io_spec(model_proto)
            graphs[spec.name] = {"file": path.name, "inputs": inputs, "outputs": outputs,
                                 "dtype": {v: k for k, v in DTYPES.items()}[graph_dtype],
                                 "form": spec.form, "opset": opset, "limits": spec.limits,
                                 "aliases": spec.aliases, "max_deviation": max(deviation.values()),
                                 "tolerance": tolerance,
                                 "deviation": deviation, "deviation_reference": DEVIATION_REFERENCE}
            progress(f"[export] {i}/{len(specs)} {spec.name}: checked, TensorRT-ready, {spec.form}, "
                     f"max deviation from fp32 {max(deviation.values()):.1e} ({time.perf_counter() - t0:.1f} s)")
        arrays = {}
        for name, prefix in (("llm_embed", "llm_model."), ("tts_embed", "tts_lm_model.")):
            table, info = _embedding_table(weights, prefix + "model.embed_tokens.weight", dtype)
            np.save(tmp / f"{name}.npy", table)
            arrays[name] = {"file": f"{name}.npy", **info, "shape": list(table.shape)}
        _copy_tokenizers(checkpoint, tmp)
        manifest = _manifest(model, token2wav, checkpoint, decoder, dtype, form, max_context, audio_frontend,
                             max_audio_seconds,
                             graphs, arrays)
        manifest["files"] = {
            str(p.relative_to(tmp)): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    progress(f"[export] bundle written to {out}")
    return out


def _copy_tokenizers(checkpoint: Path, dst: Path) -> None:
    for rel in (*TOKENIZER_FILES, *(f"tts/{n}" for n in TOKENIZER_FILES)):
        src = checkpoint / rel
        if not src.is_file():
            raise ExportError(f"checkpoint {checkpoint} is missing {rel}")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst / rel)


def _manifest(model, token2wav, checkpoint: Path, decoder: Path, dtype: str, form: str, max_context: int,
              audio_frontend: Frontend, max_audio_seconds: int, graphs: dict, arrays: dict) -> dict:
    defaults = read_generation_defaults(checkpoint)
    vocab = SpeechVocab.from_folder(checkpoint / "tts")
    spec = token2wav.spec
    c = model.config

    def lm(cfg) -> dict:
        return {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "layers": cfg.num_hidden_layers,
                "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "max_context": max_context,
                "tied_embeddings": cfg.tie_word_embeddings}

    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "form": form,
        "source": {"checkpoint": str(checkpoint.resolve()), "decoder": str(decoder.resolve())},
        "versions": {"opens2s_edge": opens2s_edge.__version__, "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "opset": max(g["opset"] for g in graphs.values())},
        "interleave_strategy": c.interleave_strategy,
        "generation": {"text_eos_ids": list(defaults.text_eos_ids), "max_text_tokens": defaults.max_text_tokens,
                       "speech_eos_ids": list(defaults.speech_eos_ids),
                       "max_speech_tokens": defaults.max_speech_tokens},
        "speech_tokens": {"offset": vocab.offset, "count": vocab.count, "eos_ids": list(vocab.eos_ids)},
        "prompt": {"audio_placeholder_id": AUDIO_PLACEHOLDER_ID, "system_prompt": DEFAULT_SYSTEM_PROMPT},
        "audio": {**audio_frontend.to_json(), "max_seconds": max_audio_seconds},
        "llm": lm(c.llm),
        "tts": {**lm(c.tts), "speaker_dim": model.tts_lm_model.spk2tts.in_features},
        "token2wav": {"spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__}},
        "graphs": graphs,
        "arrays": arrays,
    }
