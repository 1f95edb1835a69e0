"""Classic vs modern vs gqa graph forms on the tiny preset: the same numbers, the same greedy tokens as PyTorch
through onnxruntime with in-place cache binding, every graph passing the full ONNX check (and the TensorRT readiness
check in the TensorRT forms), and the cache really updated in place (no copy) in every form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from opens2s_edge.export.checks import check_graph, onnx_check, tensorrt_readiness
from opens2s_edge.export.graphs import decoder_graph
from opens2s_edge.export.pipeline import export_bundle, export_graph
from opens2s_edge.runtime.onnx_backend import OrtDecoder
from opens2s_edge.runtime.ort_gqa import GqaDecoder
from opens2s_edge.training.checkpoint import load_checkpoint

MAX_CONTEXT = 48
FORMS = ("classic", "modern", "gqa")
TENSORRT_FORMS = ("classic", "modern")


@pytest.fixture(scope="module")
def tiny_model(tiny_default: Path):
    return load_checkpoint(tiny_default / "checkpoint")


@pytest.fixture(scope="module")
def decoders(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny LLM's decoder step exported in each form."""
    folder = tmp_path_factory.mktemp("forms")
    lm = tiny_model.llm_model
    lm._ensure_rope(MAX_CONTEXT)
    paths = {}
    for form in FORMS:
        spec = decoder_graph("llm", lm, MAX_CONTEXT, torch.float32, form)
        paths[form] = folder / f"llm_{form}.onnx"
        export_graph(spec, paths[form], torch.float32, spec.module.state_dict().__getitem__)
    return paths


def _session(path: Path, log_severity: int = 3, profile_prefix: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _binding(path: Path):
    """The runtime's binding for the graph's form (what OnnxRuntimeBackend.decoder picks from the manifest)."""
    return GqaDecoder if path.stem.endswith("_gqa") else OrtDecoder


def _decoder(path: Path, lm, log_severity: int = 3) -> OrtDecoder | GqaDecoder:
    return _binding(path)(_session(path, log_severity), lm.model.embed_tokens.weight.detach().numpy())


def test_forms_give_the_same_results(decoders, tiny_model) -> None:
    rng = np.random.default_rng(0)
    lm = tiny_model.llm_model
    a = _decoder(decoders["classic"], lm)
    others = [_decoder(decoders[form], lm) for form in FORMS[1:]]
    for t in (7, 1, 1, 13, 1):
        embeds = rng.standard_normal((t, lm.config.hidden_size)).astype(np.float32)
        out_a = a.run(embeds)
        for b in others:
            out_b = b.run(embeds)
            for name in ("logits", "hidden"):
                np.testing.assert_allclose(out_a[name], out_b[name], rtol=1e-5, atol=1e-5)
    for b in others:
        for name in a.cache_names:
            np.testing.assert_allclose(a.cache[name][:, :, : a.pos], b.cache[name][:, :, : b.pos], rtol=1e-5,
                                       atol=1e-5)


def test_greedy_decode_matches_pytorch_in_both_forms(decoders, tiny_model) -> None:
    lm = tiny_model.llm_model
    prompt = [3, 17, 42, 5, 99, 7]
    steps = 16
    lm.setup_cache(MAX_CONTEXT)
    with torch.no_grad():
        logits, _ = lm(lm.embed(torch.tensor([prompt])), 0, last_only=True)
        want = [int(logits[0, -1].argmax())]
        for i in range(steps - 1):
            logits, _ = lm(lm.embed(torch.tensor([[want[-1]]])), len(prompt) + i, last_only=True)
            want.append(int(logits[0, -1].argmax()))
    for form in FORMS:
        decoder = _decoder(decoders[form], lm)
        got = [int(decoder.run(decoder.embed(prompt))["logits"].argmax())]
        for _ in range(steps - 1):
            got.append(int(decoder.run(decoder.embed([got[-1]]))["logits"].argmax()))
        assert got == want, form


@pytest.mark.parametrize("form", FORMS)
def test_cache_is_updated_in_place(decoders, tiny_model, form: str, capfd) -> None:
    """The present outputs are the past buffers themselves: the rows written are visible in the runtime's own
    arrays, the outputs point at the same memory, and onnxruntime does not fall back to copying the cache (it
    says so for TensorScatter when the buffers differ, which a plain run shows)."""
    lm = tiny_model.llm_model
    decoder = _decoder(decoders[form], lm, log_severity=2)
    name = decoder.cache_names[0]
    before = decoder.cache[name].copy()
    embeds = np.random.default_rng(1).standard_normal((3, lm.config.hidden_size)).astype(np.float32)
    decoder.run(embeds)
    after = decoder.cache[name]
    assert not np.array_equal(after[:, :, :3], before[:, :, :3])  # the new rows landed in our buffer
    np.testing.assert_array_equal(after[:, :, 3:], before[:, :, 3:])  # nothing else was touched
    outputs = decoder.binding.get_outputs()
    names = [o.name for o in decoder.session.get_outputs()]
    bound = {n: v for n, v in zip(names, outputs, strict=True)}
    present = "present_" + name[len("past_"):]
    assert bound[present].data_ptr() == decoder.cache_values[name].data_ptr()
    assert "copying past_cache to present_cache" not in capfd.readouterr().err
    if form == "modern":
        session = _session(decoders[form], log_severity=2)
        feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                                  np.int64 if i.type == "tensor(int64)" else np.float32) for i in session.get_inputs()}
        session.run(None, feeds)
        assert "copying past_cache to present_cache" in capfd.readouterr().err


