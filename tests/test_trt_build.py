"""TensorRT engine build: profiles derived from a real tiny bundle (both forms), the engine-set record and its
refusals, the build command without TensorRT, ModelOpt quantization on onnxruntime CPU, and real engine builds
compared with onnxruntime CPU fp32 where TensorRT and a CUDA GPU exist (skipped elsewhere, with the reason).

The plan files written by the manifest tests are arbitrary bytes: they stand for engine files only as data whose
hashes the bundle must check, never as something TensorRT runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from opens2s_edge.cli import main as cli_main
from opens2s_edge.export.checks import (
    RELEASES,
    UnsupportedTensorRT,
    form_for_tensorrt,
    load_support,
    opset_notes,
    parse_version,
    release_for,
    tensorrt_readiness,
)
from opens2s_edge.export.trt_build import (
    REMOVED_IN_11,
    BuildError,
    RemovedInTensorRT11,
    builder_settings,
    check_precision,
    check_target,
    network_typing,
    plan_build,
    require_ready,
)
from opens2s_edge.export.trt_profiles import ProfileError, derive_profiles, stream_ranges
from opens2s_edge.runtime.bundle import BundleError, load_bundle, sha256_file
from opens2s_edge.runtime.engines import (
    EngineMismatch,
    EngineSet,
    GpuInfo,
    engine_key,
    record_engine_set,
    select_engine_set,
    staging_dir,
)
from opens2s_edge.runtime.token2wav_stream import DecoderSpec, StreamConfig, Token2WavStream

ORIN = GpuInfo("NVIDIA Jetson AGX Orin", "8.7")
RTX = GpuInfo("NVIDIA GeForce RTX 4090", "8.9")


# -- fixtures ------------------------------------------------------------------------------------------
def _rehash(root: Path, manifest: dict) -> None:
    manifest["files"] = {str(p.relative_to(root)): {"sha256": sha256_file(p), "size": p.stat().st_size}
                         for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


@pytest.fixture(scope="module")
def modern_bundle(tiny_bundle: Path, tiny_default: Path, tmp_path_factory) -> Path:
    """The tiny bundle with its two decoder graphs re-exported in the modern form (only the decoders have two
    forms; every other graph is the same in both, export/README.md), manifest entries and hashes as export writes
    them. Cheaper than a second full export."""
    import torch

    from opens2s_edge.export.graphs import decoder_graph
    from opens2s_edge.export.pipeline import _io_spec, export_graph
    from opens2s_edge.training.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("modern") / "bundle"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / "manifest.json").read_text())
    model = load_checkpoint(tiny_default / "checkpoint")
    max_context = manifest["llm"]["max_context"]
    for name, lm in (("llm", model.llm_model), ("tts_lm", model.tts_lm_model)):
        lm._ensure_rope(max_context)
        spec = decoder_graph(name, lm, max_context, torch.float32, "modern")
        path = root / f"{name}.onnx"
        opset = export_graph(spec, path, torch.float32, spec.module.state_dict().__getitem__)
        inputs, outputs = _io_spec(onnx.load(str(path), load_external_data=False))
        manifest["graphs"][name].update(inputs=inputs, outputs=outputs, form="modern", opset=opset)
    manifest["form"] = "modern"
    _rehash(root, manifest)
    return root


@pytest.fixture(params=["classic", "modern"])
def bundle_of_form(request, tiny_bundle: Path) -> Path:
    return tiny_bundle if request.param == "classic" else request.getfixturevalue("modern_bundle")


# -- profiles ------------------------------------------------------------------------------------------
def _onnx_input_shapes(path: Path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def test_profiles_give_every_dynamic_dim_a_consistent_range(bundle_of_form: Path) -> None:
    bundle = load_bundle(bundle_of_form, verify=False)
    manifest = bundle.manifest
    profiles = derive_profiles(manifest)
    assert set(profiles) == set(manifest["graphs"])
    for name, graph in manifest["graphs"].items():
        # the manifest's symbolic shapes are the graph file's own
        assert _onnx_input_shapes(bundle.graph_path(name)) == {i["name"]: i["shape"] for i in graph["inputs"]}, name
        for profile in profiles[name]:
            assert set(profile.shapes) == {i["name"] for i in graph["inputs"]}, (name, profile.name)
            symbol_ranges: dict[str, set] = {}
            for inp in graph["inputs"]:
                lo, opt, hi = profile.shapes[inp["name"]]
                assert len(lo) == len(opt) == len(hi) == len(inp["shape"])
                for axis, dim in enumerate(inp["shape"]):
                    if isinstance(dim, str):
                        assert 1 <= lo[axis] <= opt[axis] <= hi[axis], (name, inp["name"], dim)
                        symbol_ranges.setdefault(dim, set()).add((lo[axis], opt[axis], hi[axis]))
                    else:
                        assert lo[axis] == opt[axis] == hi[axis] == dim, (name, inp["name"], axis)
            # one symbol, one range, in every input that carries it
            assert all(len(r) == 1 for r in symbol_ranges.values()), (name, profile.name, symbol_ranges)


def test_decoder_profiles_prefill_and_one_token_decode(bundle_of_form: Path) -> None:
    manifest = load_bundle(bundle_of_form, verify=False).manifest
    profiles = derive_profiles(manifest)
    for name, cfg in (("llm", manifest["llm"]), ("tts_lm", manifest["tts"])):
        top = manifest["graphs"][name]["limits"]["max_context"]
        assert top == cfg["max_context"]
        prefill, decode = profiles[name]
        assert (prefill.name, decode.name) == ("prefill", "decode")
        lo, _, hi = prefill.shapes["inputs_embeds"]
        assert lo[1] == 1 and hi[1] == top
        assert decode.shapes["inputs_embeds"][0] == decode.shapes["inputs_embeds"][2]  # one shape: CUDA graphs
        assert decode.shapes["inputs_embeds"][0][1] == 1
        cache = [1, cfg["kv_heads"], top, cfg["head_dim"]]
        for profile in (prefill, decode):
            for i in range(cfg["layers"]):
                for kind in ("key", "value"):
                    assert profile.shapes[f"past_{kind}_{i}"] == (cache, cache, cache)
            assert profile.values["start"] == (0, profile.values["start"][1], top - 1)
            assert profile.shapes["start"] == ([], [], [])


def test_token2wav_audio_and_projection_profiles(tiny_bundle: Path) -> None:
    manifest = load_bundle(tiny_bundle, verify=False).manifest
    profiles = derive_profiles(manifest)
    spec = DecoderSpec(**manifest["token2wav"]["spec"])
    stream = StreamConfig()
    est = profiles["estimator"][0]
    for name in ("x", "mu", "cond", "mask", "t", "spks"):
        assert all(shape[0] == 2 for shape in est.shapes[name]), name  # CFG: conditional + unconditional
    frames = [s[2] for s in est.shapes["x"]]
    most = stream.max_window_tokens(spec)
    assert frames == [spec.frames(1), spec.frames(stream.window + stream.chunk), spec.frames(most)]
    flow = profiles["flow"][0].shapes["tokens"]
    assert [s[1] for s in flow] == [1, stream.window + stream.chunk, most]
    hift = profiles["hift"][0].shapes
    assert [s[2] * spec.hop for s in hift["mel"]] == [s[2] for s in hift["noise"]]
    audio = profiles["audio_encoder"][0].shapes["input_features"]
    limits = manifest["graphs"]["audio_encoder"]["limits"]
    assert [s[2] for s in audio] == [limits["window_frames"], limits["window_frames"],
                                     limits["window_frames"] * limits["max_windows"]]
    rows = profiles["tts_projection"][0].shapes["llm_hidden"]
    m = int(manifest["interleave_strategy"].split(":")[0])
    assert [s[1] for s in rows] == [1, m, manifest["llm"]["max_context"]]
    assert profiles["speaker_projection"][0].shapes["speaker"] == ([1, 1, 512],) * 3


class _ShapeRecorder:
    """A token2wav backend that returns zeros of the graphs' contracted shapes and records the shapes asked for:
    the streaming code's real calls, checked against the derived profiles."""

    def __init__(self, spec: DecoderSpec):
        self.spec = spec
        self.flow, self.estimator, self.hift = [], [], []

    def encode(self, tokens, embedding):
        self.flow.append(len(tokens))
        return np.zeros((self.spec.mel_bins, self.spec.frames(len(tokens))), np.float32), np.zeros(80, np.float32)

    def estimate(self, x, mask, mu, t, spks, cond):
        assert x.shape[0] == 2
        self.estimator.append(x.shape[-1])
        return np.zeros_like(x)

    def vocode(self, mel, phase, noise):
        n = mel.shape[1]
        assert noise.shape[1] == n * self.spec.hop
        self.hift.append(n)
        return np.zeros(n * self.spec.hop, np.float32), np.zeros((self.spec.n_sines, n), np.float32)


