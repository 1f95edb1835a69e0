"""kernels/: every Triton kernel against a float64 reference (kernels/reference.py run on float64 copies of the
inputs) at the real decoders' shapes (Qwen3-8B: hidden 4096, intermediate 12288, 32 query / 8 KV heads of 128; the
1.7B TTS LM: hidden 2048, intermediate 6144, 16 / 8 heads of 128) and at odd sizes; the custom ops' schemas and fake
implementations (torch.library.opcheck); a Qwen3 model on the Triton primitive set against the same model on PyTorch's
ops, eagerly and through dynamo with fullgraph=True (no graph break); weight-only quantized layers against the float
layer they replace.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set here before the
kernels are imported); with one, on the GPU (run with TRITON_INTERPRET=1 to check the interpreter there too), where
CUDA graph capture and replay of each op is checked as well.

Cheap at real shapes: the row-wise kernels get a few rows of full width; the matrix-vector kernels the full input
width (all K, every group and block) but only a few output rows plus a partial tile, which is what tiles by rows;
attention the full head layout over a cache window crossing several splits and a partial row block.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of PyTorch; `pip install "
                                     "triton` elsewhere): the kernels cannot run")

from opens2s_edge.kernels import ops, reference  # noqa: E402
from opens2s_edge.kernels.quant import PROJECTIONS, QuantizedLinear, quantize_linears  # noqa: E402
from opens2s_edge.training.qwen3 import TORCH_OPS, Qwen3Config, Qwen3LM, init_weights, rope_tables  # noqa: E402

KERNELS = ops.triton_kernels()
ON_GPU = torch.cuda.is_available() and not KERNELS.INTERPRETED
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if not ON_GPU and not KERNELS.INTERPRETED:
    pytest.skip("no GPU, and the kernels were imported without TRITON_INTERPRET=1 (set it before the first import)",
                allow_module_level=True)
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="CUDA graph capture needs a CUDA device")

# Normalized max error, max|out - ref| / max(|ref|), allowed per dtype: fp32 accumulates in another order than
# float64; fp16/bf16 round the result (and, like PyTorch, some intermediates) to 11 / 8 significant bits.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LLM = dict(hidden=4096, intermediate=12288, heads=32, kv=8, head_dim=128)
TTS = dict(hidden=2048, intermediate=6144, heads=16, kv=8, head_dim=128)


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _f64(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.double().cpu() for t in ts]


# -- RMSNorm -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 1, LLM["hidden"]), (1, 2, TTS["hidden"]),
                                   (1, 1, LLM["heads"], 128), (1, 1, LLM["kv"], 128),  # the q/k norms, per head
                                   (3, 5, 100), (1, 1, 1)], ids=str)
def test_rms_norm(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _rand(*shape, dtype=dtype, scale=3.0)
    w = _rand(shape[-1], dtype=dtype, seed=1)
    out = KERNELS.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype
    assert _error(out, reference.rms_norm(*_f64(x, w), 1e-6)) <= TOL[dtype]


# -- rotary embedding --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,positions,head_dim", [(LLM["heads"], [2047], 128), (LLM["kv"], [5], 128),
                                                      (TTS["heads"], [0], 128), (4, list(range(60, 67)), 128),
                                                      (3, [1, 9, 31, 400, 77], 48)], ids=str)
def test_rope(heads: int, positions: list[int], head_dim: int, dtype: torch.dtype) -> None:
    # Laid out as qwen3 hands it over: (B, T, H, D) transposed to (B, H, T, D), a non-contiguous view.
    t = len(positions)
    x = _rand(1, t, heads, head_dim, dtype=dtype).transpose(1, 2)
    cos, sin = rope_tables(head_dim, 4096, 1_000_000.0)
    idx = torch.tensor(positions)
    cos, sin = cos[idx].to(dtype).to(DEVICE), sin[idx].to(dtype).to(DEVICE)
    out = KERNELS.rope(x, cos, sin)
    assert out.shape == x.shape and out.is_contiguous()
    assert _error(out, reference.rope(*_f64(x, cos, sin))) <= 2 * TOL[dtype]


# -- SwiGLU ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [LLM["intermediate"], TTS["intermediate"], 4097], ids=str)
def test_swiglu(n: int, dtype: torch.dtype) -> None:
    gate, up = _rand(1, 1, n, dtype=dtype, scale=4.0), _rand(1, 1, n, dtype=dtype, seed=1)
    out = KERNELS.swiglu(gate, up)
    assert _error(out, reference.swiglu(*_f64(gate, up))) <= 2 * TOL[dtype]


# -- decode attention --------------------------------------------------------------------------------------------------
def _cache(kv: int, length: int, head_dim: int, pos: int, dtype: torch.dtype, total: int | None = None):
    """K/V as the static cache holds them: a window view (first `length` rows) of a longer buffer; the rows after
    `pos` hold NaN, so a kernel that read one would return NaN."""
    total = total or length + 37
    k = _rand(1, kv, total, head_dim, dtype=dtype, seed=2)
    v = _rand(1, kv, total, head_dim, dtype=dtype, seed=3)
    k[:, :, pos + 1:] = float("nan")
    v[:, :, pos + 1:] = float("nan")
    return k[:, :, :length], v[:, :, :length]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model,length,pos,splits", [
    (LLM, 512, 300, 0),      # the device's split count
    (LLM, 512, 0, 3),        # only row 0 filled
    (LLM, 512, 511, 7),      # every row, uneven splits
    (TTS, 300, 191, 2),      # a split boundary inside a row block
    (dict(heads=6, kv=2, head_dim=80), 150, 149, 3),   # odd: 3 query heads per KV head, head dim 80
    (dict(heads=5, kv=5, head_dim=16), 70, 64, 0),     # no grouping, a row block of one
], ids=str)
def test_decode_attention(model: dict, length: int, pos: int, splits: int, dtype: torch.dtype) -> None:
    h, kv, d = model["heads"], model["kv"], model["head_dim"]
    q = _rand(1, 1, h, d, dtype=dtype, seed=4).transpose(1, 2)
    k, v = _cache(kv, length, d, pos, dtype)
    position = torch.tensor([pos], device=DEVICE)
    out = KERNELS.decode_attention(q, k, v, position, splits)
    assert out.shape == (1, h, 1, d) and out.dtype == dtype
    assert _error(out, reference.decode_attention(*_f64(q, k, v), position.cpu())) <= TOL[dtype]


def test_attention_splits_depend_on_shape_only() -> None:
    per_split, n = KERNELS.attention_splits(4096, 8, torch.device("cpu"))
    assert per_split % KERNELS.ATTN_BLOCK_N == 0 and (n - 1) * per_split < 4096 <= n * per_split
    assert KERNELS.attention_splits(300, 8, torch.device("cpu"), splits=2) == (192, 2)
    assert KERNELS.attention_splits(1, 8, torch.device("cpu")) == (KERNELS.ATTN_BLOCK_N, 1)


# -- weight-only matrix-vector products --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,k,n", [(1, LLM["hidden"], 69), (3, LLM["intermediate"], 37),
                                      (1, TTS["hidden"], 33), (2, 1000, 45)], ids=str)
def test_weight_only_matvec(bits: int, rows: int, k: int, n: int) -> None:
    """n: two row tiles and a partial one (the kernel tiles by output rows); k: the real input width, every block
    and int4 group, and 1000 for a width that is no multiple of the int4 group (zero padded)."""
    weight = _rand(n, k, scale=0.05, seed=5)
    qweight, scales = reference.quantize_weight(weight, bits)
    x = _rand(rows, k, seed=6)
    out = KERNELS.wo_linear(x, qweight, scales, bits, reference.INT4_GROUP, k)
    dequant = reference.dequantize_weight(qweight.cpu(), scales.cpu(), bits, k, dtype=torch.float64)
    assert _error(out, x.double().cpu() @ dequant.T) <= 1e-5
    # bf16 activations: the product rounded once
    out16 = KERNELS.wo_linear(x.to(torch.bfloat16), qweight, scales, bits, reference.INT4_GROUP, k)
    assert out16.dtype == torch.bfloat16
    assert _error(out16, x.to(torch.bfloat16).double().cpu() @ dequant.T) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_is_half_a_step(bits: int) -> None:
    """Symmetric rounding: every dequantized weight is within half a quantization step of the float one, and the
    largest magnitude of each row (int8) or group (int4) is exact up to the scale's rounding."""
    weight = torch.randn(16, 300, generator=torch.Generator().manual_seed(7)) * 0.02
    qweight, scales = reference.quantize_weight(weight, bits)
    back = reference.dequantize_weight(qweight, scales, bits, 300, dtype=torch.float64)
    if bits == 8:
        step = scales.double()[:, None].expand(-1, 300)
    else:
        step = scales.double().repeat_interleave(reference.INT4_GROUP, dim=1)[:, :300]
    assert ((back - weight.double()).abs() <= step / 2 + 1e-9).all()
    assert qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert qweight.shape == ((16, 300) if bits == 8 else (16, 384 // 2))


# -- the custom ops ----------------------------------------------------------------------------------------------------
def test_custom_ops_schemas_and_fakes() -> None:
    q = _rand(1, 1, 4, 16).transpose(1, 2)
    k, v = _cache(2, 40, 16, 20, torch.float32)
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)  # opcheck compares runs, NaN != NaN
    qweight, scales = reference.quantize_weight(_rand(24, 64), 4, 32)
    cos, sin = rope_tables(16, 8, 10_000.0)
    cases = [
        (torch.ops.opens2s.rms_norm, (_rand(2, 3, 64), _rand(64), 1e-6)),
        (torch.ops.opens2s.rope, (q, cos[:1].to(DEVICE), sin[:1].to(DEVICE))),
        (torch.ops.opens2s.swiglu, (_rand(3, 100), _rand(3, 100))),
        (torch.ops.opens2s.decode_attention, (q, k, v, torch.tensor([20], device=DEVICE), 2)),
        (torch.ops.opens2s.wo_linear, (_rand(2, 64), qweight.to(DEVICE), scales.to(DEVICE), 4, 32, 64)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_cpu_fallback_is_the_reference() -> None:
    """Without Triton's interpreter the ops run the references on CPU tensors, which compute what qwen3's own torch
    primitives compute, bit for bit."""
    x, w = torch.randn(2, 3, 64), torch.randn(64)
    assert torch.equal(reference.rms_norm(x, w, 1e-6), TORCH_OPS.rms_norm(x, w, 1e-6))
    gate, up = torch.randn(5, 70), torch.randn(5, 70)
    assert torch.equal(reference.swiglu(gate, up), TORCH_OPS.swiglu(gate, up))
    q, cos, sin = torch.randn(1, 4, 3, 16), torch.randn(3, 16), torch.randn(3, 16)
    assert torch.equal(reference.rope(q, cos, sin), TORCH_OPS.rope(q, cos, sin))


# -- a whole model on the Triton primitive set -------------------------------------------------------------------------
def _tiny_lm(dtype: torch.dtype = torch.float32, head_dim: int = 32) -> Qwen3LM:
    config = Qwen3Config(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=head_dim)
    lm = Qwen3LM(config)
    init_weights(lm, 0.1, torch.Generator().manual_seed(8))
    return lm.to(DEVICE, dtype).eval()


@torch.inference_mode()
def test_model_on_triton_ops_matches_torch_ops() -> None:
    """A prefill then single-token steps (eager integer positions and the fixed-shape tensor-position step over the
    whole cache, the CUDA backend's graph body), on the Triton set vs PyTorch's ops."""
    from opens2s_edge.training.cuda_backend import StaticDecodeStep

    ref, lm = _tiny_lm(), _tiny_lm()
    lm.set_ops(ops.TRITON_OPS)
    assert lm.ops.name == "triton" and ref.ops is TORCH_OPS
    for m in (ref, lm):
        m.setup_cache(96)
    prompt = torch.arange(3, 40, device=DEVICE)[None]
    a, b = ref(ref.embed(prompt), 0), lm(lm.embed(prompt), 0)
    assert _error(b[0], a[0]) <= 1e-5 and _error(b[1], a[1]) <= 1e-5
    step = StaticDecodeStep(lm, "static", windows=(96,))
    for pos, token in zip(range(37, 45), (5, 17, 250, 3, 99, 1, 0, 42), strict=True):
        want, _ = ref(ref.embed(torch.tensor([[token]], device=DEVICE)), pos)
        if pos % 2:
            got = lm(lm.embed(torch.tensor([[token]], device=DEVICE)), pos)[0][0, -1]
        else:
            got = step.token(token, pos)[: lm.config.vocab_size]
        assert _error(got, want[0, -1]) <= 1e-5, pos


def test_triton_step_traces_as_one_graph() -> None:
    """Dynamo with fullgraph=True through the custom ops: no graph break, and one graph whatever the position."""
    from torch._dynamo.testing import CompileCounter

    from opens2s_edge.training.cuda_backend import StaticDecodeStep

    lm = _tiny_lm()
    lm.set_ops(ops.TRITON_OPS)
    lm.setup_cache(64)
    step = StaticDecodeStep(lm, "static", windows=(64,))
    counter = CompileCounter()
    traced = torch.compile(step.forward, backend=counter, fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            for pos in (0, 9, 63):
                step.ids.fill_(pos + 1)
                step.pos.fill_(pos)
                assert torch.allclose(traced("token", 64), step.forward("token", 64), atol=1e-6)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("weights,cosine", [("int8", 0.999), ("int4", 0.8)])
@torch.inference_mode()
def test_quantized_model_equals_its_dequantized_weights(weights: str, cosine: float) -> None:
    """Every projection replaced; the quantized model (Triton matvec for the single-token steps, dequantize + GEMM
    for the prefill) computes what the float model computes with the dequantized weights put in its layers, and
    stays close to the original float model (cosine of the logits; random weights, so int4 is coarse)."""
    ref, lm, dequant = _tiny_lm(), _tiny_lm(), _tiny_lm()
    assert quantize_linears(lm, weights) == 14
    lm.set_ops(ops.TRITON_OPS)
    for layer, target in zip(lm.model.layers, dequant.model.layers, strict=True):
        for part, into in ((layer.self_attn, target.self_attn), (layer.mlp, target.mlp)):
            for name in PROJECTIONS:
                if hasattr(part, name):
                    q = getattr(part, name)
                    assert isinstance(q, QuantizedLinear)
                    getattr(into, name).weight.copy_(reference.dequantize_weight(
                        q.qweight, q.scales, q.bits, q.in_features, q.group_size))
    assert type(lm.lm_head) is torch.nn.Linear  # the vocabulary head stays in the model's dtype
    for m in (ref, lm, dequant):
        m.setup_cache(64)
    feeds = [(torch.arange(10, 30, device=DEVICE)[None], 0), (torch.tensor([[7]], device=DEVICE), 20),
             (torch.tensor([[100]], device=DEVICE), 21)]
    for ids, pos in feeds:
        float_out, quant_out, dequant_out = (m(m.embed(ids), pos)[0] for m in (ref, lm, dequant))
        assert _error(quant_out, dequant_out) <= 1e-4, pos
        assert _cosine(quant_out, float_out) >= cosine, pos


# -- CUDA graphs -------------------------------------------------------------------------------------------------------
@needs_cuda
@torch.inference_mode()
def test_ops_replay_under_cuda_graphs() -> None:
    """Each op captured once and replayed with new values in its input buffers (a new position for attention)
    gives the reference's answer: no host sync, no position baked into the launch."""
    h, kv, d, length = LLM["heads"], LLM["kv"], LLM["head_dim"], 512
    q = _rand(1, h, 1, d, dtype=torch.bfloat16)
    k, v = _rand(1, kv, length, d, dtype=torch.bfloat16, seed=2), _rand(1, kv, length, d, dtype=torch.bfloat16, seed=3)
    pos = torch.zeros(1, dtype=torch.long, device=DEVICE)
    x, w = _rand(1, 1, LLM["hidden"], dtype=torch.bfloat16), _rand(LLM["hidden"], dtype=torch.bfloat16, seed=1)
    gate, up = _rand(1, 1, LLM["intermediate"], dtype=torch.bfloat16), _rand(1, 1, LLM["intermediate"],
                                                                               dtype=torch.bfloat16, seed=1)
    qweight, scales = reference.quantize_weight(_rand(256, LLM["hidden"], scale=0.05), 4)
    cos, sin = (t[:1].to(DEVICE, torch.bfloat16) for t in rope_tables(d, 8, 1e6))

    def body():
        return (torch.ops.opens2s.decode_attention(q, k, v, pos), torch.ops.opens2s.rms_norm(x, w, 1e-6),
                torch.ops.opens2s.swiglu(gate, up), torch.ops.opens2s.rope(q, cos, sin),
                torch.ops.opens2s.wo_linear(x[0], qweight, scales, 4, reference.INT4_GROUP, LLM["hidden"]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = body()
    for p in (0, 200, 511):
        pos.fill_(p)
        x.normal_()
        gate.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert _error(outs[0], reference.decode_attention(*_f64(q, k, v), pos.cpu())) <= TOL[torch.bfloat16]
        assert _error(outs[1], reference.rms_norm(*_f64(x, w), 1e-6)) <= TOL[torch.bfloat16]
        assert _error(outs[2], reference.swiglu(*_f64(gate, up))) <= 2 * TOL[torch.bfloat16]
        assert _error(outs[3], reference.rope(*_f64(q, cos, sin))) <= 2 * TOL[torch.bfloat16]
        dequant = reference.dequantize_weight(qweight.cpu(), scales.cpu(), 4, LLM["hidden"], dtype=torch.float64)
        assert _error(outs[4], x[0].double().cpu() @ dequant.T) <= TOL[torch.bfloat16]
