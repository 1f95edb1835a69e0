"""Runtime backends beyond onnxruntime CPU: the native TensorRT backend and the onnxruntime CUDA / TensorRT EPs.

Everywhere: the backend choice, its named errors when TensorRT or cuda-python is missing (`run --backend tensorrt`
exits 2 with the reason), where the CUDA EP binds the KV caches, the TensorRT EP options, the bf16 bit conversion.
(The backend-neutral turn logic is checked by tests/test_runtime.py, unchanged: same golden and PyTorch ids.)

On a machine with a GPU, TensorRT and cuda-python: engines are built for the tiny bundle and a full turn on the
TensorRT backend is compared with onnxruntime CPU fp32 (greedy text and speech ids; logits within a stated
tolerance; no NaN), and CUDA-graph decoding with plain launches. With onnxruntime-gpu: a CUDA EP turn against CPU.
Elsewhere these are skipped with the reason.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opens2s_edge.runtime.audio import load_wav
from opens2s_edge.runtime.bundle import load_bundle
from opens2s_edge.runtime.engine import Engine, TurnDone, TurnOptions, make_backend
from opens2s_edge.runtime.onnx_backend import (
    BackendError,
    OrtDecoder,
    cache_device,
    make_session,
    session_providers,
    tensorrt_ep_options,
)
from opens2s_edge.runtime.trt_backend import bf16_bits_to_float32, float32_to_bf16_bits

REPO = Path(__file__).resolve().parents[1]
HELLO = REPO / "opens2s_edge" / "assets" / "hello.wav"
# Python with torch, tensorrt and cuda-python made unimportable, whatever this machine has installed.
NO_GPU_STACK = ("import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None; "
                "sys.modules['cuda'] = None; ")


def _turn(engine: Engine, options: TurnOptions) -> TurnDone:
    done = list(engine.turn(load_wav(HELLO), options))[-1]
    assert isinstance(done, TurnDone)
    return done


# -- everywhere ------------------------------------------------------------------------------------------
def test_tensorrt_backend_without_tensorrt_is_a_named_error(tiny_bundle: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    with pytest.raises(BackendError, match="needs the tensorrt Python package.*install TensorRT 10"):
        Engine.from_bundle(load_bundle(tiny_bundle), backend="tensorrt")


def test_missing_cuda_python_is_a_named_error(monkeypatch) -> None:
    from opens2s_edge.runtime.cuda_memory import import_cudart

    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendError, match="needs cuda-python.*pip install"):
        import_cudart()


def test_unknown_backend_is_refused(tiny_bundle: Path) -> None:
    with pytest.raises(BackendError, match="unknown backend 'tflite'.*onnxruntime, tensorrt"):
        make_backend("tflite", load_bundle(tiny_bundle, verify=False))


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    code = NO_GPU_STACK + f"from opens2s_edge.cli import main; sys.exit(main({args!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_run_backend_tensorrt_exits_2_with_the_reason(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "reply.wav"
    base = ["run", str(tiny_bundle), "--audio", str(HELLO), "--out", str(out)]
    cases = [
        (base + ["--backend", "tensorrt"], "needs the tensorrt Python package"),
        (base + ["--backend", "tensorrt", "--provider", "cuda"], "--provider chooses onnxruntime"),
        (base + ["--engines", "rtx4090-10.15-fp16"], "apply to --backend tensorrt"),
    ]
    for args, message in cases:
        run = _run(args, tmp_path)
        assert run.returncode == 2, run.stderr
        assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert not out.exists()


def test_cuda_ep_binds_caches_on_the_device_only_for_a_gpu_provider() -> None:
    assert cache_device(["CPUExecutionProvider"]) == "cpu"
    assert cache_device([]) == "cpu"
    assert cache_device(["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert cache_device(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    # A GPU provider listed only as a fallback does not run the graph: the cache stays where the graph runs.
    assert cache_device(["CPUExecutionProvider", "CUDAExecutionProvider"]) == "cpu"


def test_cpu_decoder_keeps_its_cache_in_host_arrays(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle, verify=False)
    decoder = OrtDecoder(make_session(bundle.graph_path("llm"), ["CPUExecutionProvider"]), bundle.array("llm_embed"))
    assert decoder.device == "cpu"
    name = decoder.cache_names[0]
    assert decoder.cache_values[name].device_name() == "cpu"
    decoder.run(decoder.embed([1, 2, 3]))
    assert np.abs(decoder.cache[name][0, :, :3]).sum() > 0  # written in place into our own array


def test_tensorrt_ep_options_follow_the_manifest(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = load_bundle(tiny_bundle, verify=False).manifest
    llm = tensorrt_ep_options(manifest, "llm", tmp_path)
    max_context = manifest["graphs"]["llm"]["limits"]["max_context"]
    width = manifest["llm"]["hidden_size"]
    assert llm["trt_profile_min_shapes"] == f"inputs_embeds:1x1x{width}"
    assert llm["trt_profile_opt_shapes"] == f"inputs_embeds:1x1x{width}"
    assert llm["trt_profile_max_shapes"] == f"inputs_embeds:1x{max_context}x{width}"
    assert "trt_fp16_enable" not in llm  # fp32 bundle
    cache = Path(llm["trt_engine_cache_path"])
    assert cache.parent == tmp_path / "ort-tensorrt" and cache.name.startswith("llm-")
    assert cache.name.endswith(manifest["files"]["llm.onnx"]["sha256"][:16])
    audio = tensorrt_ep_options(manifest, "audio_encoder", tmp_path)
    frames = manifest["graphs"]["audio_encoder"]["limits"]["window_frames"]
    assert audio["trt_profile_max_shapes"] == f"input_features:1x128x{frames}"
    # The manifest does not bound the token2wav lengths: no partial profile (the EP would refuse it).
    assert not any(k.startswith("trt_profile") for k in tensorrt_ep_options(manifest, "flow", tmp_path))
    fp16 = {**manifest, "graphs": {**manifest["graphs"], "llm": {**manifest["graphs"]["llm"], "dtype": "fp16"}}}
    assert tensorrt_ep_options(fp16, "llm", tmp_path)["trt_fp16_enable"] == "True"
    providers = session_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                                  manifest, "llm", tmp_path)
    assert providers[0] == ("TensorrtExecutionProvider", llm) and providers[1:] == ["CUDAExecutionProvider",
                                                                                      "CPUExecutionProvider"]
    assert session_providers(["CPUExecutionProvider"], manifest, "llm", tmp_path) == ["CPUExecutionProvider"]


def test_bf16_bits_round_like_a_gpu_cast() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (an onnx dependency) is the bf16 oracle")
    rng = np.random.default_rng(0)
    x = np.concatenate([(rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000)).astype(np.float32),
                        np.array([0.0, -0.0, 1.0, np.inf, -np.inf, 3.0e38, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8],
                                 np.float32)])
    expected = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(float32_to_bf16_bits(x), expected)
    np.testing.assert_array_equal(bf16_bits_to_float32(expected), expected.view(ml_dtypes.bfloat16).astype(np.float32))
    assert np.isnan(bf16_bits_to_float32(float32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


# -- on a GPU with TensorRT and cuda-python ---------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_stack() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (NVIDIA's index or JetPack): no engine tests")
    from opens2s_edge.runtime.cuda_memory import Cuda, import_cudart

    try:
        cuda = Cuda(import_cudart())
    except BackendError as exc:
        pytest.skip(f"cuda-python is not importable: {exc}")
    if cuda.device_count() == 0:
        pytest.skip("no CUDA GPU visible (cudaGetDeviceCount)")


def test_engines_key_must_exist_and_fit(tiny_bundle: Path) -> None:
    from opens2s_edge.runtime.engines import EngineMismatch
    from opens2s_edge.runtime.trt_backend import _select_engine_set

    bundle = load_bundle(tiny_bundle, verify=False)
    entry = {"gpu": {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}, "tensorrt": "10.15.1",
             "precision": "fp16", "graphs": {}}
    bundle.manifest = {**bundle.manifest, "engines": {"rtx4090-fp16": entry}}
    with pytest.raises(EngineMismatch, match="no engine set 'other'.*has: rtx4090-fp16"):
        _select_engine_set(bundle, "NVIDIA GeForce RTX 4090", (8, 9), "10.15.1", "other", None)
    with pytest.raises(EngineMismatch, match="built with TensorRT 10.15.1, this is TensorRT 10.3.0"):
        _select_engine_set(bundle, "NVIDIA GeForce RTX 4090", (8, 9), "10.3.0", "rtx4090-fp16", None)
    assert _select_engine_set(bundle, "NVIDIA GeForce RTX 4090", (8, 9), "10.15.1", None, None).key == "rtx4090-fp16"


# -- on a GPU with TensorRT and cuda-python ---------------------------------------------------------------
# Stated tolerances, relative to max(1, |reference|), for engine outputs against onnxruntime CPU fp32 on the same
# bundle: fp32 engines are built with TF32 off (export/trt_build.py), so only summation order differs.
LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1}


@pytest.fixture(scope="module")
def trt_bundle(gpu_stack: None, tiny_bundle: Path, tmp_path_factory) -> Path:
    """A copy of the tiny bundle with fp32 engines built for this GPU by `opens2s-edge build`'s own code."""
    import shutil

    from opens2s_edge.export.trt_build import build_engines, gpu_or_error, import_tensorrt, plan_build

    root = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("trt") / "bundle")
    trt, gpu = import_tensorrt(), gpu_or_error()
    plan = plan_build(root, precision="fp32", gpu=gpu, trt_version=trt.__version__)
    build_engines(plan, trt, gpu, progress=lambda _: None)
    return root