@pytest.mark.parametrize("stream", [StreamConfig(), StreamConfig(first_chunk=24, chunk=24, window=30)])
def test_streaming_calls_stay_inside_the_profiles(stream: StreamConfig) -> None:
    spec = DecoderSpec()
    ranges = stream_ranges(spec, stream)
    backend = _ShapeRecorder(spec)
    for n in range(1, 100):  # every token count through several chunks, pushed 3 at a time, then flushed
        s = Token2WavStream(backend, stream)
        for i in range(0, n, 3):
            s.push(np.arange(i, min(n, i + 3)) % 100)
        s.finalize()
    for calls, key in ((backend.flow, "flow_tokens"), (backend.estimator, "estimator_frames"),
                       (backend.hift, "hift_frames")):
        lo, _, hi = ranges[key]
        assert lo <= min(calls) and max(calls) <= hi, (key, min(calls), max(calls), ranges[key])


def test_a_dynamic_graph_without_a_rule_is_refused(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["graphs"]["new_graph"] = {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, "steps"]}]}
    with pytest.raises(ProfileError, match="new_graph.*steps.*no profile rule"):
        derive_profiles(manifest)


# -- engine sets in the manifest -----------------------------------------------------------------------
def test_engine_key_and_gpu_slug() -> None:
    assert ORIN.slug == "nvidia-jetson-agx-orin-sm87"
    assert engine_key(ORIN, "10.3.0", "fp16") == "nvidia-jetson-agx-orin-sm87-trt10.3.0-fp16"
    assert engine_key(RTX, "10.15.1", "int4-weight") == "nvidia-geforce-rtx-4090-sm89-trt10.15.1-int4-weight"
    with pytest.raises(ValueError, match="compute capability"):
        GpuInfo("x", "8").slug  # noqa: B018


