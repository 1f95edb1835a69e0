"""Weight-only int4/int8 bundles (`export --weights`): options refused by name before any work, onnxruntime's own
MatMulNBits in the graphs with exactly the asked block size, symmetry and accuracy level, the manifest's record, a turn
on the quantized bundle, and the accuracy figures (benchmarks/accuracy.py) measured against the fp32 bundle: exact for
the fp32 bundle itself, finite and below exact for int4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from opens2s_edge.cli import main as cli_main
from opens2s_edge.export.pipeline import ExportError, export_bundle
from opens2s_edge.export.weight_quant import WeightOptions

MAX_CONTEXT = 128


@pytest.fixture(scope="module")
def bundles(tiny_default: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    src = (tiny_default / "checkpoint", tiny_default / "decoder")
    quiet = {"max_context": MAX_CONTEXT, "max_audio_seconds": 4, "progress": lambda _: None}
    return {
        "fp32": export_bundle(*src, root / "fp32", form="gqa", **quiet),
        "int4": export_bundle(*src, root / "int4", form="gqa", weights=WeightOptions("int4"), **quiet),
        "int8": export_bundle(*src, root / "int8", form="classic", flow_steps=6, **quiet,
                              weights=WeightOptions("int8", 64, False, 0, ("llm", "tts_lm", "estimator"))),
    }


@pytest.mark.parametrize(("weights", "message"), [
    (WeightOptions("int3"), "--weights must be one of"),
    (WeightOptions("int4", block_size=48), "--block-size must be one of 32, 64, 128"),
    (WeightOptions("int4", accuracy_level=7), "--accuracy-level must be one of"),
    (WeightOptions("int4", graphs=("llm", "vocoder")), "--weight-graphs: unknown vocoder"),
])
def test_bad_options_are_named_before_any_work(tmp_path: Path, weights: WeightOptions, message: str) -> None:
    # The checkpoint folder does not exist: the error must come from the options, before anything is opened.
    with pytest.raises(ExportError, match=message):
        export_bundle(tmp_path / "missing", tmp_path / "missing", tmp_path / "out", weights=weights)
    with pytest.raises(ExportError, match="needs --dtype fp32 or fp16"):
        export_bundle(tmp_path / "missing", tmp_path / "missing", tmp_path / "out", dtype="bf16",
                      weights=WeightOptions("int4"))
    with pytest.raises(ExportError, match="--flow-steps must be between 1 and"):
        export_bundle(tmp_path / "missing", tmp_path / "missing", tmp_path / "out", flow_steps=0)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_quantization_options_without_weights(tiny_default: Path, tmp_path: Path, capsys) -> None:
    args = ["export", "--checkpoint", str(tiny_default / "checkpoint"), "--decoder", str(tiny_default / "decoder"),
            "--out", str(tmp_path / "b")]
    assert cli_main([*args, "--block-size", "64"]) == 2
    assert "apply to --weights int4|int8" in capsys.readouterr().err
    assert cli_main([*args, "--weights", "int4", "--form", "trt10.3"]) == 2
    assert "TensorRT does not parse" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def _nbits(path: Path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]


def _constant_matmuls(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


@pytest.mark.parametrize(("name", "bits", "block", "symmetric", "level", "graphs"), [
    ("int4", 4, 32, True, 4, ("llm", "tts_lm")),
    ("int8", 8, 64, False, 0, ("llm", "tts_lm", "estimator")),
])
def test_quantized_graphs_and_their_record(bundles, name: str, bits: int, block: int, symmetric: bool, level: int,
                                           graphs: tuple[str, ...]) -> None:
    manifest = json.loads((bundles[name] / "manifest.json").read_text())
    assert manifest["weights"] == name
    for graph, entry in manifest["graphs"].items():
        path = bundles[name] / entry["file"]
        if graph not in graphs:
            assert "weights" not in entry and not _nbits(path), graph
            continue
        nodes = _nbits(path)
        assert nodes and not _constant_matmuls(path), graph  # every constant-weight matmul became MatMulNBits
        for node in nodes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert (attrs["bits"], attrs["block_size"], attrs.get("accuracy_level", 0)) == (bits, block, level)
            # Symmetric blocks have no zero points (input 3); asymmetric ones do.
            assert (len(node.input) > 3 and node.input[3] != "") is not symmetric, node.name
        record = entry["weights"]
        assert record["format"] == "MatMulNBits" and record["quantizer"].endswith("MatMulNBitsQuantizer")
        assert (record["bits"], record["block_size"], record["symmetric"], record["accuracy_level"]) == (
            bits, block, symmetric, level)
        assert record["matmuls_quantized"] == len(nodes) and record["bytes_after"] < record["bytes_before"]
        # The float graph was verified against its tolerance; the quantized one's deviation is measured beside it.
        assert entry["max_deviation"] <= entry["tolerance"]
        assert 0 < record["max_deviation"] < 10 and np.isfinite(list(record["deviation"].values())).all()
        assert entry["tensorrt_ready"] is False and any("MatMulNBits" in p for p in entry["tensorrt_problems"])
    assert manifest["token2wav"]["spec"]["n_timesteps"] == (6 if name == "int8" else 10)


def test_quantized_bundle_answers_a_turn(bundles) -> None:
    from opens2s_edge.runtime.bundle import load_bundle
    from opens2s_edge.runtime.engine import Engine, TurnOptions

    wav = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    for name in ("int4", "int8"):
        engine = Engine.from_bundle(load_bundle(bundles[name]))
        done = list(engine.turn(wav, TurnOptions(greedy=True, max_text_tokens=6, max_speech_tokens=16)))[-1]
        assert done.text_ids and done.speech_ids, name
        assert done.audio.size and np.isfinite(done.audio).all(), name


def test_accuracy_is_measured_against_fp32(bundles, tmp_path: Path, capsys) -> None:
    """benchmarks/accuracy.py: the fp32 bundle against itself is exact (the oracle works), int4 is measured and
    inexact; token2wav is untouched by decoder-only quantization; fewer Euler steps move the mel."""
    from opens2s_edge.benchmarks import accuracy

    out = tmp_path / "accuracy.json"
    assert accuracy.main([str(bundles["fp32"]), str(bundles["int4"]), "--text-tokens", "6", "--speech-tokens", "24",
                          "--flow-steps", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "worst case for int4" in printed and "| 4 |" in printed
    result = json.loads(out.read_text())
    same, int4 = result["bundles"]
    for decoder in ("llm", "tts"):
        assert same[decoder]["snr_db"] is None and same[decoder]["kl_nats"] == 0.0
        assert same[decoder]["top1_agreement"] == 1.0
        assert int4[decoder]["snr_db"] is not None and np.isfinite(int4[decoder]["snr_db"])
        assert int4[decoder]["kl_nats"] > 0 and 0.0 <= int4[decoder]["top1_agreement"] <= 1.0
        assert int4[decoder]["steps"] == same[decoder]["steps"] > 0
    # Same units, same float flow and vocoder: identical audio.
    assert int4["token2wav"]["mel_max_abs"] == 0.0 and int4["token2wav"]["wav_snr_db"] is None
    steps = result["flow_steps"][0]
    assert steps["steps"] == 4 and steps["mel_max_abs"] > 0 and steps["log_spectral_distance_db"] > 0
