"""A GraphSpec -> an ONNX file: trace it in its form on weightless placeholders, optimize, fix what the tracer gets
wrong (bf16 types, output shapes), then write every weight from the checkpoint one tensor at a time as 64-byte
aligned external data."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxscript.optimizer
import torch
from onnx import TensorProto, helper, numpy_helper, shape_inference
from torch import Tensor

from . import lm as lm_forms
from .errors import ExportError
from .graphs import GraphSpec, precision_ops

_TORCH = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
          TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32}
# External data: every initializer starts on a 64-byte boundary (mmap-friendly, what onnx itself writes).
_ALIGN = 64


def onnx_dtype_name(elem: int) -> str:
    if elem == TensorProto.BFLOAT16:
        return "bfloat16"
    return onnx.helper.tensor_dtype_to_np_dtype(elem).name


def io_spec(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """The graph's inputs and outputs as the manifest records them (symbolic dims as strings)."""
    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx_dtype_name(t.elem_type), "shape": shape})
        return out

    return describe(model.graph.input), describe(model.graph.output)


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


# Joins the weight names of a fused matmul into the name of its concatenated weight.
FUSED_SEPARATOR = "+"


def fuse_sibling_matmuls(model: onnx.ModelProto, data_inputs: list[str]) -> dict[str, list[str]]:
    """Matmuls that read the same activation through weights of their own (q/k/v, gate/up) become one matmul on the
    weights concatenated along N and a Split: one larger GEMV per step instead of two or three, which is what
    onnxruntime's MatMulNBits kernels reward at one row (measured in benchmarks/RESULTS.md). Works on the traced
    graph, before any weight is written: the weights are still graph inputs, each read through a Transpose (Linear
    stores (N, K)). Returns fused input name -> the weight names it concatenates, in order (rows of the (N, K) weight).
    """
    graph = model.graph
    inputs = {vi.name: vi for vi in graph.input if vi.name not in data_inputs}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    producer = {o: node for node in graph.node for o in node.output}
    siblings: dict[str, list[tuple[onnx.NodeProto, onnx.NodeProto, str]]] = defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        t = producer.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inputs or len(consumers[t.input[0]]) != 1:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0] or len(inputs[t.input[0]].type.tensor_type.shape.dim) != 2:
            continue
        siblings[node.input[0]].append((node, t, t.input[0]))
    groups: dict[str, list[str]] = {}
    drop: set[int] = set()
    added: dict[int, list[onnx.NodeProto]] = {}
    for activation, members in siblings.items():
        if len(members) < 2:
            continue
        names = [w for _, _, w in members]
        fused = FUSED_SEPARATOR.join(names)
        dims = [inputs[w].type.tensor_type.shape.dim for w in names]
        rows = [d[0].dim_value for d in dims]
        elem = inputs[names[0]].type.tensor_type.elem_type
        graph.input.append(helper.make_tensor_value_info(fused, elem, [sum(rows), dims[0][1].dim_value]))
        first = members[0][0]
        transposed, product = f"{fused}__t", f"{first.output[0]}__fused"
        sizes = f"{fused}__split"
        added[id(first)] = [
            helper.make_node("Transpose", [fused], [transposed], perm=[1, 0], name=f"{first.name}__fused_t"),
            helper.make_node("MatMul", [activation, transposed], [product], name=f"{first.name}__fused"),
            helper.make_node("Constant", [], [sizes], value=numpy_helper.from_array(np.array(rows, np.int64)),
                             name=f"{first.name}__fused_sizes"),
            helper.make_node("Split", [product, sizes], [m.output[0] for m, _, _ in members], axis=-1,
                             name=f"{first.name}__fused_split")]
        for matmul, transpose, _ in members:
            drop.update((id(matmul), id(transpose)))
        groups[fused] = names
    if not groups:
        return groups
    nodes = []
    for node in graph.node:
        nodes.extend(added.get(id(node), []))
        if id(node) not in drop:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    gone = {w for names in groups.values() for w in names}
    kept = [vi for vi in graph.input if vi.name not in gone]
    del graph.input[:]
    graph.input.extend(kept)
    return groups


def export_graph(spec: GraphSpec, path: Path, dtype: torch.dtype, value: Callable[[str], Tensor]) -> int:
    """Write `spec` as ONNX at `path` (+ `path`.data) in its form; returns the graph's opset. `value(name)`
    gives each weight by its state_dict name, one at a time (a fused weight: its parts, concatenated as written)."""
    model = trace_graph(spec, path, dtype)
    groups = fuse_sibling_matmuls(model, list(spec.inputs)) if spec.fuse_matmuls else {}

    def weight(name: str) -> Tensor:
        if name in groups:
            return torch.cat([value(part) for part in groups[name]], dim=0)
        return value(name)

    attach_weights(model, list(spec.inputs), weight, path.with_name(path.name + ".data"))
    onnx.save(model, str(path))
    return lm_forms.OPSETS[spec.form]