def _fake_set(bundle: Path, gpu: GpuInfo, trt: str, precision: str, payload: bytes) -> EngineSet:
    """An engine set whose plan files are arbitrary bytes (data for the hash checks, not engines)."""
    key = engine_key(gpu, trt, precision)
    staged = staging_dir(bundle, key)
    graphs = {}
    for name in ("llm", "flow"):
        (staged / f"{name}.plan").write_bytes(payload + name.encode())
        graphs[name] = {"file": f"{name}.plan", "profiles": [{"name": "default", "shapes": {}}]}
    entry = {"gpu": gpu.to_json(), "tensorrt": trt, "precision": precision, "form": "classic", "graphs": graphs}
    return record_engine_set(bundle, key, entry, staged)


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_recorded_engine_set_is_verified_and_replaced(bundle_copy: Path) -> None:
    first = _fake_set(bundle_copy, ORIN, "10.3.0", "fp16", b"first")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    entry = manifest["engines"][first.key]
    assert entry["dir"] == f"engines/{first.key}"
    assert entry["graphs"]["llm"]["file"] == f"engines/{first.key}/llm.plan"
    assert entry["gpu"] == {"name": ORIN.name, "compute_capability": "8.7"} and entry["built"]
    assert f"engines/{first.key}/llm.plan" in manifest["files"]
    assert not [p for p in (bundle_copy / "engines").iterdir() if p.name.startswith(".")]  # no staging left
    loaded = load_bundle(bundle_copy)  # every plan file hashed and checked
    chosen = select_engine_set(loaded, ORIN, "10.3.0")
    assert chosen.key == first.key and chosen.graph_path("llm").read_bytes() == b"firstllm"
    assert chosen.profiles("flow") == [{"name": "default", "shapes": {}}]
    with pytest.raises(EngineMismatch, match="no engine for graph 'hift'.*--graphs hift"):
        chosen.graph_path("hift")
    # the same key again replaces the set: new bytes, new hashes, the old files gone
    second = _fake_set(bundle_copy, ORIN, "10.3.0", "fp16", b"second")
    assert second.graph_path("llm").read_bytes() == b"secondllm"
    assert sorted(p.name for p in (bundle_copy / "engines").iterdir()) == [first.key]
    load_bundle(bundle_copy)
    # a changed plan file is refused like any other bundle file
    plan = second.graph_path("flow")
    plan.write_bytes(plan.read_bytes()[:-1] + b"X")
    with pytest.raises(BundleError, match=f"engines/{second.key}/flow.plan does not match its sha256"):
        load_bundle(bundle_copy)


def test_select_engine_set_explains_every_mismatch(bundle_copy: Path) -> None:
    with pytest.raises(EngineMismatch, match=r"has no TensorRT engines; build them with: opens2s-edge build .* "
                                             r"--precision fp16"):
        select_engine_set(load_bundle(bundle_copy, verify=False), ORIN, "10.3.0")
    _fake_set(bundle_copy, ORIN, "10.3.0", "fp16", b"a")
    _fake_set(bundle_copy, ORIN, "10.3.0", "int8", b"b")
    bundle = load_bundle(bundle_copy, verify=False)
    assert select_engine_set(bundle, ORIN, "10.3.0").precision == "fp16"  # preferred when several fit
    assert select_engine_set(bundle, ORIN, "10.3.0", "int8").precision == "int8"
    with pytest.raises(EngineMismatch) as other_gpu:
        select_engine_set(bundle, RTX, "10.3.0")
    text = str(other_gpu.value)
    assert "built for another GPU (NVIDIA Jetson AGX Orin, this is NVIDIA GeForce RTX 4090)" in text
    assert "built for compute capability 8.7, this GPU has 8.9" in text
    assert text.count("nvidia-jetson-agx-orin-sm87-trt10.3.0-") == 2  # each set, with its reasons
    with pytest.raises(EngineMismatch, match=r"built with TensorRT 10\.3\.0, this is TensorRT 10\.4\.0: a plan file is "
                                             r"only valid for the TensorRT version and GPU it was built with"):
        select_engine_set(bundle, ORIN, "10.4.0")
    with pytest.raises(EngineMismatch, match="precision fp16, bf16 was asked for"):
        select_engine_set(bundle, ORIN, "10.3.0", "bf16")


# -- build checks without TensorRT ---------------------------------------------------------------------
def test_precision_must_match_the_bundle_dtype(tiny_bundle: Path) -> None:
    manifest = load_bundle(tiny_bundle, verify=False).manifest
    check_precision(manifest, tiny_bundle, "fp32")
    check_precision(manifest, tiny_bundle, "int8")  # quantized from whatever the bundle holds
    with pytest.raises(BuildError, match=r"--precision fp16 needs a bundle exported with --dtype fp16, but .* is fp32"
                                         r"(.|\n)*opens2s-edge export --checkpoint .* --dtype fp16 --form classic"):
        check_precision(manifest, tiny_bundle, "fp16")


