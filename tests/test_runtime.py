"""The torch-free runtime end to end, against the PyTorch pipeline and the reference's golden ids."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from opens2s_edge.runtime.audio import load_wav
from opens2s_edge.runtime.bundle import load_bundle
from opens2s_edge.runtime.engine import AudioChunk, Engine, TextDelta, TurnDone, TurnOptions
from opens2s_edge.runtime.token2wav_stream import StreamConfig
from opens2s_edge.training.generate import GenerationOptions, Generator
from opens2s_edge.training.token2wav.decoder import load_decoder

REPO = Path(__file__).resolve().parents[1]
HELLO = REPO / "opens2s_edge" / "assets" / "hello.wav"
# Python with torch made unimportable: `import torch` raises ImportError in the child.
NO_TORCH = "import sys; sys.modules['torch'] = None; "


def _turn(engine: Engine, wav: np.ndarray, options: TurnOptions) -> tuple[list, TurnDone]:
    events = list(engine.turn(wav, options))
    assert isinstance(events[-1], TurnDone)
    return events, events[-1]


@pytest.fixture(scope="module")
def golden_engine(golden_bundle: Path) -> Engine:
    return Engine.from_bundle(load_bundle(golden_bundle))


@pytest.mark.parametrize("name", ["u1", "u2"])
def test_golden_ids_on_the_runtime(golden_engine: Engine, golden_opens2s: Path, name: str) -> None:
    golden = np.load(golden_opens2s / "golden.npz")
    _, done = _turn(golden_engine, load_wav(golden_opens2s / f"{name}.wav"),
                    TurnOptions(greedy=True, reference_sampling=True, max_text_tokens=24, max_speech_tokens=96))
    assert done.text_ids == golden[f"{name}/text_ids"].reshape(-1).tolist()
    raw = golden[f"{name}/speech_ids_raw"].reshape(-1).tolist()
    assert done.speech_ids == [i for i in raw if not golden_engine.vocab.is_eos(i)]


@pytest.mark.parametrize("options", [dict(greedy=True), dict(seed=5, max_text_tokens=16, max_speech_tokens=64)])
def test_tiny_default_matches_the_pytorch_pipeline(tiny_bundle: Path, tiny_default: Path, options: dict) -> None:
    wav = load_wav(HELLO)
    ours = _turn(Engine.from_bundle(load_bundle(tiny_bundle)), wav, TurnOptions(**options))[1]
    reference = Generator(tiny_default / "checkpoint")(wav, GenerationOptions(**options))
    assert ours.text_ids == reference.text_ids
    assert ours.speech_ids == reference.speech_ids
    assert ours.speech_units == reference.speech_units
    assert len(ours.speech_ids) > 10


def test_reply_audio_matches_pytorch_streaming_token2wav(golden_engine: Engine, golden_root: Path) -> None:
    config = StreamConfig()
    _, done = _turn(golden_engine, load_wav(golden_root / "opens2s_tiny" / "u1.wav"),
                    TurnOptions(greedy=True, stream=config))
    stream = load_decoder(golden_root / "glm4voice_decoder_tiny").stream(config, seed=0)
    pieces = [stream.push([u]) for u in done.speech_units] + [stream.finalize()]
    reference = np.concatenate(pieces)
    assert done.audio.shape == reference.shape
    # Same algorithm, same noise; only float32 rounding differs (10 Euler steps, F0 into the sine phase): the
    # golden README's waveform tolerance, max abs 1e-3 (measured 1.3e-4, RMS 8e-6).
    assert np.abs(done.audio - reference).max() <= 1e-3


def test_streaming_really_streams(golden_engine: Engine, golden_opens2s: Path) -> None:
    # u2 runs its whole 24-token text budget, so text is still streaming when the first audio is out.
    events, done = _turn(golden_engine, load_wav(golden_opens2s / "u2.wav"),
                         TurnOptions(greedy=True, max_text_tokens=24))
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
    last_text = max(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    assert len(done.text_ids) == 24
    assert first_audio < last_text
    assert done.latency.first_audio_s < events[last_text].t
    times = [e.t for e in events]
    assert times == sorted(times)
    assert sum(e.pcm.size for e in events if isinstance(e, AudioChunk)) == done.audio.size


def test_two_turns_equal_two_fresh_runtimes(tiny_bundle: Path) -> None:
    first, second = load_wav(HELLO), np.sin(np.linspace(0, 2000, 40000)).astype(np.float32) * 0.2
    options = TurnOptions(seed=11, max_text_tokens=12, max_speech_tokens=48)
    engine = Engine.from_bundle(load_bundle(tiny_bundle))
    a, b = _turn(engine, first, options)[1], _turn(engine, second, options)[1]
    fresh_b = _turn(Engine.from_bundle(load_bundle(tiny_bundle)), second, options)[1]
    fresh_a = _turn(Engine.from_bundle(load_bundle(tiny_bundle)), first, options)[1]
    assert a.to_json()["speech_ids"] == fresh_a.to_json()["speech_ids"] and a.text_ids == fresh_a.text_ids
    assert b.text_ids == fresh_b.text_ids and b.speech_ids == fresh_b.speech_ids
    np.testing.assert_array_equal(b.audio, fresh_b.audio)


def test_context_limit_is_a_clear_stop(tiny_default: Path, tmp_path: Path) -> None:
    from opens2s_edge.export.pipeline import export_bundle

    bundle = export_bundle(tiny_default / "checkpoint", tiny_default / "decoder", tmp_path / "b", max_context=64,
                           progress=lambda _: None)
    _, done = _turn(Engine.from_bundle(load_bundle(bundle)), load_wav(HELLO), TurnOptions(max_text_tokens=200))
    assert done.stopped == "context"
    assert len(done.text_ids) > 0 and done.audio.size > 0


def test_run_command_without_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "reply.wav"
    code = (NO_TORCH + "from opens2s_edge.cli import main; "
            f"sys.exit(main(['run', {str(tiny_bundle)!r}, '--audio', {str(HELLO)!r}, '--out', {str(out)!r}, "
            "'--json', '--max-text-tokens', '12']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert set(reply) == {"text", "text_ids", "speech_ids", "speech_units", "latency", "prompt_ids", "reused",
                          "prefilled", "stopped"}
    from opens2s_edge.runtime.prompt import PromptBuilder

    assert reply["prompt_ids"] == PromptBuilder.from_folder(tiny_bundle).prompt_ids()
    assert reply["reused"] == 0 and reply["prefilled"] > len(reply["prompt_ids"])  # the audio rows too
    assert {"first_text_s", "first_audio_s", "rtf", "total_s"} <= set(reply["latency"])
    audio, rate = sf.read(out)
    assert rate == 22050 and audio.size > 0
    plain = subprocess.run([sys.executable, "-c", code.replace("'--json', ", "")], capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode == 0 and "[latency] first text token" in plain.stderr


def _run(bundle: Path, audio: Path, out: Path) -> subprocess.CompletedProcess:
    code = (NO_TORCH + "from opens2s_edge.cli import main; "
            f"sys.exit(main(['run', {str(bundle)!r}, '--audio', {str(audio)!r}, '--out', {str(out)!r}]))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_bad_inputs_get_named_errors_and_no_partial_output(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "reply.wav"
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEfmt garbage")
    long_wav = tmp_path / "long.wav"
    sf.write(long_wav, np.zeros(16000 * 31, np.float32), 16000)
    tampered = shutil.copytree(tiny_bundle, tmp_path / "tampered")
    with open(tampered / "tts_lm.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    cases = [
        (tiny_bundle, tmp_path / "missing.wav", "missing.wav does not exist"),
        (tiny_bundle, corrupt, "corrupt.wav is corrupt"),
        (tiny_bundle, long_wav, "at most 30 s"),
        (tampered, HELLO, "tts_lm.onnx does not match its sha256"),
        (tmp_path / "no_bundle", HELLO, "does not exist"),
    ]
    for bundle, audio, message in cases:
        run = _run(bundle, audio, out)
        assert run.returncode == 2, (message, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert not out.exists()
        assert not list(tmp_path.glob(".reply*"))
