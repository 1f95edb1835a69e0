"""Graph checks run at export time and in tests: ONNX's full checker, and TensorRT readiness against
TensorRT's published ONNX operator support list (shared/reference/tensorrt_onnx_operators.tsv)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, shape_inference

import opens2s_edge

# TensorRT's type names in the support list, by ONNX element type.
_TRT_TYPE = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE",
}
# Ops whose listed types describe data inputs only; index/shape inputs are INT64 by the ONNX spec.
_DATA_INPUTS = {"Gather": 1, "GatherElements": 1, "GatherND": 1, "ScatterElements": 1, "ScatterND": 1,
                "Scatter": 1, "Expand": 1, "Reshape": 1, "Slice": 1, "Tile": 1, "Unsqueeze": 1, "Squeeze": 1,
                "Where": 3, "ConstantOfShape": 0, "Shape": 0, "Range": 3, "Resize": 1, "Pad": 1, "Split": 1,
                "TensorScatter": 2, "Einsum": 99, "CumSum": 1, "TopK": 1, "ReduceSum": 1, "ReduceMean": 1,
                "ReduceMax": 1, "OneHot": 0,
                # Q, K, V carry the listed types; attn_mask is BOOL or Q's float type (ONNX and TensorRT alike).
                "Attention": 3,
                # Q/DQ (quantized graphs from ModelOpt): the listed types are x's; the scale is float, the zero point
                # the quantized type.
                "QuantizeLinear": 1, "DequantizeLinear": 1}
# A copy of shared/reference/tensorrt_onnx_operators.tsv ships with the package (tests keep them equal).
DEFAULT_TSV = Path(opens2s_edge.__file__).resolve().parent / "assets" / "tensorrt_onnx_operators.tsv"


class GraphCheckError(ValueError):
    """A graph fails a check; the message names the graph, the node and the reason."""


@dataclass(frozen=True)
class OpSupport:
    supported: bool
    types: frozenset[str]
    restrictions: str


def load_support(tsv: Path) -> dict[str, OpSupport]:
    table = {}
    for line in tsv.read_text().splitlines():
        if not line or line.startswith("#") or line.startswith("operator\t"):
            continue
        parts = line.split("\t") + [""] * 3
        name, supported, types, restrictions = parts[:4]
        table[name] = OpSupport(supported == "Y", frozenset(t for t in types.split(",") if t), restrictions)
    return table


def onnx_check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphCheckError(f"{path.name}: onnx.checker failed: {exc}") from exc


def tensorrt_readiness(path: Path, tsv: Path = DEFAULT_TSV) -> list[str]:
    """Every reason TensorRT's ONNX parser would reject the graph; empty when it is ready."""
    support = load_support(tsv)
    model = onnx.load(str(path), load_external_data=False)
    inferred = shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    ranks: dict[str, int] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    initializers = set()
    for init in model.graph.initializer:
        types[init.name] = init.data_type
        initializers.add(init.name)
    produced = {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.input}
    problems = []
    for name, elem in types.items():
        if elem == TensorProto.DOUBLE:
            problems.append(f"tensor {name!r} is DOUBLE (TensorRT casts it down; export float32)")
    for node in model.graph.node:
        where = f"node {node.name or node.op_type!r} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r} needs a TensorRT plugin")
            continue
        op = support.get(node.op_type)
        if op is None or not op.supported:
            problems.append(f"{where}: {node.op_type} is not supported by TensorRT's ONNX parser")
            continue
        for name in node.input:
            if name and name not in produced and name not in initializers:
                problems.append(f"{where}: input {name!r} is neither a graph input, an initializer nor produced")
        n_data = _DATA_INPUTS.get(node.op_type, 99)
        for name in list(node.input)[:n_data]:
            elem = types.get(name)
            if name and elem in _TRT_TYPE and op.types and _TRT_TYPE[elem] not in op.types:
                problems.append(f"{where}: input {name!r} is {_TRT_TYPE[elem]}, TensorRT allows {sorted(op.types)}")
        if node.op_type == "ScatterND":
            for attr in node.attribute:
                if attr.name == "reduction" and attr.s not in (b"", b"none"):
                    problems.append(f"{where}: reduction {attr.s.decode()} is unsupported")
        problems += [f"{where}: {p}" for p in _op_restrictions(node, types, ranks)]
    return problems


def _op_restrictions(node: onnx.NodeProto, types: dict[str, int], ranks: dict[str, int]) -> list[str]:
    """The restrictions column of the support list for the modern ops the decoder graphs use."""
    problems = []
    attrs = {a.name: a for a in node.attribute}

    def rank_is(names: list[str], rank: int, what: str) -> None:
        for name in names:
            if name and name in ranks and ranks[name] != rank:
                problems.append(f"{what} {name!r} is {ranks[name]}-D (TensorRT needs {rank}-D)")

    if node.op_type == "TensorScatter":
        if "axis" in attrs and attrs["axis"].i != -2:
            problems.append(f"axis {attrs['axis'].i} (TensorRT needs -2)")
        rank_is(list(node.input[:2]), 4, "past_cache/update")
    if node.op_type == "Attention":
        if len([i for i in node.input[4:] if i]):
            problems.append("past_key/past_value/nonpad_kv_seqlen inputs are unsupported by TensorRT")
        if len([o for o in node.output[1:] if o]):
            problems.append("present_key/present_value/qk_matmul_output outputs are unsupported by TensorRT")
        for name in ("qk_matmul_output_mode", "softcap"):
            if name in attrs and (attrs[name].i if name != "softcap" else attrs[name].f):
                problems.append(f"attribute {name} is unsupported by TensorRT")
        rank_is(list(node.input[:4]), 4, "Q/K/V/attn_mask")
    if node.op_type == "RotaryEmbedding" and len(node.input) > 3 and node.input[3]:
        if types.get(node.input[3], TensorProto.INT64) != TensorProto.INT64:
            problems.append("position_ids must be INT64")
    return problems


def check_graph(path: Path, tsv: Path = DEFAULT_TSV) -> None:
    onnx_check(path)
    if tsv.is_file():
        problems = tensorrt_readiness(path, tsv)
        if problems:
            raise GraphCheckError(f"{path.name} is not TensorRT-ready:\n  " + "\n  ".join(problems))