def test_target_checks() -> None:
    classic, modern = {"llm": "classic"}, {"llm": "modern", "flow": "classic"}
    assert check_target("auto", classic, "fp16", ORIN, "10.3.0") == "orin"
    assert check_target("auto", modern, "fp16", RTX, "10.15.1") == "rtx"
    assert check_target("auto", classic, "fp16", None, None) == "unknown"
    assert check_target("orin", modern, "fp16", ORIN, "10.15.1") == "orin"  # JetPack 7
    with pytest.raises(BuildError, match=r"--target orin: graphs llm use the modern form, but JetPack 6\.2 ships "
                                         r"TensorRT 10\.3.*re-export with --form classic"):
        check_target("orin", modern, "fp16", None, None)
    for target in ("auto", "orin", "rtx"):
        gpu = ORIN if target == "orin" else RTX
        with pytest.raises(BuildError, match=r"TensorRT 10\.3\.0 cannot parse: it needs TensorRT >= 10\.15"):
            check_target(target, modern, "fp16", gpu, "10.3.0")
    with pytest.raises(BuildError, match="runs only on the GPU it is built on"):
        check_target("orin", classic, "fp16", RTX, "10.15.1")
    with pytest.raises(BuildError, match=r"fp8 needs FP8 tensor cores .* Jetson Orin is 8\.7"):
        check_target("orin", classic, "fp8", None, None)
    with pytest.raises(BuildError, match=r"fp8 .* NVIDIA GeForce RTX 3090 is compute capability 8\.6"):
        check_target("auto", classic, "fp8", GpuInfo("NVIDIA GeForce RTX 3090", "8.6"), "10.15.1")


def test_network_typing() -> None:
    for precision in ("fp32", "fp16", "bf16", "fp8", "int8", "int4-weight"):
        assert network_typing(precision) == (True, [])
    assert network_typing("int8", weakly_typed=True, bundle_dtype="fp16") == (False, ["INT8", "FP16"])
    with pytest.raises(BuildError, match="only for int8/fp8"):
        network_typing("fp16", weakly_typed=True)


def test_network_typing_per_tensorrt_version() -> None:
    """10.x: strongly typed through the creation flag, weak typing (int8/fp8) with its precision flags on request;
    11: strongly typed by default and no precision flag ever, `--weakly-typed` refused with what to do."""
    assert builder_settings("10.3.0.30", "fp16").creation_flags == ("STRONGLY_TYPED",)
    assert builder_settings("10.16.0", "int4-weight").set_flags == ()
    weak = builder_settings("10.3.0", "int8", weakly_typed=True, bundle_dtype="fp16")
    assert (weak.strongly_typed, weak.creation_flags, weak.set_flags) == (False, (), ("INT8", "FP16"))
    assert builder_settings("10.15.1", "fp32", fp32=True).clear_flags == ("TF32",)
    for precision in ("fp32", "fp16", "bf16", "fp8", "int8", "int4-weight"):
        settings = builder_settings("11.4.1", precision, bundle_dtype="fp16", fp32=precision == "fp32")
        assert settings.strongly_typed and settings.creation_flags == ()  # strongly typed is 11's only mode
        assert not set(settings.set_flags) & set(REMOVED_IN_11)
    for version in ("11.0.0", "11.4.1.2"):
        with pytest.raises(RemovedInTensorRT11, match=rf"TensorRT {version} no longer has.*strongly typed networks "
                                                      r"only.*Build without --weakly-typed"):
            network_typing("int8", weakly_typed=True, trt_version=version)
    assert network_typing("fp8", weakly_typed=True, bundle_dtype="bf16", trt_version="10.16.0") == (False,
                                                                                                   ["FP8", "BF16"])


def test_tensorrt_releases_and_their_lists() -> None:
    assert parse_version("10.3.0.30") == (10, 3, 0, 30) and parse_version("10.16.0.post1") == (10, 16, 0)
    for version, name in (("10.3.0", "10.3"), ("10.0.1", "10.3"), ("10.14.1", "10.3"), ("10.15.1", "10.15"),
                          ("10.16.0", "10.15"), ("11.0.0", "11"), ("11.4.1", "11"), (None, "10.15")):
        assert release_for(version).name == name, version
    assert (form_for_tensorrt("10.3"), form_for_tensorrt("10.16"), form_for_tensorrt("11.4.1")) == (
        "classic", "modern", "modern")
    with pytest.raises(UnsupportedTensorRT, match="TensorRT 8.6.1 predates TensorRT 10"):
        release_for("8.6.1")
    with pytest.raises(UnsupportedTensorRT, match="not a TensorRT version"):
        release_for("latest")
    lists = {name: load_support(r.tsv) for name, r in RELEASES.items()}
    modern_ops = ("Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter")
    classic_ops = ("ScatterElements", "MatMul", "Softmax", "Where", "ReduceMean", "Sqrt", "Gather", "Concat")
    for op in modern_ops:
        assert op not in lists["10.3"] or not lists["10.3"][op].supported, op
        assert lists["10.15"][op].supported and lists["11"][op].supported, op
    for name, table in lists.items():
        assert all(table[op].supported for op in classic_ops), name
        assert "zero" in table["DequantizeLinear"].restrictions and "UINT4" not in table["DequantizeLinear"].types
    assert "FP4" not in lists["10.3"]["DequantizeLinear"].types and "FP4" in lists["10.15"]["DequantizeLinear"].types
    assert lists["11"]["Swish"].supported and "Swish" not in lists["10.15"]
    assert "axes must be an initializer" in lists["10.3"]["Pad"].restrictions and not lists["10.15"]["Pad"].restrictions
    assert RELEASES["11"].weak_typing is False and RELEASES["10.3"].opsets == (9, 20)


