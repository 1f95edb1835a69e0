"""fp16/bf16 export on the tiny preset: every graph's deviation from the PyTorch fp32 model is measured and
recorded, nothing is NaN/Inf, caches and embeddings follow the dtype, an fp16 bundle answers a turn end to
end, a graph that overflows fails the export; and the export streams weights: while a graph is traced only
its own component holds (placeholder) weights, every other component stays on the meta device."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from opens2s_edge.export.graphs import GraphSpec
from opens2s_edge.export.pipeline import TOLERANCE, ExportError, export_bundle, export_graph, verify_graph

MAX_CONTEXT = 128


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def low_precision_bundle(request, tiny_default: Path, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"bundle_{request.param}") / "bundle"
    export_bundle(tiny_default / "checkpoint", tiny_default / "decoder", out, dtype=request.param,
                  max_context=MAX_CONTEXT, progress=lambda _: None)
    return request.param, out


def test_deviation_is_measured_and_recorded(low_precision_bundle) -> None:
    dtype, bundle = low_precision_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["dtype"] == dtype
    for name, graph in manifest["graphs"].items():
        values = list(graph["deviation"].values())
        assert set(graph["deviation"]) == {o["name"] for o in graph["outputs"]}, name
        assert all(math.isfinite(v) for v in values), name
        assert graph["max_deviation"] == max(values) <= TOLERANCE[dtype], name
        assert "fp32" in graph["deviation_reference"]
        if graph["dtype"] == dtype:
            # Rounded weights and activations show: a zero deviation would mean the graph ran in fp32.
            assert graph["max_deviation"] > 1e-5, name
    # The vocoder's running phase needs fp32; it is exported so in a bf16 bundle and says so.
    assert manifest["graphs"]["hift"]["dtype"] == ("fp32" if dtype == "bf16" else dtype)


def test_caches_and_embeddings_follow_the_dtype(low_precision_bundle) -> None:
    dtype, bundle = low_precision_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    onnx_name = {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    for name in ("llm", "tts_lm"):
        io = {i["name"]: i for i in manifest["graphs"][name]["inputs"]}
        assert io["past_key_0"]["dtype"] == onnx_name
        assert io["inputs_embeds"]["dtype"] == onnx_name
        outputs = {o["name"]: o for o in manifest["graphs"][name]["outputs"]}
        assert outputs["present_value_0"]["dtype"] == onnx_name
    for name in ("llm_embed", "tts_embed"):
        entry = manifest["arrays"][name]
        table = np.load(bundle / entry["file"])
        assert entry["dtype"] == onnx_name
        assert table.dtype == (np.float16 if dtype == "fp16" else np.uint16)  # bf16 bit patterns


def test_fp16_bundle_answers_a_turn(low_precision_bundle) -> None:
    dtype, bundle = low_precision_bundle
    if dtype != "fp16":
        pytest.skip("onnxruntime CPU has no bf16 kernels: bf16 bundles are for GPUs")
    from opens2s_edge.runtime.bundle import load_bundle
    from opens2s_edge.runtime.engine import Engine, TurnOptions

    engine = Engine.from_bundle(load_bundle(bundle))
    wav = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    done = list(engine.turn(wav, TurnOptions(greedy=True, max_text_tokens=6, max_speech_tokens=24)))[-1]
    assert done.text_ids and done.speech_ids
    assert done.audio.size and np.isfinite(done.audio).all()


class _Overflow(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 1e5  # fine in fp32, Inf past fp16's 65504


@pytest.mark.parametrize("dtype", [torch.float16])
def test_non_finite_output_fails_the_export(tmp_path: Path, dtype: torch.dtype) -> None:
    x = torch.ones(1, 4) * 2.0
    spec = GraphSpec("overflow", _Overflow(), {"x": x.to(dtype)}, ["y"])
    path = tmp_path / "overflow.onnx"
    export_graph(spec, path, dtype, {}.__getitem__)
    refs = [[(x * 1e5).numpy()]]
    with pytest.raises(ExportError, match="NaN or Inf"):
        verify_graph(spec, path, refs, TOLERANCE["fp16"], dtype)


def test_export_materializes_one_component_at_a_time(tiny_default: Path, tmp_path: Path) -> None:
    from opens2s_edge.training.opens2s import OpenS2S

    components = {"audio_encoder": ("audio_encoder_model", "audio_adapter"), "llm": ("llm_model",),
                  "tts_lm": ("tts_lm_model",), "tts_projection": ("llm2tts", "llm_ln")}
    seen = []

    def check(spec: GraphSpec, model: OpenS2S) -> None:
        if spec.name not in components:  # token2wav graphs: a separate, small decoder
            return
        seen.append(spec.name)
        own = {id(p) for p in spec.module.parameters()}
        for name, p in model.named_parameters():
            if id(p) in own:
                # Placeholders: the graph is traced on weights that take no memory (one scalar, expanded).
                assert not p.is_meta and p.untyped_storage().nbytes() <= 4, name
            else:
                assert p.is_meta, f"{name} is materialized while {spec.name} is exported"

    export_bundle(tiny_default / "checkpoint", tiny_default / "decoder", tmp_path / "b", max_context=MAX_CONTEXT,
                  progress=lambda _: None, before_export=check)
    assert seen == list(components)


def test_export_and_the_runtime_know_the_same_dtypes() -> None:
    """One table each side of the torch boundary, same names: what export writes, the runtime can load, and the
    host layout of each (bf16 as its uint16 bits) is torch's element size."""
    from opens2s_edge.export.pipeline import DTYPES
    from opens2s_edge.runtime.dtypes import BUNDLE_DTYPES
    from opens2s_edge.training.cuda_backend import DTYPES as CUDA_DTYPES

    assert DTYPES is CUDA_DTYPES and set(DTYPES) == set(BUNDLE_DTYPES)
    for name, dtype in DTYPES.items():
        assert np.dtype(BUNDLE_DTYPES[name][0]).itemsize == torch.empty(0, dtype=dtype).element_size(), name
