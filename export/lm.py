"""The decoder graphs' op forms: one `Qwen3Ops` set per form, installed on the one Qwen3 definition while it is traced.

Each primitive is a `torch.autograd.Function`: run eagerly it computes exactly what the default PyTorch primitive
computes; traced, its `symbolic` emits the form's ONNX ops. A form differs from another only in these primitives,
and each form has one attention lowering.

- classic (opset 17): cache write ScatterElements (axis 2); attention MatMul + Softmax over the whole cache under
  the mask (scores and softmax in fp32); RMSNorm and rotary elementwise. TensorRT 10.3+ and onnxruntime.
- modern (opset 24): TensorScatter (axis -2); Attention (4-D bool mask); RMSNormalization (statistics in fp32);
  RotaryEmbedding. TensorRT 10.15+ and onnxruntime >= 1.23.
- gqa (opset 17 + com.microsoft): `com.microsoft.GroupQueryAttention` does the cache write into the shared
  past/present buffer, the rotary and the attention over the `seqlens_k + 1` filled rows only; RMSNorm elementwise
  (onnxruntime fuses it into SimplifiedLayerNormalization). onnxruntime (CPU, CUDA) only.

The fixed-shape forms attend over all MAX cache rows (one TensorRT profile, CUDA-graph friendly); the gqa form's step
cost follows the filled length, which is what onnxruntime on a CPU or a GPU without TensorRT wants.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from torch import Tensor

from opens2s_edge.training import qwen3

FORMS = ("classic", "modern", "gqa")
# The forms TensorRT parses (checked against its support list at export); gqa is onnxruntime's.
TENSORRT_FORMS = ("classic", "modern")
OPSETS = {"classic": 17, "modern": 24, "gqa": 17}
# Where the TorchScript exporter writes the modern ops before `finish_modern` moves them to the ONNX domain.
_STAGING = "opens2s_std"
_TRACE_OPSET = 20
MICROSOFT = "com.microsoft"


def export_opset(form: str) -> int:
    """The opset the TorchScript exporter traces at for `form` (modern graphs are raised to 24 after)."""
    check_form(form)
    return _TRACE_OPSET if form == "modern" else OPSETS[form]


def check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"graph form must be one of {', '.join(FORMS)}, got {form!r}")


def custom_opsets(form: str) -> dict[str, int]:
    return {"modern": {_STAGING: 1}, "gqa": {MICROSOFT: 1}}.get(form, {})


_ONNX_TYPE = {"Float": onnx.TensorProto.FLOAT, "Half": onnx.TensorProto.FLOAT16, "BFloat16": onnx.TensorProto.BFLOAT16}


def _const(g, value, dtype: torch.dtype = torch.int64):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


# -- attention ------------------------------------------------------------------------------------------------------
def classic_attention_nodes(g, query, key, value, mask, scale: float | None):
    """MatMul + Softmax attention with the scores in fp32 from the first MatMul on: the classic lowering, shared by
    the classic decoder form and every other graph's scaled_dot_product_attention (graphs.precision_ops). A bool
    mask selects the lowest finite fp32 (not -inf: a row with no visible key then averages instead of giving NaN),
    a float mask is added. `scale` None: 1/sqrt(head_dim) read off the query's shape."""
    from torch.onnx import symbolic_helper as sh

    original = query.type().scalarType()
    rank = sh._get_tensor_rank(key)
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    scores = g.op("Cast", g.op("MatMul", query, g.op("Transpose", key, perm_i=perm)), to_i=onnx.TensorProto.FLOAT)
    if scale is not None:
        factor = _const(g, scale, torch.float32)
    else:
        # The tracer loses static sizes through reshapes: 1/sqrt(head_dim) from the query's runtime shape.
        head_dim = g.op("Gather", g.op("Shape", query), _const(g, -1), axis_i=0)
        factor = g.op("Reciprocal", g.op("Sqrt", g.op("Cast", head_dim, to_i=onnx.TensorProto.FLOAT)))
    scores = g.op("Mul", scores, factor)
    if mask is not None and not sh._is_none(mask):
        if mask.type().scalarType() == "Bool":
            scores = g.op("Where", mask, scores, _const(g, torch.finfo(torch.float32).min, torch.float32))
        else:
            scores = g.op("Add", scores, g.op("Cast", mask, to_i=onnx.TensorProto.FLOAT))
    probs = g.op("Softmax", scores, axis_i=-1)
    if original != "Float":
        probs = g.op("Cast", probs, to_i=_ONNX_TYPE[original])
    return g.op("MatMul", probs, value)


