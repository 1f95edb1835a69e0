"""The decoder graphs in both forms against the one PyTorch definition: parity at several lengths, a 32-step
greedy decode through onnxruntime with the cache bound in place, the forms' op sets, TensorRT readiness and the
fp16 deviation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from opens2s_edge.export import lm as lm_forms
from opens2s_edge.export.checks import check_graph, tensorrt_readiness
from opens2s_edge.export.graphs import decoder_graph
from opens2s_edge.export.pipeline import export_graph
from opens2s_edge.runtime.onnx_backend import OrtDecoder, make_session
from opens2s_edge.training.checkpoint import load_checkpoint

MAX_CONTEXT = 64
MODERN_OPS = {"TensorScatter", "Attention", "RMSNormalization", "RotaryEmbedding"}


@pytest.fixture(scope="module", params=["golden", "tiny"])
def model(request, golden_opens2s: Path, tiny_default: Path):
    folder = golden_opens2s if request.param == "golden" else tiny_default / "checkpoint"
    return load_checkpoint(folder)


def _export(lm, form: str, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    lm = lm.to(dtype)
    lm._ensure_rope(MAX_CONTEXT)
    spec = decoder_graph("decoder", lm, MAX_CONTEXT, dtype, form)
    path = folder / f"decoder_{form}_{str(dtype).split('.')[-1]}.onnx"
    state = spec.module.state_dict()
    export_graph(spec, path, dtype, state.__getitem__)
    return path


def _decoder(path: Path, lm) -> OrtDecoder:
    table = lm.model.embed_tokens.weight.detach().float().numpy()
    return OrtDecoder(make_session(path, ["CPUExecutionProvider"]), table)


def _rel(ours: np.ndarray, ref: torch.Tensor) -> float:
    ref_np = ref.float().numpy()
    return float(np.abs(ours - ref_np).max() / max(1e-6, np.abs(ref_np).max()))


@pytest.mark.parametrize("form", lm_forms.FORMS)
def test_parity_and_greedy_decode(model, form: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for lm in (model.llm_model, model.tts_lm_model):
        path = _export(lm, form, tmp_path)
        decoder = _decoder(path, lm)
        lm.setup_cache(MAX_CONTEXT)
        # Several lengths at growing positions: prefill, single steps, a long chunk.
        pos = 0
        for t in (5, 1, 17, 1, 3):
            x = rng.normal(size=(t, lm.config.hidden_size)).astype(np.float32)
            got = decoder.run(x)
            with torch.no_grad():
                logits, hidden = lm(torch.from_numpy(x)[None], pos)
            pos += t
            assert _rel(got["logits"], logits[0, -1]) < 1e-4
            assert _rel(got["hidden"], hidden[0, -1]) < 1e-4
        # A fresh turn reuses the buffers: rows from the previous turn are masked, never read.
        decoder.reset()
        prompt = rng.normal(size=(7, lm.config.hidden_size)).astype(np.float32)
        ours, theirs = [], []
        logits_np = decoder.run(prompt)["logits"]
        with torch.no_grad():
            logits_t, _ = lm(torch.from_numpy(prompt)[None], 0)
            tpos = prompt.shape[0]
            for _ in range(32):
                ours.append(int(np.argmax(logits_np)))
                theirs.append(int(logits_t[0, -1].argmax()))
                logits_np = decoder.run(decoder.embed([ours[-1]]))["logits"]
                logits_t, _ = lm(lm.embed(torch.tensor([[theirs[-1]]])), tpos)
                tpos += 1
        assert ours == theirs
        assert decoder.pos == 7 + 32


def test_cache_is_written_in_place(tiny_default: Path, tmp_path: Path) -> None:
    """The bound buffer is both past and present: after a step its rows start..start+T-1 hold the new K/V and
    the rows before are untouched."""
    lm = load_checkpoint(tiny_default / "checkpoint").llm_model
    for form in lm_forms.FORMS:
        decoder = _decoder(_export(lm, form, tmp_path), lm)
        name = decoder.cache_names[0]
        buffer = decoder.cache[name]
        decoder.run(np.ones((4, lm.config.hidden_size), np.float32))
        snapshot = buffer.copy()
        assert np.abs(snapshot[:, :, :4]).sum() > 0 and not np.abs(snapshot[:, :, 4:]).any()
        decoder.run(np.ones((1, lm.config.hidden_size), np.float32))
        assert np.array_equal(buffer[:, :, :4], snapshot[:, :, :4])
        assert np.abs(buffer[:, :, 4]).sum() > 0 and not np.abs(buffer[:, :, 5:]).any()


def test_forms_use_their_ops_and_are_tensorrt_ready(tiny_default: Path, tmp_path: Path) -> None:
    lm = load_checkpoint(tiny_default / "checkpoint").tts_lm_model
    for form in lm_forms.FORMS:
        path = _export(lm, form, tmp_path)
        ops = set(lm_forms.op_counts(path))
        opset = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}
        assert opset[""] == lm_forms.OPSETS[form]
        if form in lm_forms.TENSORRT_FORMS:
            check_graph(path)
            assert tensorrt_readiness(path) == []
        else:
            # One GroupQueryAttention per layer does the rotary, the cache write and the attention; TensorRT has no
            # parser for it, and the readiness check says so per node.
            assert lm_forms.op_counts(path)["GroupQueryAttention"] == lm.config.num_hidden_layers
            assert opset[lm_forms.MICROSOFT] == 1
            assert not {"ScatterElements", "TensorScatter", "Softmax", "Attention", "RotaryEmbedding"} & ops
            assert all("com.microsoft" in p for p in tensorrt_readiness(path))
        if form == "modern":
            assert MODERN_OPS <= ops
            assert not {"ScatterElements", "Softmax", "ReduceMean"} & ops
        elif form == "classic":
            assert not MODERN_OPS & ops
            assert {"ScatterElements", "Softmax"} <= ops
        model = onnx.load(str(path), load_external_data=False)
        shapes = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
                  for o in model.graph.output}
        c = lm.config
        assert shapes["logits"] == [1, 1, c.vocab_size] and shapes["hidden"] == [1, 1, c.hidden_size]
        assert shapes["present_key_0"] == [1, c.num_key_value_heads, MAX_CONTEXT, c.head_dim]


@pytest.mark.parametrize("form", lm_forms.FORMS)
def test_fp16_deviation_is_measured_and_finite(golden_opens2s: Path, tmp_path: Path, form: str) -> None:
    """fp16 graphs keep RMSNorm statistics and softmax in fp32; against the fp32 PyTorch model the logits stay
    close (measured here, reported by export) and never turn NaN/Inf."""
    model = load_checkpoint(golden_opens2s)
    lm32 = model.llm_model
    lm32.setup_cache(MAX_CONTEXT)
    lm16 = load_checkpoint(golden_opens2s).llm_model
    decoder = _decoder(_export(lm16, form, tmp_path, torch.float16), lm16)
    assert decoder.embed_dtype == np.float16
    rng = np.random.default_rng(1)
    worst, pos = 0.0, 0
    for t in (9, 1, 1, 12):
        x = rng.normal(size=(t, lm32.config.hidden_size)).astype(np.float32)
        got = decoder.run(x.astype(np.float16))
        with torch.no_grad():
            logits, hidden = lm32(torch.from_numpy(x)[None], pos)
        pos += t
        for ours, ref in ((got["logits"], logits[0, -1]), (got["hidden"], hidden[0, -1])):
            assert np.isfinite(ours).all()
            worst = max(worst, _rel(ours, ref))
    assert worst < 2e-2, f"fp16 {form} deviates {worst:.2e} from fp32"


def test_modern_bundle_records_its_forms(golden_root: Path, golden_opens2s: Path, tmp_path: Path) -> None:
    """`export --form modern`: the decoders are modern at opset 24, every other graph stays classic, the manifest
    says so per graph, the bundle loads, and its LLM decodes greedily like PyTorch through the runtime's cache."""
    from opens2s_edge.export.pipeline import export_bundle
    from opens2s_edge.runtime.bundle import load_bundle

    out = export_bundle(golden_opens2s, golden_root / "glm4voice_decoder_tiny", tmp_path / "bundle",
                        max_context=MAX_CONTEXT, form="modern", progress=lambda _: None)
    bundle = load_bundle(out)
    assert bundle.manifest["form"] == "modern"
    for name, graph in bundle.manifest["graphs"].items():
        decoder = name in ("llm", "tts_lm")
        assert (graph["form"], graph["opset"]) == (("modern", 24) if decoder else ("classic", 17)), name
        assert graph["max_deviation"] <= graph["tolerance"] == (1e-3 if name == "hift" else 1e-4), name
    lm = load_checkpoint(golden_opens2s).llm_model
    lm.setup_cache(MAX_CONTEXT)
    decoder = OrtDecoder(make_session(bundle.graph_path("llm"), ["CPUExecutionProvider"]), bundle.array("llm_embed"))
    ids = [1, 5, 9, 2, 7]
    logits = decoder.run(decoder.embed(ids))["logits"]
    with torch.no_grad():
        ref, _ = lm(lm.embed(torch.tensor([ids])), 0)
        for step in range(16):
            token = int(np.argmax(logits))
            assert token == int(ref[0, -1].argmax())
            logits = decoder.run(decoder.embed([token]))["logits"]
            ref, _ = lm(lm.embed(torch.tensor([[token]])), len(ids) + step)