@pytest.fixture(scope="module")
def trt_engine(trt_bundle: Path) -> Engine:
    return Engine.from_bundle(load_bundle(trt_bundle), backend="tensorrt")


@pytest.fixture(scope="module")
def cpu_engine(trt_bundle: Path) -> Engine:
    return Engine.from_bundle(load_bundle(trt_bundle))


def test_tensorrt_turn_matches_onnxruntime_cpu(trt_engine: Engine, cpu_engine: Engine) -> None:
    options = TurnOptions(greedy=True)
    ours, reference = _turn(trt_engine, options), _turn(cpu_engine, options)
    assert ours.text_ids == reference.text_ids
    assert ours.speech_ids == reference.speech_ids and len(ours.speech_ids) > 10
    assert np.isfinite(ours.audio).all() and ours.audio.shape == reference.audio.shape
    # Same tokens and seeded noise: the waveform differs by float rounding through 10 Euler steps and HiFT.
    error = ours.audio - reference.audio
    assert np.sqrt(np.mean(error**2)) < 0.05 * np.sqrt(np.mean(reference.audio**2))
    # the decode steps were replayed as CUDA graphs
    assert trt_engine.oneshot().llm.graph is not None and trt_engine.oneshot().tts.graph is not None


def test_tensorrt_decoder_logits_within_tolerance(trt_engine: Engine, cpu_engine: Engine) -> None:
    tolerance = LOGIT_TOLERANCE[trt_engine.backend.engine_set.precision]
    for name in ("llm", "tts"):
        ours, reference = getattr(trt_engine.oneshot(), name), getattr(cpu_engine.oneshot(), name)
        ids = list(range(3, 40))
        steps = [ids] + [[i] for i in (5, 7, 11, 13, 17, 19)]
        ours.reset()
        reference.reset()
        for feed in steps:
            a, b = ours.run(ours.embed(feed)), reference.run(reference.embed(feed))
            for key in ("logits", "hidden"):
                assert np.isfinite(a[key]).all()
                scale = np.maximum(1.0, np.abs(b[key]))
                assert np.max(np.abs(a[key] - b[key]) / scale) < tolerance, (name, key, len(feed))