@pytest.mark.parametrize("form", FORMS)
def test_decode_step_copies_no_cache(decoders, tiny_model, form: str, tmp_path: Path) -> None:
    """onnxruntime's own profile of a decode step: apart from the in-place cache writes, no node produces a
    tensor as large as a layer's cache (a Slice, Concat or Identity of the cache would copy it every token)."""
    lm = tiny_model.llm_model
    session = _session(decoders[form], profile_prefix=tmp_path / "step")
    decoder = _binding(decoders[form])(session, lm.model.embed_tokens.weight.detach().numpy())
    rng = np.random.default_rng(2)
    decoder.run(rng.standard_normal((5, lm.config.hidden_size)).astype(np.float32))
    decoder.run(rng.standard_normal((1, lm.config.hidden_size)).astype(np.float32))
    events = json.loads(Path(session.end_profiling()).read_text())
    cache_bytes = next(iter(decoder.cache.values())).nbytes
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    assert nodes, "the profile recorded no node"
    large = {(e["args"]["op_name"], e["name"]) for e in nodes if int(e["args"].get("output_size", 0)) >= cache_bytes}
    # The ops that write the cache in place (GroupQueryAttention's outputs include the shared buffer).
    writes = {"ScatterElements", "TensorScatter", "GroupQueryAttention"}
    assert {op for op, _ in large} <= writes, sorted(name for op, name in large if op not in writes)


