"""The decoder graphs' two forms: the same Qwen3 module tree, with its primitives lowered to ONNX differently.

- "classic" (opset 17): the cache write is a ScatterElements on the sequence axis, attention is
  MatMul + Softmax (softmax in fp32 whatever the graph's dtype), RMSNorm and RoPE stay elementwise. TensorRT
  10.3 (JetPack 6) parses every op.
- "modern" (opset 24): the cache write is `TensorScatter` (axis -2), attention is the `Attention` op,
  RMSNorm is `RMSNormalization` (statistics in fp32: stash_type 1), RoPE is `RotaryEmbedding`. TensorRT 10.15
  and onnxruntime >= 1.23 run them; onnxruntime writes the cache in place when the past and present buffers
  are the same.

Nothing here defines a model: `lowering(form)` swaps how four primitives of training/qwen3.py are *traced*
(each swap computes exactly what it replaces when run eagerly), and `finish_modern` moves the emitted nodes
into the standard domain once the TorchScript exporter (which stops at opset 20) has written the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from torch import Tensor

from opens2s_edge.training import qwen3

FORMS = ("classic", "modern")
OPSETS = {"classic": 17, "modern": 24}
# Where the TorchScript exporter writes the modern ops before `finish_modern` moves them to the ONNX domain.
_STAGING = "opens2s_std"
_TRACE_OPSET = 20


def export_opset(form: str) -> int:
    """The opset the TorchScript exporter traces at for `form` (modern graphs are raised to 24 after)."""
    check_form(form)
    return OPSETS["classic"] if form == "classic" else _TRACE_OPSET


def check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"graph form must be one of {', '.join(FORMS)}, got {form!r}")


class _TensorScatter(torch.autograd.Function):
    """Rows start..start+T-1 of the cache replaced by `update` (positions are contiguous by contract)."""

    @staticmethod
    def forward(ctx, past: Tensor, update: Tensor, pos: Tensor) -> Tensor:  # noqa: ARG004
        return past.index_copy(2, pos, update)

    @staticmethod
    def symbolic(g, past, update, pos):
        start = g.op("Slice", pos, g.op("Constant", value_t=torch.tensor([0])),
                     g.op("Constant", value_t=torch.tensor([1])))
        out = g.op(f"{_STAGING}::TensorScatter", past, update, start, axis_i=-2)
        out.setType(past.type())  # keeps the static cache shape visible to the attention lowering
        return out


class TensorScatterKVCache:
    """One layer's cache in a modern graph: past in, present (same shape) out, written by TensorScatter."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = _TensorScatter.apply(self.k, k, pos)
        self.v = _TensorScatter.apply(self.v, v, pos)
        return self.k, self.v


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # noqa: ARG004
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

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
        return _original_rope(x, cos, sin)

    @staticmethod
    def symbolic(g, x, cos, sin):
        # RotaryEmbedding without position_ids takes caches already gathered per row: (B, T, head_dim / 2).
        def half(table):
            sliced = g.op("Slice", table, g.op("Constant", value_t=torch.tensor([0])),
                          g.op("Constant", value_t=torch.tensor([_half_dim(table)])),
                          g.op("Constant", value_t=torch.tensor([-1])))
            return g.op("Unsqueeze", sliced, g.op("Constant", value_t=torch.tensor([0])))

        out = g.op(f"{_STAGING}::RotaryEmbedding", x, half(cos), half(sin), interleaved_i=0)
        out.setType(x.type())
        return out


def _half_dim(table) -> int:
    sizes = table.type().varyingSizes()
    if not sizes or sizes[-1] is None:
        raise ValueError("RotaryEmbedding lowering needs a static head_dim")
    return sizes[-1] // 2


_original_rope = qwen3.apply_rope


def _sdpa_symbolic(form: str, head_dim: int):
    """aten::scaled_dot_product_attention as exported by our graphs. qwen3 stacks the query heads that share
    a KV head along the rows, so Q, K and V have the same head count and no KV copy is needed."""
    from torch.onnx import symbolic_helper as sh

    def lower(g, query, key, value, attn_mask=None, dropout_p=None, is_causal=None, scale=None, enable_gqa=None):
        if not sh._is_none(is_causal) and sh._maybe_get_const(is_causal, "b"):
            raise ValueError("causal SDPA is not used by the decoder graphs (they pass an explicit mask)")
        if sh._is_none(attn_mask):
            raise ValueError("the decoder graphs always pass an attention mask")
        dtype = query.type().scalarType()
        scale_value = None if sh._is_none(scale) else sh._maybe_get_const(scale, "f")
        scale_value = scale_value if isinstance(scale_value, float) else head_dim ** -0.5
        mask = attn_mask
        rank = sh._get_tensor_rank(mask)
        if rank < 4:  # TensorRT's Attention takes 4-D masks only
            mask = g.op("Unsqueeze", mask, g.op("Constant", value_t=torch.tensor(list(range(4 - rank)))))
        if form == "modern":
            attrs = {"scale_f": scale_value}
            if dtype in ("Half", "BFloat16"):
                attrs["softmax_precision_i"] = onnx.TensorProto.FLOAT
            out = g.op(f"{_STAGING}::Attention", query, key, value, mask, **attrs)
            out.setType(query.type())
            return out
        key_t = g.op("Transpose", key, perm_i=[0, 1, 3, 2])
        scores = g.op("MatMul", query, key_t)
        scores = g.op("Cast", scores, to_i=onnx.TensorProto.FLOAT)
        scores = g.op("Mul", scores, g.op("Constant", value_t=torch.tensor(scale_value, dtype=torch.float32)))
        lowest = g.op("Constant", value_t=torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32))
        scores = g.op("Where", mask, scores, lowest)
        probs = g.op("Softmax", scores, axis_i=-1)
        if dtype != "Float":
            probs = g.op("Cast", probs, to_i=_ONNX_TYPE[dtype])
        return g.op("MatMul", probs, value)

    return lower


_ONNX_TYPE = {"Half": onnx.TensorProto.FLOAT16, "BFloat16": onnx.TensorProto.BFLOAT16}


@contextlib.contextmanager
def lowering(form: str, head_dim: int) -> Iterator[None]:
    """Trace the Qwen3 modules with `form`'s ONNX ops (`head_dim` sets the default attention scale, which the
    tracer cannot read off shapes that went through dynamic slices). Only export calls should run inside it."""
    check_form(form)
    opset = export_opset(form)
    torch.onnx.register_custom_op_symbolic("aten::scaled_dot_product_attention", _sdpa_symbolic(form, head_dim), opset)
    saved_norm = qwen3.RMSNorm.forward
    if form == "modern":
        qwen3.RMSNorm.forward = lambda self, x: _RMSNorm.apply(x, self.weight, self.eps)
        qwen3.apply_rope = _Rope.apply
    try:
        yield
    finally:
        qwen3.RMSNorm.forward = saved_norm
        qwen3.apply_rope = _original_rope
        torch.onnx.unregister_custom_op_symbolic("aten::scaled_dot_product_attention", opset)


def custom_opsets(form: str) -> dict[str, int]:
    return {_STAGING: 1} if form == "modern" else {}


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
