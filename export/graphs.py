"""PyTorch modules -> ONNX graphs, one exporter per graph, all on the one model definition.

Every exporter returns a `GraphSpec` (file, input/output names, dynamic axes, example inputs) and the
pipeline exports, checks and verifies them alike. The KV-cache contract of the decoder graphs is in
export/README.md.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from onnx import TensorProto
from torch import Tensor, nn
from torch.onnx._internal.torchscript_exporter import symbolic_helper

from opens2s_edge.training.opens2s import SPEAKER_DIM, OpenS2S
from opens2s_edge.training.qwen3 import Qwen3LM
from opens2s_edge.training.token2wav.decoder import Token2Wav
from opens2s_edge.training.token2wav.estimator import TimestepEmbedding

# The opset graphs without a form-specific lowering are traced at (TensorRT 10.3 parses it).
CLASSIC_OPSET = 17


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    inputs: dict[str, Tensor]  # example inputs in call order
    outputs: list[str]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    # Other input sizes the pipeline checks the exported graph at (name -> example tensors).
    probes: list[dict[str, Tensor]] = field(default_factory=list)
    form: str = "classic"
    limits: dict[str, int] = field(default_factory=dict)
    # Inputs bound to the same buffer as an output (in-place cache): input name -> output name.
    aliases: dict[str, str] = field(default_factory=dict)
    # fp32 islands: module types that stay in float32 when the graph is exported in fp16/bf16.
    keep_fp32: tuple[type, ...] = ()
    # fp32 entries: module types fed fp32 features by the model (timestep sinusoids) that compute in fp32
    # and hand the graph's dtype on.
    fp32_entry: tuple[type, ...] = ()
    # The same by submodule name, for modules whose type is too common to select by (a Linear).
    fp32_entry_names: tuple[str, ...] = ()
    # Exported in fp32 even in a bf16 bundle: bf16's 8-bit mantissa cannot carry the vocoder's running
    # sine phase over thousands of samples (measured: ~100% deviation of the waveform).
    fp32_in_bf16: bool = False
    # How the module's primitives are traced (export/lm.py for the decoders); None = the exporter's defaults.
    lowering: Callable[[], contextlib.AbstractContextManager] | None = None
    # Output shapes the graph promises (ints static, strings symbolic), stamped over the tracer's guesses.
    output_shapes: dict[str, list[int | str]] = field(default_factory=dict)
    # Outputs that are phases in cycles: 0.9999 and 0.0001 are 2e-4 apart, and verification says so.
    circular_outputs: tuple[str, ...] = ()
    # The least deviation from the fp32 reference verification allows, whatever the export dtype.
    min_tolerance: float = 0.0
    # Matmuls reading one activation fused into one (q/k/v, gate/up): for onnxruntime's forms, where it measurably
    # pays; TensorRT fuses by itself and its forms keep one node per projection.
    fuse_matmuls: bool = False


class GraphCache:
    """One layer's cache inside an exported graph: the past arrives as an input, the updated cache leaves as an
    output, its rows written by the op set's `write_cache` (the form's cache write; a form with a fused attention
    replaces both tensors itself)."""

    def __init__(self, k: Tensor, v: Tensor, write: Callable[[Tensor, Tensor, Tensor], Tensor]):
        self.k, self.v, self.write = k, v, write

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = self.write(self.k, k, pos)
        self.v = self.write(self.v, v, pos)
        return self.k, self.v


class DecoderStep(nn.Module):
    """(inputs_embeds, start, past_key_0, past_value_0, ...) -> (logits, hidden, present_key_0, ...).

    Logits and hidden are for the last input row only: prefill needs nothing else, and it keeps a
    151k-vocabulary head off the prompt rows. The primitives are the LM's current op set (`Qwen3LM.set_ops`):
    the default PyTorch set for the fp32 reference, the form's set while it is traced.
    """

    def __init__(self, lm: Qwen3LM):
        super().__init__()
        self.lm = lm

    def forward(self, inputs_embeds: Tensor, start: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        write = self.lm.ops.write_cache
        caches = [GraphCache(past[2 * i], past[2 * i + 1], write) for i in range(len(past) // 2)]
        logits, hidden = self.lm(inputs_embeds, start, caches=caches, last_only=True)
        presents = [t for c in caches for t in (c.k, c.v)]
        return (logits, hidden, *presents)


def decoder_graph(name: str, lm: Qwen3LM, max_context: int, dtype: torch.dtype, form: str = "classic") -> GraphSpec:
    """A decoder step graph in `form` (export/lm.py: classic, modern or gqa)."""
    from . import lm as lowerings

    lowerings.check_form(form)
    c = lm.config
    cache_shape = (1, c.num_key_value_heads, max_context, c.head_dim)
    gen = torch.Generator().manual_seed(0)

    def example(t: int, start: int) -> dict[str, Tensor]:
        feeds: dict[str, Tensor] = {
            "inputs_embeds": torch.randn(1, t, c.hidden_size, generator=gen).to(dtype),
            "start": torch.tensor(start, dtype=torch.int64),
        }
        for i in range(c.num_hidden_layers):
            feeds[f"past_key_{i}"] = torch.randn(cache_shape, generator=gen).to(dtype)
            feeds[f"past_value_{i}"] = torch.randn(cache_shape, generator=gen).to(dtype)
        return feeds

    inputs = example(5, 3)
    outputs = ["logits", "hidden"]
    aliases = {}
    shapes: dict[str, list[int | str]] = {"logits": [1, 1, c.vocab_size], "hidden": [1, 1, c.hidden_size]}
    for i in range(c.num_hidden_layers):
        shapes[f"present_key_{i}"] = shapes[f"present_value_{i}"] = list(cache_shape)
        outputs += [f"present_key_{i}", f"present_value_{i}"]
        aliases[f"past_key_{i}"] = f"present_key_{i}"
        aliases[f"past_value_{i}"] = f"present_value_{i}"
    ops = lowerings.form_ops(form, c)
    return GraphSpec(
        name=name, inputs=inputs, outputs=outputs, form=form, module=DecoderStep(lm),
        lowering=lambda: lowerings.traced_with(lm, ops), output_shapes=shapes,
        dynamic={"inputs_embeds": {1: "tokens"}},
        probes=[example(1, 0), example(1, max_context - 1), example(min(17, max_context), 0)],
        limits={"max_context": max_context}, aliases=aliases, keep_fp32=(nn.LayerNorm,),
        fuse_matmuls=form not in lowerings.TENSORRT_FORMS,
    )


class TTSProjection(nn.Module):
    def __init__(self, model: OpenS2S):
        super().__init__()
        self.llm2tts, self.llm_ln = model.llm2tts, model.llm_ln

    def forward(self, llm_hidden: Tensor) -> Tensor:
        return self.llm_ln(self.llm2tts(llm_hidden))


class SpeakerProjection(nn.Module):
    def __init__(self, model: OpenS2S):
        super().__init__()
        self.spk2tts, self.spk_ln = model.tts_lm_model.spk2tts, model.tts_lm_model.spk_ln

    def forward(self, speaker: Tensor) -> Tensor:
        return self.spk_ln(self.spk2tts(speaker))


class AudioGraph(nn.Module):
    def __init__(self, model: OpenS2S):
        super().__init__()
        self.model = model

    def forward(self, input_features: Tensor, feature_length: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.audio_embeddings(input_features, feature_length)


def opens2s_graphs(model: OpenS2S, max_context: int, windows: int, dtype: torch.dtype,
                   form: str = "classic") -> list[GraphSpec]:
    """The OpenS2S graphs; the audio encoder's profile takes up to `windows` windows."""
    d_llm = model.config.llm.hidden_size
    n_mels = model.config.audio.num_mel_bins
    window = model.config.audio.window_frames
    gen = torch.Generator().manual_seed(1)
    audio_inputs = {"input_features": torch.randn(1, n_mels, window, generator=gen).to(dtype),
                    "feature_length": torch.tensor([window * 2 // 5], dtype=torch.int64)}
    audio_probes = [{"input_features": torch.randn(1, n_mels, window, generator=gen).to(dtype),
                     "feature_length": torch.tensor([window], dtype=torch.int64)}]
    if windows > 1:
        audio_probes.append({"input_features": torch.randn(1, n_mels, window * 2, generator=gen).to(dtype),
                             "feature_length": torch.tensor([window + 777], dtype=torch.int64)})
    return [
        GraphSpec("audio_encoder", AudioGraph(model), audio_inputs, ["audio_embeds", "valid_length"],
                  dynamic={"input_features": {2: "frames"}, "audio_embeds": {1: "rows"}},
                  probes=audio_probes, limits={"max_windows": windows, "window_frames": window},
                  keep_fp32=(nn.LayerNorm,)),
        decoder_graph("llm", model.llm_model, max_context, dtype, form),
        decoder_graph("tts_lm", model.tts_lm_model, max_context, dtype, form),
        GraphSpec("tts_projection", TTSProjection(model), {"llm_hidden": torch.randn(1, 4, d_llm, generator=gen)
                                                           .to(dtype)}, ["tts_inputs"],
                  dynamic={"llm_hidden": {1: "rows"}, "tts_inputs": {1: "rows"}},
                  probes=[{"llm_hidden": torch.randn(1, 1, d_llm, generator=gen).to(dtype)}],
                  keep_fp32=(nn.LayerNorm,)),
        GraphSpec("speaker_projection", SpeakerProjection(model),
                  {"speaker": torch.randn(1, 1, SPEAKER_DIM, generator=gen).to(dtype)}, ["speaker_input"],
                  keep_fp32=(nn.LayerNorm,)),
    ]


def token2wav_graphs(decoder: Token2Wav, dtype: torch.dtype) -> list[GraphSpec]:
    spec = decoder.spec
    gen = torch.Generator().manual_seed(2)
    mels, sines = spec.mel_bins, spec.n_sines

    def flow_in(n: int) -> dict[str, Tensor]:
        # The speaker embedding stays fp32: the flow L2-normalizes it with eps 1e-12, which is 0 in fp16,
        # so the runtime's default zero embedding would give 0/0 = NaN (it did, measured).
        return {"tokens": torch.randint(0, spec.vocab_size, (1, n), generator=gen),
                "embedding": torch.randn(1, spec.spk_dim, generator=gen)}

    def est_in(t: int) -> dict[str, Tensor]:
        return {"x": torch.randn(2, mels, t, generator=gen).to(dtype), "mask": torch.ones(2, 1, t).to(dtype),
                "mu": torch.randn(2, mels, t, generator=gen).to(dtype), "t": torch.rand(2, generator=gen).to(dtype),
                "spks": torch.randn(2, mels, generator=gen).to(dtype),
                "cond": torch.randn(2, mels, t, generator=gen).to(dtype)}

    def hift_in(t: int) -> dict[str, Tensor]:
        return {"mel": torch.randn(1, mels, t, generator=gen).to(dtype) - 5.0,
                "phase": torch.rand(1, sines, 1, generator=gen).to(dtype),
                "noise": torch.randn(1, sines, t * spec.hop, generator=gen).to(dtype)}

    return [
        GraphSpec("flow", decoder.flow, flow_in(23), ["mu", "spks"],
                  dynamic={"tokens": {1: "tokens"}, "mu": {2: "frames"}},
                  probes=[flow_in(10), flow_in(57), {**flow_in(12), "embedding": torch.zeros(1, spec.spk_dim)}],
                  keep_fp32=(nn.LayerNorm, nn.GroupNorm), fp32_entry_names=("spk_embed_affine_layer",)),
        GraphSpec("estimator", decoder.estimator, est_in(37), ["velocity"],
                  dynamic={k: {2: "frames"} for k in ("x", "mask", "mu", "cond", "velocity")},
                  probes=[est_in(16), est_in(90)], keep_fp32=(nn.LayerNorm, nn.GroupNorm),
                  fp32_entry=(TimestepEmbedding,)),
        GraphSpec("hift", decoder.hift, hift_in(20), ["wav", "source", "frame_phase"],
                  dynamic={"mel": {2: "frames"}, "noise": {2: "samples"}, "wav": {1: "samples"},
                           "source": {2: "samples"}, "frame_phase": {2: "frames"}},
                  probes=[hift_in(8), hift_in(45), hift_in(400)], fp32_in_bf16=True,
                  circular_outputs=("frame_phase",),
                  # The sine phase turns F0's float32 noise (1e-5 relative, from the F0 convolutions) into phase
                  # times hop x harmonic, summed over frames: over 400 frames the waveform moves ~2e-4, as the
                  # reference's own fp32 noise does (1.8e-4, golden README); 1e-3 is the README's bound.
                  min_tolerance=1e-3),
    ]


GraphFactory = Callable[..., list[GraphSpec]]


# -- reduced precision ---------------------------------------------------------------------------------
def _fp32_island_forward(self: nn.Module, x: Tensor) -> Tensor:
    # Statistics (mean/variance over a row or a group) of fp16 activations overflow or lose the signal:
    # the cause of CosyVoice's NaN/silent fp16 flow. The island computes in fp32 and hands back dtype.
    return type(self).forward(self, x.float()).to(x.dtype)


def fp32_islands(module: nn.Module, keep_fp32: tuple[type, ...]) -> list[nn.Module]:
    """Make every instance of `keep_fp32` in `module` an fp32 island (input cast up, result cast back);
    returns them (`del m.forward` undoes it). Their parameters must be fp32."""
    islands = [m for m in module.modules() if keep_fp32 and isinstance(m, keep_fp32)]
    for m in islands:
        m.forward = types.MethodType(_fp32_island_forward, m)
    return islands


def to_export_dtype(module: nn.Module, dtype: torch.dtype, keep_fp32: tuple[type, ...],
                    fp32_entry: tuple[type, ...] = (), fp32_entry_names: tuple[str, ...] = ()) -> None:
    """Cast `module` in place to `dtype`, keeping instances of `keep_fp32` (normalizations) in fp32
    islands: their parameters stay fp32 and their input is cast up and the result back down. Instances of
    `fp32_entry` also stay fp32 and hand their result on in `dtype`."""
    module.to(dtype)
    if dtype == torch.float32:
        return
    entries = [m for name, m in module.named_modules()
               if (fp32_entry and isinstance(m, fp32_entry)) or name in fp32_entry_names]
    for m in module.modules():
        if isinstance(m, keep_fp32) or any(m is e for e in entries):
            m.float()
    fp32_islands(module, keep_fp32)
    for m in entries:
        m.forward = types.MethodType(lambda self, x, dtype=dtype: type(self).forward(self, x.float()).to(dtype), m)


_SCALAR_TYPE = {"Float": TensorProto.FLOAT, "Half": TensorProto.FLOAT16, "BFloat16": TensorProto.BFLOAT16}


def _scalar_type(value) -> int:
    return _SCALAR_TYPE[value.type().scalarType()]


def _softmax_fp32(g, x, dim, dtype=None):
    # Softmax of fp16/bf16 scores: exp/sum in fp32, so a long row neither overflows nor underflows.
    axis = symbolic_helper._maybe_get_const(dim, "i")
    original = _scalar_type(x)
    y = g.op("Softmax", g.op("Cast", x, to_i=TensorProto.FLOAT), axis_i=axis)
    return g.op("Cast", y, to_i=original)


@symbolic_helper.parse_args("v", "v", "v", "v", "f", "b", "v", "b")
def _sdpa_classic_fp32_softmax(g, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                               enable_gqa=False):
    """scaled_dot_product_attention as the classic lowering (export/lm.py: MatMul + Softmax, scores in fp32)."""
    from .lm import classic_attention_nodes

    if is_causal or enable_gqa:
        raise ValueError("export supports scaled_dot_product_attention with an explicit mask only")
    scale_value = None if symbolic_helper._is_none(scale) else float(symbolic_helper._maybe_get_const(scale, "f"))
    return classic_attention_nodes(g, query, key, value, None if symbolic_helper._is_none(attn_mask) else attn_mask,
                                   scale_value)


@contextlib.contextmanager
def precision_ops(spec: GraphSpec, dtype: torch.dtype) -> Iterator[None]:
    """Symbolic overrides in force while a graph without its own lowering is exported at fp16/bf16: softmax
    and SDPA scores in fp32 (the decoder forms' attention primitives in export/lm.py emit their own ops)."""
    if dtype == torch.float32 or spec.lowering is not None:
        yield
        return
    registered = ["aten::softmax", "aten::scaled_dot_product_attention"]
    torch.onnx.register_custom_op_symbolic("aten::softmax", symbolic_helper.parse_args("v", "i", "none")(_softmax_fp32),
                                           CLASSIC_OPSET)
    torch.onnx.register_custom_op_symbolic("aten::scaled_dot_product_attention", _sdpa_classic_fp32_softmax,
                                           CLASSIC_OPSET)
    try:
        yield
    finally:
        for name in registered:
            torch.onnx.unregister_custom_op_symbolic(name, CLASSIC_OPSET)