def test_tensorrt_chunked_prefill_and_context_full(trt_engine: Engine, monkeypatch) -> None:
    from opens2s_edge.runtime.onnx_backend import ContextFull

    decoder = trt_engine.oneshot().llm
    embeds = decoder.embed(list(range(3, 30)))
    decoder.reset()
    whole = decoder.run(embeds)
    monkeypatch.setattr(decoder, "max_rows", 5)  # as if the prefill profile stopped at 5 rows
    decoder.reset()
    chunked = decoder.run(embeds)
    assert decoder.pos == embeds.shape[0]
    np.testing.assert_allclose(chunked["logits"], whole["logits"], rtol=1e-3, atol=1e-3)
    decoder.pos = decoder.max_len - 1
    with pytest.raises(ContextFull, match="cache holds"):
        decoder.run(embeds[:2])
    decoder.reset()


def test_cuda_graph_decode_gives_the_same_tokens(trt_bundle: Path, trt_engine: Engine) -> None:
    options = TurnOptions(seed=3, max_text_tokens=16, max_speech_tokens=64)
    plain = Engine.from_bundle(load_bundle(trt_bundle), backend="tensorrt", cuda_graphs=False)
    a, b = _turn(trt_engine, options), _turn(plain, options)
    assert plain.oneshot().llm.graph is None
    assert a.text_ids == b.text_ids and a.speech_ids == b.speech_ids


def test_tensorrt_memory_is_reported(trt_engine: Engine) -> None:
    m = trt_engine.bundle.manifest
    memory = trt_engine.backend.describe()["memory"]
    kv = sum(2 * m[part]["layers"] * m[part]["kv_heads"] * m[part]["max_context"] * m[part]["head_dim"] * 4
             for part in ("llm", "tts"))
    assert memory["kv_cache_bytes"] == kv  # fp32 caches, one buffer per layer and kind (past = present)
    assert memory["device_used"] >= memory["kv_cache_bytes"] + memory["scratch_bytes"]


def test_onnxruntime_cuda_ep_turn_matches_cpu(tiny_bundle: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)")
    bundle = load_bundle(tiny_bundle)
    cuda = Engine.from_bundle(bundle, ("cuda",))
    assert cuda.oneshot().llm.device == "cuda"
    assert all(v.device_name().lower() == "cuda" for v in cuda.oneshot().llm.cache_values.values())
    options = TurnOptions(greedy=True)
    ours, reference = _turn(cuda, options), _turn(Engine.from_bundle(bundle), options)
    assert ours.text_ids == reference.text_ids and ours.speech_ids == reference.speech_ids
