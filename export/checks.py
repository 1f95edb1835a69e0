"""Graph checks run at export time and in tests: ONNX's full checker, and TensorRT readiness against
TensorRT's published ONNX operator support list of the release the engines are for.

Three lists ship in opens2s_edge/assets (each file's header says where its facts come from):
- 10.3 (JetPack 6.x): `tensorrt_onnx_operators_10.3.tsv`. No opset-23/24 Attention, TensorScatter,
  RMSNormalization or RotaryEmbedding: only the classic decoder form parses.
- 10.15 (also 10.16, JetPack 7.2): `tensorrt_onnx_operators.tsv`, a copy of shared/reference's; the default.
- 11.x: `tensorrt_onnx_operators_11.tsv`; strongly typed networks only (export/trt_build.py refuses what 11 removed).
`release_for(version)` maps an installed or targeted TensorRT version to the list documented at or below it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper, shape_inference

import opens2s_edge

# TensorRT's type names in the support list, by ONNX element type.
_TRT_TYPE = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE", TensorProto.INT4: "INT4", TensorProto.UINT4: "UINT4",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.FLOAT4E2M1: "FP4",
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
ASSETS = Path(opens2s_edge.__file__).resolve().parent / "assets"
# A copy of shared/reference/tensorrt_onnx_operators.tsv (TensorRT 10.15) ships with the package (tests keep them
# equal).
DEFAULT_TSV = ASSETS / "tensorrt_onnx_operators.tsv"
# The index of the input that an "axes must be an initializer / a constant" restriction is about.
_AXES_INPUT = {"Squeeze": 1, "Unsqueeze": 1, "Pad": 3, "Slice": 3, "CumSum": 1, "ReduceL1": 1, "ReduceL2": 1,
               "ReduceLogSum": 1, "ReduceLogSumExp": 1, "ReduceMax": 1, "ReduceMean": 1, "ReduceMin": 1,
               "ReduceProd": 1, "ReduceSum": 1, "ReduceSumSquare": 1}
_CONSTANT_AXES = re.compile(r"\b(axes|axis)\b.*\b(initializer|constant)", re.I)


class GraphCheckError(ValueError):
    """A graph fails a check; the message names the graph, the node and the reason."""


class UnsupportedTensorRT(ValueError):
    """A TensorRT version this project has no operator support list for (older than 10)."""


@dataclass(frozen=True)
class TensorRTRelease:
    """One documented TensorRT ONNX parser: its support list, the opsets it documents, whether it parses the modern
    decoder form (opset-23/24 Attention, TensorScatter, RMSNormalization, RotaryEmbedding) and whether weakly typed
    networks and precision builder flags still exist."""

    name: str
    tsv: Path
    opsets: tuple[int, int]
    modern_form: bool
    weak_typing: bool
    covers: str

    @property
    def form(self) -> str:
        """The decoder form to export for this release."""
        return "modern" if self.modern_form else "classic"


RELEASES = {
    "10.3": TensorRTRelease("10.3", ASSETS / "tensorrt_onnx_operators_10.3.tsv", (9, 20), False, True,
                            "TensorRT 10.0 to 10.14 (JetPack 6.x ships 10.3)"),
    "10.15": TensorRTRelease("10.15", DEFAULT_TSV, (9, 24), True, True,
                             "TensorRT 10.15 and 10.16 (JetPack 7.2)"),
    "11": TensorRTRelease("11", ASSETS / "tensorrt_onnx_operators_11.tsv", (9, 24), True, False,
                          "TensorRT 11.x (JetPack 7.2.2 from 11.4.1)"),
}
DEFAULT_RELEASE = RELEASES["10.15"]


def parse_version(version: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); trailing non-numeric parts (10.16.0.post1, 11.4.1rc) are ignored."""
    parts = []
    for piece in str(version).strip().lstrip("vV").split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    if len(parts) < 2:
        raise UnsupportedTensorRT(f"{version!r} is not a TensorRT version (major.minor, e.g. 10.3 or 11.4.1)")
    return tuple(parts)