def test_readiness_of_each_form_on_each_release(tiny_bundle: Path, modern_bundle: Path) -> None:
    """The graphs the project exports: the classic form parses on 10.3, 10.15/10.16 and 11; the modern decoders only
    from 10.15, and on 10.3 every modern op is named with its node."""
    classic, modern = load_bundle(tiny_bundle, verify=False), load_bundle(modern_bundle, verify=False)
    for release in RELEASES.values():
        for name in classic.manifest["graphs"]:
            assert tensorrt_readiness(classic.graph_path(name), release=release) == [], (release.name, name)
            assert opset_notes(classic.graph_path(name), release) == []
        for name in ("llm", "tts_lm"):
            problems = tensorrt_readiness(modern.graph_path(name), release=release)
            if release.modern_form:
                assert problems == [], (release.name, name)
            else:
                text = "\n".join(problems)
                for op in ("Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"):
                    assert f"({op}): {op} is not supported by TensorRT's ONNX parser" in text, (name, op)
                assert opset_notes(modern.graph_path(name), release) == [
                    "opset 24 is outside the range TensorRT 10.3 documents (9..20); its parser reads the graph op by "
                    "op"]


def test_10_3_restrictions_the_later_lists_lifted(tmp_path: Path) -> None:
    """Pad with computed axes: 10.3 needs them as an initializer (tensor axes came in 10.4); 10.15 takes them."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["rank_shape"], start=0, end=1),
         helper.make_node("Sub", ["rank_shape", "one"], ["axes"]),
         helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], name="pad")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("pads", TensorProto.INT64, [2], [1, 1]), helper.make_tensor("one", TensorProto.INT64, [1],
                                                                                     [1])])
    path = tmp_path / "pad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    assert tensorrt_readiness(path, release="10.3.0") == [
        "node 'pad' (Pad): input 'axes' (axes) must be an initializer or a Constant (axes must be an initializer)"]
    assert tensorrt_readiness(path, release="10.16.0") == [] == tensorrt_readiness(path, release="11.4.1")


def test_plan_checks_against_the_tensorrt_it_is_for(tiny_bundle: Path, modern_bundle: Path) -> None:
    plan = plan_build(tiny_bundle, "fp32", trt_version="10.3.0.30", verify=False)
    assert (plan.release.name, plan.tensorrt) == ("10.3", "10.3.0.30") and not any(plan.readiness.values())
    assert "checked against TensorRT 10.3.0.30: the 10.3 ONNX support list" in "\n".join(plan.lines())
    orin = plan_build(tiny_bundle, "fp32", target="orin", verify=False)  # no TensorRT here: JetPack 6.2 assumed
    assert (orin.release.name, orin.tensorrt) == ("10.3", "10.3")
    eleven = plan_build(modern_bundle, "fp32", trt_version="11.4.1", verify=False)
    assert eleven.release.name == "11" and "strongly typed networks only" in "\n".join(eleven.lines())
    assert not any(eleven.readiness.values())
    with pytest.raises(BuildError, match=r"TensorRT 10\.3\.0 cannot parse.*re-export with --form classic"):
        plan_build(modern_bundle, "fp32", trt_version="10.3.0", verify=False)
    with pytest.raises(BuildError, match="predates TensorRT 10"):
        plan_build(tiny_bundle, "fp32", trt_version="8.6.1", verify=False)


def test_build_dry_run_for_another_tensorrt(tiny_bundle: Path, modern_bundle: Path, capsys) -> None:
    base = ["build", "--precision", "fp32", "--dry-run", "--no-verify"]
    assert cli_main([*base, str(tiny_bundle), "--tensorrt-version", "10.3"]) == 0
    out = capsys.readouterr().out
    assert "checked against TensorRT 10.3: the 10.3 ONNX support list" in out and "llm: ready" in out
    assert cli_main([*base, str(modern_bundle), "--tensorrt-version", "10.3"]) == 2
    assert "re-export with --form classic" in capsys.readouterr().err
    assert cli_main([*base, str(modern_bundle), "--tensorrt-version", "10.16"]) == 0
    assert cli_main(["build", str(tiny_bundle), "--precision", "int8", "--dry-run", "--no-verify",
                     "--tensorrt-version", "11.4", "--weakly-typed"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT 11.4 no longer has" in err and "Build without --weakly-typed" in err
    assert cli_main([*base, str(tiny_bundle), "--tensorrt-version", "8.6"]) == 2
    assert "predates TensorRT 10" in capsys.readouterr().err
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert cli_main(["build", str(tiny_bundle), "--precision", "fp32", "--no-verify",
                         "--tensorrt-version", "10.3"]) == 2
        assert "only checks (--dry-run)" in capsys.readouterr().err


def test_export_form_for_a_tensorrt_version(tiny_default: Path, tmp_path: Path, capsys) -> None:
    """`export --form trt10.3` writes the classic form and checks every graph against 10.3's list."""
    args = ["export", "--checkpoint", str(tiny_default / "checkpoint"), "--decoder", str(tiny_default / "decoder"),
            "--max-context", "32", "--max-audio-seconds", "2"]
    assert cli_main([*args, "--out", str(tmp_path / "old"), "--form", "trt8.6"]) == 2
    assert "predates TensorRT 10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*args, "--out", str(tmp_path / "x"), "--form", "tensorrt"])
    assert "is not classic, modern or trtX.Y" in capsys.readouterr().err
    assert cli_main([*args, "--out", str(tmp_path / "jetpack6"), "--form", "trt10.3"]) == 0
    out = capsys.readouterr().out
    assert "--form trt10.3: the classic form" in out and "every graph is ready for TensorRT 10.3" in out
    manifest = load_bundle(tmp_path / "jetpack6").manifest
    assert manifest["form"] == "classic" and {g["form"] for g in manifest["graphs"].values()} == {"classic"}