@pytest.fixture(scope="module")
def bundles(tiny_default: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("form_bundles")
    return {form: export_bundle(tiny_default / "checkpoint", tiny_default / "decoder", root / form,
                                max_context=MAX_CONTEXT, form=form, progress=lambda _: None) for form in FORMS}


@pytest.mark.parametrize("form", FORMS)
def test_every_graph_passes_the_checks(bundles, form: str) -> None:
    manifest = json.loads((bundles[form] / "manifest.json").read_text())
    assert manifest["form"] == form
    for name, graph in manifest["graphs"].items():
        path = bundles[form] / graph["file"]
        expected = form if name in ("llm", "tts_lm") else "classic"
        if expected in TENSORRT_FORMS:
            check_graph(path)  # onnx.checker full check + TensorRT readiness, raises with the node and reason
            assert tensorrt_readiness(path) == [] and graph["tensorrt_ready"], name
        else:
            onnx_check(path)
            assert not graph["tensorrt_ready"] and "com.microsoft" in graph["tensorrt_problems"][0], name
        assert graph["form"] == expected, name
        assert graph["opset"] == (24 if expected == "modern" else 17), name
        assert graph["max_deviation"] <= graph["tolerance"] == (1e-3 if name == "hift" else 1e-4), name


def test_bundles_of_both_forms_answer_alike(bundles) -> None:
    from opens2s_edge.runtime.bundle import load_bundle
    from opens2s_edge.runtime.engine import Engine, TurnOptions

    wav = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    done = {}
    for form in FORMS:
        engine = Engine.from_bundle(load_bundle(bundles[form]))
        done[form] = list(engine.turn(wav, TurnOptions(greedy=True, max_text_tokens=6, max_speech_tokens=16)))[-1]
    for form in FORMS[1:]:
        assert done["classic"].text_ids == done[form].text_ids, form
        assert done["classic"].speech_ids == done[form].speech_ids, form


def test_readiness_enforces_the_modern_ops_restrictions(tmp_path: Path) -> None:
    """The support list's restrictions: Attention without past/present, TensorScatter on axis -2 of 4-D caches."""
    import onnx
    from onnx import TensorProto, helper

    def value(name: str, shape: list[int]):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    q = [1, 2, 3, 8]
    attention = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "pk_out", "pv_out"])
    scatter = helper.make_node("TensorScatter", ["cache", "upd", "idx"], ["present"], axis=2)
    graph = helper.make_graph(
        [attention, scatter], "g",
        [value("q", q), value("k", q), value("v", q), value("pk", [1, 2, 5, 8]), value("pv", [1, 2, 5, 8]),
         value("cache", [2, 16, 8]), value("upd", [2, 1, 8]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, [2])],
        [value("y", q), value("pk_out", [1, 2, 8, 8]), value("pv_out", [1, 2, 8, 8]), value("present", [2, 16, 8])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)]), str(path))
    problems = "\n".join(tensorrt_readiness(path))
    assert "past_key/past_value" in problems
    assert "present_key/present_value" in problems
    assert "axis 2 (TensorRT needs -2)" in problems
    assert "is 3-D (TensorRT needs 4-D)" in problems


def test_gqa_binding_matches_the_plain_binding_across_turns(decoders, tiny_model) -> None:
    """GqaDecoder's once-bound buffers (start, the decode row, the result rows) give what a per-step binding of the
    same graph gives, over prefill -> decode -> a new turn's prefill -> decode, and a rollback."""
    lm = tiny_model.llm_model
    table = lm.model.embed_tokens.weight.detach().numpy()
    lean = GqaDecoder(_session(decoders["gqa"]), table)
    plain = OrtDecoder(_session(decoders["gqa"]), table)
    rng = np.random.default_rng(5)
    for step, t in enumerate((6, 1, 1, 0, 9, 1, 1, -1, 1)):
        if t == 0:
            lean.reset(), plain.reset()
            continue
        if t < 0:
            lean.truncate(lean.pos - 2), plain.truncate(plain.pos - 2)
            continue
        x = rng.standard_normal((t, lm.config.hidden_size)).astype(np.float32)
        a, b = lean.run(x), plain.run(x)
        for name in ("logits", "hidden"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"step {step}")
    assert lean.pos == plain.pos == 10


def test_gqa_bundle_runs_on_the_gqa_binding(bundles) -> None:
    """The manifest's form picks the binding: a gqa bundle's decoders are GqaDecoders, the others OrtDecoders."""
    from opens2s_edge.runtime.bundle import load_bundle
    from opens2s_edge.runtime.onnx_backend import OnnxRuntimeBackend

    for form in FORMS:
        bundle = load_bundle(bundles[form], verify=False)
        backend = OnnxRuntimeBackend(bundle)
        want = GqaDecoder if form == "gqa" else OrtDecoder
        assert type(backend.decoder("llm", bundle.array("llm_embed"))) is want
        assert type(backend.decoder("tts_lm", bundle.array("tts_embed"))) is want