def release_for(version: str | None) -> TensorRTRelease:
    """The support list for TensorRT `version`: the documented release at or below it (10.0-10.14 -> 10.3's list,
    10.15/10.16 -> 10.15's, 11.x -> 11's). None: 10.15, the list the export checks against."""
    if version is None:
        return DEFAULT_RELEASE
    major, minor = parse_version(version)[:2]
    if major >= 11:
        return RELEASES["11"]
    if major == 10:
        return RELEASES["10.15"] if minor >= 15 else RELEASES["10.3"]
    raise UnsupportedTensorRT(f"TensorRT {version} predates TensorRT 10, whose ONNX parser this project targets "
                              "(JetPack 6 ships 10.3): upgrade TensorRT")


def form_for_tensorrt(version: str) -> str:
    """'classic' or 'modern': the decoder form TensorRT `version`'s parser reads."""
    return release_for(version).form


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


def tensorrt_readiness(path: Path, tsv: Path | None = None, *, release: TensorRTRelease | str | None = None
                       ) -> list[str]:
    """Every reason TensorRT's ONNX parser would reject the graph; empty when it is ready. `release`: a
    TensorRTRelease or a TensorRT version (default 10.15); `tsv` overrides its support list file."""
    if not isinstance(release, TensorRTRelease):
        release = release_for(release)
    support = load_support(tsv or release.tsv)
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
    constants = {name: None for name in initializers}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            constants[node.output[0]] = node
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
        problems += [f"{where}: {p}" for p in _constant_inputs(node, op, constants)]
        problems += [f"{where}: {p}" for p in _zero_points(node, model, constants, path.parent)]
    return problems


def _constant_inputs(node: onnx.NodeProto, op: OpSupport, constants: dict) -> list[str]:
    """The list's "axes must be an initializer / a constant" restrictions (10.3: Squeeze, Pad, Reduce*, CumSum)."""
    index = _AXES_INPUT.get(node.op_type)
    if index is None or not _CONSTANT_AXES.search(op.restrictions) or len(node.input) <= index:
        return []
    name = node.input[index]
    if not name or name in constants:
        return []
    return [f"input {name!r} (axes) must be an initializer or a Constant ({op.restrictions})"]


def _constant_value(name: str, model: onnx.ModelProto, constants: dict, base: Path):
    source = constants.get(name)
    if source is None:
        init = next(i for i in model.graph.initializer if i.name == name)
        return numpy_helper.to_array(init, base_dir=str(base))
    value = next((a for a in source.attribute if a.name == "value"), None)
    return None if value is None else numpy_helper.to_array(value.t)


def _zero_points(node: onnx.NodeProto, model: onnx.ModelProto, constants: dict, base: Path) -> list[str]:
    """TensorRT takes symmetric Q/DQ only: a zero point, where given, must be all zeros."""
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3 or not node.input[2]:
        return []
    name = node.input[2]
    if name not in constants:
        return [f"zero point {name!r} is computed in the graph; TensorRT needs a constant zero"]
    value = _constant_value(name, model, constants, base)
    if value is None or not value.astype("float64").any():
        return []
    if node.op_type == "DequantizeLinear" and node.input[0] in constants:
        return [f"weight {node.input[0]!r} is quantized asymmetrically (nonzero x_zero_point): TensorRT needs zero "
                "zero points; fold it to symmetric first (export/quantize.fold_zero_points, which `build` runs on "
                "the graphs it quantizes)"]
    return [f"zero point {name!r} is nonzero: TensorRT takes symmetric quantization only (quantize activations "
            "with symmetric scales)"]


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


def opset_notes(path: Path, release: TensorRTRelease | str | None = None) -> list[str]:
    """The graph's default-domain opset against the range the release documents. TensorRT's parser reads a newer
    opset node by node (it logs the opset, it does not refuse it), so these are notes, not readiness problems: ModelOpt
    raises int4 graphs to opset 21, past 10.3's documented 20, and 10.3 still parses their INT4 DequantizeLinear."""
    if not isinstance(release, TensorRTRelease):
        release = release_for(release)
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    lo, hi = release.opsets
    if opset is None or lo <= opset <= hi:
        return []
    return [f"opset {opset} is outside the range TensorRT {release.name} documents ({lo}..{hi}); its parser reads the "
            "graph op by op"]


def check_graph(path: Path, tsv: Path = DEFAULT_TSV, release: TensorRTRelease | str | None = None) -> None:
    onnx_check(path)
    if tsv.is_file():
        problems = tensorrt_readiness(path, tsv if release is None else None, release=release)
        if problems:
            raise GraphCheckError(f"{path.name} is not TensorRT-ready:\n  " + "\n  ".join(problems))