def test_readiness_failure_names_the_node(tiny_bundle: Path, tmp_path: Path) -> None:
    from opens2s_edge.export.checks import DEFAULT_TSV

    tsv = tmp_path / "ops.tsv"
    tsv.write_text("\n".join(line.replace("Softmax\tY", "Softmax\tN") if line.startswith("Softmax\t") else line
                             for line in DEFAULT_TSV.read_text().splitlines()))
    plan = plan_build(tiny_bundle, "fp32", graphs=["llm"], tsv=tsv, verify=False)
    with pytest.raises(BuildError, match=r"not TensorRT-ready(.|\n)*llm: node .*\(Softmax\): Softmax is not supported"):
        require_ready(plan)


def test_build_dry_run(tiny_bundle: Path, capsys) -> None:
    assert cli_main(["build", str(tiny_bundle), "--precision", "fp32", "--dry-run", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "llm [prefill]: inputs_embeds 1x1x64..1x512x64 (opt 1x128x64)" in out
    assert "llm [decode]: inputs_embeds 1x1x64 (fixed)" in out
    assert "estimator [default]: x 2x80x6..2x80x337" in out
    assert "hift: ready" in out and "dry run: nothing built" in out


def test_build_without_tensorrt_says_how_to_install(tiny_bundle: Path, capsys) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is importable here: the missing-TensorRT path cannot be exercised")
    assert cli_main(["build", str(tiny_bundle), "--precision", "fp32", "--no-verify"]) == 2
    captured = capsys.readouterr()
    assert "tts_lm [decode]" in captured.out  # the bundle was checked and the profiles printed first
    assert "TensorRT's Python package is not importable" in captured.err
    assert "JetPack" in captured.err and "https://pypi.nvidia.com" in captured.err
    assert not (tiny_bundle / "engines").exists()
    assert cli_main(["build", str(tiny_bundle), "--precision", "fp16", "--dry-run", "--no-verify"]) == 2
    assert "needs a bundle exported with --dtype fp16" in capsys.readouterr().err


# -- ModelOpt quantization -----------------------------------------------------------------------------
def _rel_dev(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float32) - ref.astype(np.float32)).max()) / max(1.0, float(np.abs(ref).max()))


def test_int8_quantization_runs_on_onnxruntime_cpu(bundle_copy: Path, tmp_path: Path) -> None:
    """ModelOpt int8 on the tiny LLM graph, calibrated on a real turn: Q/DQ inserted, the graph contract kept, the
    bundle untouched, and on onnxruntime CPU within 0.5 of fp32 (relative to max(1, |fp32|); the tiny preset's
    random weights make per-tensor int8 coarse: ~0.1-0.2 measured) with every float output's cosine >= 0.95."""
    pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is not installed (extra `quantize`)")
    import onnxruntime as ort

    from opens2s_edge.export.quantize import (
        _reader,
        collect_calibration,
        load_calibration,
        quantize_graph,
        save_calibration,
    )

    bundle = load_bundle(bundle_copy)
    samples = collect_calibration(bundle, ["llm"], max_text_tokens=8, max_speech_tokens=8)
    npz = save_calibration(tmp_path / "calibration.npz", samples)
    samples = load_calibration(npz)
    (sample,) = samples["llm"]
    assert sample["inputs_embeds"].shape[1] > 20 and int(sample["start"]) == 0  # prompt + audio + generated text
    inputs = {i["name"]: i for i in bundle.graph("llm")["inputs"]}
    out = quantize_graph(bundle.graph_path("llm"), tmp_path / "q" / "llm.onnx", "int8", samples["llm"], inputs, "fp32")
    load_bundle(bundle_copy)  # ModelOpt worked on a copy: the bundle's files are unchanged
    ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    for release in RELEASES.values():  # the Q/DQ graph is what `build` hands to TensorRT's parser
        assert tensorrt_readiness(out, release=release) == [], release.name
    assert opset_notes(out, "10.3") == []  # ModelOpt's int8 graphs are opset 19, inside 10.3's range
    from opens2s_edge.export.quantize import fold_zero_points

    assert fold_zero_points(out) == 0  # ModelOpt quantizes symmetrically: nothing to fold
    feeds = _reader(samples["llm"], inputs).get_first()
    prefix = {**feeds, "inputs_embeds": feeds["inputs_embeds"][:, :13]}  # another length than calibrated
    for f in (feeds, prefix):
        ref = ort.InferenceSession(str(bundle.graph_path("llm"))).run(None, f)
        got = ort.InferenceSession(str(out)).run(None, f)
        for a, b in zip(ref, got, strict=True):
            assert np.isfinite(b).all()
            assert _rel_dev(a, b) < 0.5
            cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
            assert cos >= 0.95 or np.abs(a).max() == 0


