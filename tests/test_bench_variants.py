"""`bench --peers ort,ort-int4`: the quantized peer runs on a derived copy of the bundle (onnxruntime's MatMulNBits on
the decoders, hashes rewritten), in the turn and alone; its roofline counts the bytes its graph holds; the JSON carries
onnxruntime's own per-op profile of decode steps with the step split into kernels, onnxruntime and our Python loop.
No timing assertions: only presence, shape and the facts the files fix."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from opens2s_edge.cli import main


def test_quantized_peers_and_decode_profiles(tiny_bundle: Path, tiny_default: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["bench", str(tiny_bundle), "--preset", "tiny", "--runs", "1", "--warmup", "0", "--threads", "1",
                 "--peers", "ort,ort-int4", "--checkpoint", str(tiny_default / "checkpoint"),
                 "--decoder", str(tiny_default / "decoder"), "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["failed"] == {} and result["skipped"] == {}
    assert set(result["turn"]["stats"]) == {"ort", "ort-int4"}
    alone = result["llm_alone"]["peers"]
    assert alone["ort-int4"]["precision"] == "int4" and alone["ort"]["precision"] == "fp32"

    from opens2s_edge.runtime.bundle import load_bundle

    derived = load_bundle(alone["ort-int4"]["bundle"])  # every hash verifies
    assert derived.manifest["weights"] == "int4"
    for graph in ("llm", "tts_lm"):
        nodes = onnx.load(str(derived.graph_path(graph)), load_external_data=False).graph.node
        assert any(n.op_type == "MatMulNBits" for n in nodes), graph
    assert derived.manifest["graphs"]["flow"]["file"] == load_bundle(tiny_bundle).manifest["graphs"]["flow"]["file"]

    llm, tts = (result["roofline"]["decoders"][d]["peers"] for d in ("llm", "tts"))
    assert llm["alone:ort-int4"]["bytes_per_step"] < llm["alone:ort"]["bytes_per_step"]
    assert tts["ort-int4"]["bytes_per_step"] < tts["ort"]["bytes_per_step"]

    profiles = result["decode_profile"]
    assert set(profiles) == {"ort:llm", "ort:tts_lm", "ort-int4:llm", "ort-int4:tts_lm"}
    for label, p in profiles.items():
        assert p["kernels_us"] > 0 and p["model_run_us"] >= p["kernels_us"] and p["python_us"] > 0, label
        assert abs(sum(v["share"] for v in p["ops"].values()) - 1.0) < 1e-6, label
    assert "MatMulNBits" in profiles["ort-int4:llm"]["ops"] and "MatMulNBits" not in profiles["ort:llm"]["ops"]
    assert "MatMul" in profiles["ort:llm"]["ops"]