class _ClassicSDPA(torch.autograd.Function):
    """Attention of q (B, KV, R, D) over k, v (B, KV, L, D) under a bool mask (R, L)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:  # noqa: ARG004
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    @staticmethod
    def symbolic(g, q, k, v, mask, scale):
        return classic_attention_nodes(g, q, k, v, mask, scale)


class _ModernSDPA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:  # noqa: ARG004
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    @staticmethod
    def symbolic(g, q, k, v, mask, scale):
        # TensorRT's Attention takes 4-D masks only.
        mask = g.op("Unsqueeze", mask, _const(g, [0, 1]))
        attrs = {"scale_f": scale}
        if q.type().scalarType() in ("Half", "BFloat16"):
            attrs["softmax_precision_i"] = onnx.TensorProto.FLOAT
        out = g.op(f"{_STAGING}::Attention", q, k, v, mask, **attrs)
        out.setType(q.type())
        return out


def _grouped(sdpa: type[torch.autograd.Function], scale: float):
    """The `attention` primitive on an SDPA core: the query heads that share a KV head are stacked along the rows (as
    qwen3.gqa_attention does), so no copy of the cache is made and the core sees equal head counts."""

    def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, pos: Tensor) -> Tensor:  # noqa: ARG001
        b, h, t, d = q.shape
        kv = k.shape[1]
        group = h // kv
        y = sdpa.apply(q.reshape(b, kv, group * t, d), k, v, mask.repeat(group, 1) if group > 1 else mask, scale)
        return y.reshape(b, h, t, d)

    return attention


class _GroupQueryAttention(torch.autograd.Function):
    """onnxruntime's com.microsoft.GroupQueryAttention: rotary on q and k, the new rows written into the shared
    past/present buffer, causal attention over the filled rows only. Eagerly: the same numbers from the default
    primitives (rotary rows at `pos`, scatter, masked attention over the whole buffer)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, pos: Tensor,  # noqa: ARG004
                cos_table: Tensor, sin_table: Tensor, heads: int, kv_heads: int, head_dim: int,  # noqa: ARG004
                scale: float) -> tuple[Tensor, Tensor, Tensor]:
        cos, sin = cos_table[pos].to(q.dtype), sin_table[pos].to(q.dtype)
        qt = qwen3.apply_rope(q.transpose(1, 2), cos, sin)
        kt = qwen3.apply_rope(k.transpose(1, 2), cos, sin)
        present_k = qwen3.scatter_rows(past_k, kt, pos)
        present_v = qwen3.scatter_rows(past_v, qwen3.split_heads(v, kv_heads, head_dim).transpose(1, 2), pos)
        mask = pos[:, None] >= torch.arange(past_k.shape[2], device=pos.device)[None, :]
        b, h, t, d = qt.shape
        kv = past_k.shape[1]
        group = h // kv
        y = torch.nn.functional.scaled_dot_product_attention(
            qt.reshape(b, kv, group * t, d), present_k, present_v, attn_mask=mask.repeat(group, 1), scale=scale)
        return y.reshape(b, h, t, d).transpose(1, 2).flatten(-2), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, pos, cos_table, sin_table, heads, kv_heads, head_dim, scale):
        flat = _const(g, [0, 0, -1])
        # The whole cache holds pos[-1] + 1 rows after this step: seqlens_k is that minus one, per batch row.
        last = g.op("Slice", pos, _const(g, [-1]), _const(g, [2**62]), _const(g, [0]))
        seqlens_k = g.op("Cast", last, to_i=onnx.TensorProto.INT32)
        total = g.op("Cast", g.op("Squeeze", g.op("Add", last, _const(g, [1])), _const(g, [0])),
                     to_i=onnx.TensorProto.INT32)
        # The op's rotary takes (max positions, head_dim / 2) tables in the activations' dtype (ours repeat the
        # half twice along head_dim).
        halves = []
        for table in (cos_table, sin_table):
            half = g.op("Slice", table, _const(g, [0]), _const(g, [head_dim // 2]), _const(g, [1]))
            if q.type().scalarType() != "Float":
                half = g.op("Cast", half, to_i=_ONNX_TYPE[q.type().scalarType()])
            halves.append(half)
        y, present_k, present_v = g.op(
            f"{MICROSOFT}::GroupQueryAttention", g.op("Reshape", q, flat), g.op("Reshape", k, flat),
            v, past_k, past_v, seqlens_k, total, *halves,
            num_heads_i=heads, kv_num_heads_i=kv_heads, scale_f=scale, do_rotary_i=1, rotary_interleaved_i=0,
            outputs=3)
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        rows = q.type().varyingSizes()[:2]
        y.setType(q.type().with_sizes([*rows, heads * head_dim]))
        return y, present_k, present_v


def _gqa_fused(c: qwen3.Qwen3Config) -> qwen3.FusedAttention:
    # Head counts from the config: the tracer cannot read static sizes off values that went through dynamic views.
    shape = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.head_dim ** -0.5)

    def fused(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor,
              p: qwen3.Positions) -> tuple[Tensor, Tensor, Tensor]:
        return _GroupQueryAttention.apply(q, k, v, past_k, past_v, p.pos, p.cos_table, p.sin_table, *shape)

    return fused


# -- cache write, RMSNorm, rotary (modern) --------------------------------------------------------------------------
class _TensorScatter(torch.autograd.Function):
    """Rows start..start+T-1 of the cache replaced by `update` (positions are contiguous by contract)."""

    @staticmethod
    def forward(ctx, past: Tensor, update: Tensor, pos: Tensor) -> Tensor:  # noqa: ARG004
        return qwen3.scatter_rows(past, update, pos)

    @staticmethod
    def symbolic(g, past, update, pos):
        start = g.op("Slice", pos, _const(g, [0]), _const(g, [1]))
        out = g.op(f"{_STAGING}::TensorScatter", past, update, start, axis_i=-2)
        out.setType(past.type())  # keeps the static cache shape visible to the attention lowering
        return out


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # noqa: ARG004
        return qwen3.rms_norm(x, weight, eps)

    @staticmethod
    def symbolic(g, x, weight, eps):
        # stash_type 1: the mean of squares is taken in fp32 even in an fp16/bf16 graph.
        out = g.op(f"{_STAGING}::RMSNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)
        out.setType(x.type())
        return out


class _Rope(torch.autograd.Function):
    """Non-interleaved rotary embedding of (B, heads, T, head_dim) with per-row cos/sin (T, head_dim)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # noqa: ARG004
        return qwen3.apply_rope(x, cos, sin)

    @staticmethod
    def symbolic(g, x, cos, sin):
        # RotaryEmbedding without position_ids takes caches already gathered per row: (B, T, head_dim / 2).
        def half(table):
            sliced = g.op("Slice", table, _const(g, [0]), _const(g, [_half_dim(table)]), _const(g, [-1]))
            return g.op("Unsqueeze", sliced, _const(g, [0]))

        out = g.op(f"{_STAGING}::RotaryEmbedding", x, half(cos), half(sin), interleaved_i=0)
        out.setType(x.type())
        return out


def _half_dim(table) -> int:
    sizes = table.type().varyingSizes()
    if not sizes or sizes[-1] is None:
        raise ValueError("RotaryEmbedding lowering needs a static head_dim")
    return sizes[-1] // 2


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, heads: int, head_dim: int) -> Tensor:  # noqa: ARG004
        return qwen3.split_heads(x, heads, head_dim)

    @staticmethod
    def symbolic(g, x, heads, head_dim):
        # 0 copies the batch, -1 infers the rows: a constant shape, no Shape/Gather/Concat subgraph per reshape.
        return g.op("Reshape", x, _const(g, [0, -1, heads, head_dim]))


# -- the op sets ----------------------------------------------------------------------------------------------------
def form_ops(form: str, config: qwen3.Qwen3Config) -> qwen3.Qwen3Ops:
    """The primitive set that traces `config`'s decoder in `form` (the config fixes head counts and the attention
    scale, which the tracer cannot read off shapes that went through dynamic slices)."""
    check_form(form)
    scale = config.head_dim ** -0.5
    if form == "classic":
        return qwen3.Qwen3Ops(attention=_grouped(_ClassicSDPA, scale), name="onnx-classic")
    if form == "modern":
        return qwen3.Qwen3Ops(rms_norm=_RMSNorm.apply, rope=_Rope.apply, attention=_grouped(_ModernSDPA, scale),
                              write_cache=_TensorScatter.apply, name="onnx-modern")
    # Constant-shape head reshapes too: at int4 a step is a few milliseconds, and the shape subgraphs of traced
    # views were a measurable share of it (benchmarks/RESULTS.md).
    return qwen3.Qwen3Ops(fused_attention=_gqa_fused(config), split_heads=_SplitHeads.apply, name="onnx-gqa",
                          reads_filled_rows=True)


@contextlib.contextmanager
def traced_with(lm: qwen3.Qwen3LM, ops: qwen3.Qwen3Ops) -> Iterator[None]:
    """`lm` runs with `ops` inside the block and with its own set again after it (the fp32 reference the export
    checks against runs on the default PyTorch primitives, not on the form's)."""
    saved = lm.ops
    lm.set_ops(ops)
    try:
        yield
    finally:
        lm.set_ops(saved)


def finish_modern(path: Path) -> None:
    """Move the staged ops into the ONNX domain at opset 24. The rest of the graph was traced at opset 20;
    no op it uses changed meaning up to 24 (new versions only added types), and the full checker and the
    onnxruntime parity run after this confirm the result."""
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.domain == _STAGING:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain not in (_STAGING, "", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", OPSETS["modern"]), *kept])
    onnx.save(model, str(path))


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type a graph holds (tests and the manifest use it to show the form)."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