@pytest.fixture(scope="module")
def asymmetric_int4(tiny_bundle: Path, tmp_path_factory) -> Path:
    """The tiny bundle's LLM graph with onnxruntime's own int4 weight-only quantization in QDQ form, asymmetric
    (UINT4 weights and zero points, blocks of 32): what DequantizeLinear in TensorRT does not take. The graph is
    raised to opset 21 first (blocked DequantizeLinear)."""
    pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer", reason="onnxruntime without its quantizer")
    import logging

    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    root = tmp_path_factory.mktemp("asymmetric")
    model = version_converter.convert_version(onnx.load(str(tiny_bundle / "llm.onnx")), 21)
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, quant_format=QuantFormat.QDQ)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    level = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").level
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(level)
    path = root / "asym.onnx"
    onnx.save(quantizer.model.model, str(path), save_as_external_data=True, location="asym.onnx.data")
    return path


def _dequantized_weights(path: Path) -> dict[str, np.ndarray]:
    """Every DequantizeLinear of a constant, computed in float64 with numpy from the ONNX spec (per axis / blocked),
    keyed by the node's output (the MatMul's weight input); plus the scale broadcast to the weight's shape."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        x = inits[node.input[0]].astype(np.float64)
        attrs = {a.name: a.i for a in node.attribute}
        axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
        zero = _spread(inits[node.input[2]], x.shape, axis, block) if len(node.input) > 2 and node.input[2] else 0.0
        scale = _spread(inits[node.input[1]], x.shape, axis, block)
        out[node.output[0]] = ((x - zero) * scale, scale)
    return out


def _spread(a: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """A scale or zero point over the whole weight: per tensor, per axis, or per block along `axis`."""
    a = np.asarray(a, np.float64)
    if a.ndim == 0:
        return np.broadcast_to(a, shape)
    if block:
        return np.repeat(a, block, axis=axis)[tuple(slice(0, n) for n in shape)]
    view = [1] * len(shape)
    view[axis] = -1
    return np.broadcast_to(a.reshape(view), shape)


def _llm_feeds(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path), load_external_data=False)
    rng = np.random.default_rng(0)
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value or 7 for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = (np.array(3, np.int64) if i.name == "start" else
                         rng.standard_normal(shape).astype(np.float32) * (i.name == "inputs_embeds"))
    return feeds


def test_asymmetric_weights_fold_to_symmetric(asymmetric_int4: Path, tmp_path: Path) -> None:
    """onnxruntime's asymmetric int4 weights: refused by every release's check (UINT4, nonzero zero points); folded,
    ready everywhere. Requantized at 4 bits, every weight within half a new step of the asymmetric one (float64
    oracle from the ONNX spec); widened to INT8, exactly the asymmetric weights, so onnxruntime computes the same."""
    import onnxruntime as ort

    from opens2s_edge.export.quantize import fold_zero_points

    asym = asymmetric_int4
    for release in RELEASES.values():
        problems = "\n".join(tensorrt_readiness(asym, release=release))
        assert "is UINT4, TensorRT allows" in problems and "quantized asymmetrically" in problems, release.name
    before = _dequantized_weights(asym)
    requantized, widened = tmp_path / "q4" / "llm.onnx", tmp_path / "q8" / "llm.onnx"
    assert fold_zero_points(asym, requantized) == len(before) == 15  # 7 projections x 2 layers + the head
    assert fold_zero_points(asym, widened, widen=True) == 15
    for path in (requantized, widened):
        for release in RELEASES.values():
            assert tensorrt_readiness(path, release=release) == [], (path.parent.name, release.name)
        assert fold_zero_points(path) == 0  # already symmetric
    after4, after8 = _dequantized_weights(requantized), _dequantized_weights(widened)
    for name, (w, _) in before.items():
        w4, step = after4[name]
        assert (np.abs(w4 - w) <= step / 2 + 1e-7 * np.abs(w).max()).all(), name
        np.testing.assert_array_equal(after8[name][0], w)
    types = {t.name: t.data_type for t in onnx.load(str(requantized), load_external_data=False).graph.initializer}
    assert {types[n.input[0]] for n in onnx.load(str(requantized), load_external_data=False).graph.node
            if n.op_type == "DequantizeLinear"} == {onnx.TensorProto.INT4}
    feeds = _llm_feeds(asym)
    want = ort.InferenceSession(str(asym)).run(None, feeds)
    got = ort.InferenceSession(str(widened)).run(None, feeds)
    for a, b in zip(want, got, strict=True):
        assert _rel_dev(a, b) <= 1e-5


# -- real TensorRT builds ------------------------------------------------------------------------------
def _tensorrt_and_gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT's Python package is not installed (JetPack or "
                                                  "pypi.nvidia.com): real engine builds need it")
    from opens2s_edge.runtime.engines import detect_gpu

    gpu = detect_gpu()
    if gpu is None:
        pytest.skip("no CUDA GPU found (cuda-python / nvidia-smi): real engine builds need one")
    pytest.importorskip("cuda", reason="cuda-python is not installed: the engine runner needs it")
    return trt, gpu


class _Runner:
    """Runs one plan on host arrays with cuda-python device buffers (a test helper, one call per run)."""

    def __init__(self, trt, plan: Path):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        self.trt, self.cudart = trt, cudart
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        assert self.engine is not None

    def _ok(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        assert int(err) == 0, err
        return rest[0] if rest else None

    def run(self, feeds: dict[str, np.ndarray], profile: int = 0) -> dict[str, np.ndarray]:
        trt, cudart = self.trt, self.cudart
        ctx = self.engine.create_execution_context()
        stream = self._ok(cudart.cudaStreamCreate())
        handle = int(stream)  # TensorRT takes the raw cudaStream_t value
        ctx.set_optimization_profile_async(profile, handle)
        buffers, outputs = [], {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        for name in names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                arr = np.ascontiguousarray(feeds[name], trt.nptype(self.engine.get_tensor_dtype(name)))
                ctx.set_input_shape(name, arr.shape)
                ptr = self._ok(cudart.cudaMalloc(max(arr.nbytes, 1)))
                self._ok(cudart.cudaMemcpy(ptr, arr.ctypes.data, arr.nbytes,
                                           cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
                ctx.set_tensor_address(name, ptr)
                buffers.append(ptr)
        for name in names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                arr = np.empty(tuple(ctx.get_tensor_shape(name)), trt.nptype(self.engine.get_tensor_dtype(name)))
                ptr = self._ok(cudart.cudaMalloc(max(arr.nbytes, 1)))
                ctx.set_tensor_address(name, ptr)
                buffers.append(ptr)
                outputs[name] = (arr, ptr)
        assert ctx.execute_async_v3(handle)
        self._ok(cudart.cudaStreamSynchronize(stream))
        result = {}
        for name, (arr, ptr) in outputs.items():
            self._ok(cudart.cudaMemcpy(arr.ctypes.data, ptr, arr.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
            result[name] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
        for ptr in buffers:
            self._ok(cudart.cudaFree(ptr))
        self._ok(cudart.cudaStreamDestroy(stream))
        return result


def _feeds(graph: dict, shapes: dict[str, list[int]], rng, vocab: int, start: int = 0) -> dict[str, np.ndarray]:
    """Plausible inputs for a graph at the given shapes (float32; the runners cast to each graph's dtype)."""
    feeds = {}
    for inp in graph["inputs"]:
        name, shape = inp["name"], shapes[inp["name"]]
        if name == "start":
            feeds[name] = np.array(start, np.int64)
        elif name == "tokens":
            feeds[name] = rng.integers(0, vocab, shape).astype(np.int64)
        elif name == "feature_length":
            feeds[name] = np.array([shapes["input_features"][2] - 123], np.int64)
        elif name == "mask":
            feeds[name] = np.ones(shape, np.float32)
        elif name in ("t", "phase"):
            feeds[name] = rng.random(shape).astype(np.float32)
        elif name.startswith("past_"):
            feeds[name] = np.zeros(shape, np.float32)
        else:
            feeds[name] = (rng.standard_normal(shape) * (0.5 if name != "mel" else 1.0) - (5 if name == "mel" else 0)
                           ).astype(np.float32)
    return feeds


def _compare_engines(trt, engines: EngineSet, reference_bundle: Path, tolerance: float) -> None:
    import onnxruntime as ort

    ref = load_bundle(reference_bundle, verify=False)
    rng = np.random.default_rng(0)
    vocab = ref.manifest["token2wav"]["spec"]["vocab_size"]
    for name in engines.graphs:
        graph = ref.graph(name)
        session = ort.InferenceSession(str(ref.graph_path(name)), providers=["CPUExecutionProvider"])
        runner = _Runner(trt, engines.graph_path(name))
        for index, profile in enumerate(engines.profiles(name)):
            for pick in (1, 2):  # opt and max shapes of the profile
                shapes = {k: v[pick] for k, v in profile["shapes"].items()}
                feeds = _feeds(graph, shapes, rng, vocab, start=3 if profile["name"] == "decode" else 0)
                want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
                got = runner.run(feeds, index)
                for out, w in want.items():
                    g = got[out]
                    assert g.shape == w.shape, (name, out)
                    assert np.isfinite(g).all(), (name, out)
                    if w.dtype.kind == "f":
                        assert _rel_dev(w, g) <= tolerance, (name, profile["name"], out, _rel_dev(w, g))
                    else:
                        assert np.array_equal(w, g), (name, out)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_engines_match_onnxruntime_fp32(precision: str, tiny_bundle: Path, tiny_default: Path,
                                             tmp_path: Path) -> None:
    """Engines built by TensorRT for every graph of the tiny bundle, run on the GPU at each profile's opt and max
    shapes, against onnxruntime CPU on the fp32 bundle: fp32 engines (TF32 off) within 1e-3, fp16 engines (from an
    fp16 export, strongly typed with its fp32 islands) within 5e-2 (the export's own fp16 tolerance), relative to
    max(1, |fp32|); no NaN or Inf."""
    trt, gpu = _tensorrt_and_gpu()
    from opens2s_edge.export.trt_build import build_engines

    if precision == "fp32":
        bundle = tmp_path / "bundle"
        shutil.copytree(tiny_bundle, bundle)
    else:
        from opens2s_edge.export.pipeline import export_bundle

        bundle = export_bundle(tiny_default / "checkpoint", tiny_default / "decoder", tmp_path / "bundle",
                               dtype="fp16", max_context=512, progress=lambda _: None)
    plan = plan_build(bundle, precision, "auto", gpu=gpu, trt_version=trt.__version__)
    engines = build_engines(plan, trt, gpu, timing_cache=tmp_path / "timing.cache", progress=print)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    loaded = load_bundle(bundle)  # plan files hashed into the manifest
    assert select_engine_set(loaded, gpu, trt.__version__, precision).key == engines.key
    _compare_engines(trt, engines, tiny_bundle, 1e-3 if precision == "fp32" else 5e-2)
