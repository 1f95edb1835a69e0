"""Smoke tests of `opens2s-edge bench`: it runs on the tiny preset and its JSON holds every field. No timing
assertions: the numbers depend on the machine; only their presence and shape are checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opens2s_edge.cli import UserError, main

TURN_FIELDS = {"first_text_s", "first_audio_s", "rtf", "total_s", "audio_s", "audio_encoder_s", "llm_prefill_s",
               "llm_decode_tok_s", "tts_decode_tok_s", "estimator_per_chunk_s", "hift_per_chunk_s",
               "token2wav_per_chunk_s", "text_tokens", "speech_tokens", "chunks_per_turn", "peak_rss_bytes",
               "device_memory", "setup_s"}
STAT_FIELDS = {"n", "p50", "p90", "p99", "mean", "min", "max", "spread", "cv"}
CHUNK_FIELDS = {"tokens_so_far", "window_tokens", "estimator_frames", "encode_s", "estimator_s", "estimator_calls",
                "hift_s", "hift_calls", "seconds"}


def test_bench_tiny_preset_writes_every_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    # BUNDLE does not exist: the tiny preset is written beside it and exported, as a user's first run does.
    code = main(["bench", str(bundle), "--preset", "tiny", "--runs", "2", "--warmup", "0", "--threads", "1",
                 "--peers", "reference,torch,ort", "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert code == 0
    assert (bundle / "manifest.json").is_file() and (tmp_path / "bundle.source" / "checkpoint").is_dir()
    result = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "Per turn and per component" in printed and "Roofline" in printed

    assert {"schema", "date", "preset", "machine", "config", "memory_bandwidth", "turn", "llm_alone",
            "token2wav_chunks", "roofline", "skipped", "failed"} <= result.keys()
    assert result["failed"] == {} and result["skipped"] == {}
    machine = result["machine"]
    assert {"cpu", "logical_cores", "usable_cores", "ram_bytes", "gpu", "os", "python", "libraries"} <= machine.keys()
    assert machine["libraries"]["onnxruntime"] and machine["libraries"]["torch"]

    stats = result["turn"]["stats"]
    assert set(stats) == {"reference", "torch", "ort"}
    for peer, s in stats.items():
        assert TURN_FIELDS <= s.keys(), peer
        for key in ("first_text_s", "first_audio_s", "rtf", "total_s", "llm_decode_tok_s", "tts_decode_tok_s",
                    "token2wav_per_chunk_s"):
            assert STAT_FIELDS <= s[key].keys() and s[key]["n"] == 2 and s[key]["p50"] > 0, (peer, key)
        assert s["peak_rss_bytes"] > 0
    for raw in result["turn"]["raw"].values():
        for turn in raw["turns"]:
            assert turn["components"]["token2wav_chunks"]
            assert CHUNK_FIELDS <= turn["components"]["token2wav_chunks"][0].keys()
    # Same weights, same greedy decoding: the three pipelines pick the same ids.
    parity = result["turn"]["ids_parity"]
    assert all(v["text_ids_equal"] and v["speech_ids_equal"] for k, v in parity.items() if k != "against")
    assert result["turn"]["ratios"]["first_audio_s"]["ort"]["reference"] > 0

    alone = result["llm_alone"]["peers"]
    assert set(alone) == {"reference", "torch", "ort"}
    for r in alone.values():
        assert r["decode_tok_s"] > 0 and r["prefill_s"]["n"] == 2

    t2w = result["token2wav_chunks"]
    for key in ("ours_torch", "ours_ort", "reference_style_torch"):
        assert t2w[key] and {"tokens_so_far", "seconds", "estimator_frames"} <= t2w[key][0].keys()

    roof = result["roofline"]
    assert roof["bandwidth_bytes_per_s"] > 0
    for decoder in ("llm", "tts"):
        d = roof["decoders"][decoder]
        assert d["bytes_per_step"] > d["weight_bytes"] > 0 and d["bound_tokens_per_s"] > 0
        assert d["peers"]["ort"]["fraction"] > 0


def test_bench_without_checkpoint_reports_skipped_peers(tiny_bundle: Path, tmp_path: Path) -> None:
    from opens2s_edge.benchmarks.bench import BenchConfig, run_bench
    from opens2s_edge.benchmarks.cli_bench import DEFAULT_AUDIO

    config = BenchConfig(bundle=tiny_bundle, checkpoint=None, decoder=None, audio=DEFAULT_AUDIO, out=tmp_path,
                         preset="tiny", peers=("torch", "ort", "trt", "genai"), runs=1, warmup=0, threads=1,
                         cache_root=tmp_path / "cache")
    result = run_bench(config, progress=lambda _: None)
    assert "checkpoint" in result["skipped"]["torch"]
    assert "checkpoint" in result["skipped"]["llm:genai-fp32"]
    # The bundle has no TensorRT engines (and this machine may have no TensorRT): a stated reason, no numbers.
    for key in ("trt", "llm:trt"):
        assert any(word in result["skipped"][key] for word in ("TensorRT", "tensorrt", "engine")), result["skipped"]
    assert result["failed"] == {}
    assert set(result["turn"]["stats"]) == {"ort"} and "torch" not in result["llm_alone"]["peers"]


def test_bench_full_preset_refuses_without_gpu(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU: the refusal is for CPU-only machines")
    with pytest.raises(UserError, match="GPU"):
        from opens2s_edge.benchmarks import cli_bench
        from opens2s_edge.cli import build_parser

        args = build_parser().parse_args(["bench", str(tmp_path / "b"), "--preset", "full", "--out", str(tmp_path)])
        cli_bench.main(args)


def test_bench_rejects_unknown_peer(tmp_path: Path) -> None:
    from opens2s_edge.benchmarks import cli_bench
    from opens2s_edge.cli import build_parser

    args = build_parser().parse_args(["bench", str(tmp_path / "b"), "--peers", "ort,llamacpp", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="llamacpp"):
        cli_bench.main(args)
