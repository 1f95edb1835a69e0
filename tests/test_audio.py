"""The numpy frontend against transformers' WhisperFeatureExtractor and the golden features; resampling
against analytic sines; named errors for bad audio files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from transformers import WhisperFeatureExtractor

from opens2s_edge.runtime.audio import (
    WINDOW_FRAMES,
    AudioInputError,
    audio_features,
    load_wav,
    log_mel_spectrogram,
    resample,
)


@pytest.fixture(scope="module")
def extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=128)


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 3) / 16000
    return {
        "noise": rng.normal(0, 0.1, 16000 * 7).astype(np.float32),
        "chirp": (0.3 * np.sin(2 * np.pi * (200 + 900 * t) * t)).astype(np.float32),
        "silence": np.zeros(16000, np.float32),
        "click": np.r_[np.zeros(800), [0.9], np.zeros(8000)].astype(np.float32),
    }


@pytest.mark.parametrize("name", ["noise", "chirp", "silence", "click"])
def test_matches_whisper_feature_extractor(extractor, name: str) -> None:
    wav = _signals()[name]
    ours, valid = audio_features(wav)
    ref = extractor(wav, sampling_rate=16000, return_tensors="np", return_attention_mask=True)
    assert ours.shape == ref.input_features.shape == (1, 128, WINDOW_FRAMES)
    assert np.abs(ours - ref.input_features).max() < 1e-4
    assert valid == int(ref.attention_mask.sum())


def test_long_audio_is_windowed_like_the_reference(extractor) -> None:
    """Over 30 s the reference pads to 60 s and takes one log-mel over it: both windows, one dynamic range."""
    wav = np.random.default_rng(1).normal(0, 0.05, 16000 * 41).astype(np.float32)
    ours, valid = audio_features(wav)
    assert ours.shape == (1, 128, 2 * WINDOW_FRAMES) and valid == 41 * 100
    padded = np.zeros(2 * 480000, np.float32)
    padded[: wav.size] = wav
    ref = extractor(wav, sampling_rate=16000, return_tensors="np", padding="max_length", max_length=padded.size,
                    truncation=True).input_features
    assert np.abs(ours - ref).max() < 1e-4
    np.testing.assert_array_equal(log_mel_spectrogram(padded)[None], ours)


@pytest.mark.parametrize("name", ["u1", "u2"])
def test_golden_features(golden_opens2s: Path, name: str) -> None:
    golden = np.load(golden_opens2s / "golden.npz")
    wav = load_wav(golden_opens2s / f"{name}.wav", strict=True)
    features, valid = audio_features(wav)
    assert np.abs(features - golden[f"{name}/input_features"]).max() < 1e-4
    assert valid == int(golden[f"{name}/feature_attention_mask"].sum())


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_against_analytic_sines(rate: int) -> None:
    seconds, freq = 1.0, 440.0
    t_in = np.arange(int(rate * seconds)) / rate
    out = resample(np.sin(2 * np.pi * freq * t_in).astype(np.float32), rate, 16000)
    assert out.size == 16000
    t_out = np.arange(out.size) / 16000
    core = slice(400, -400)  # away from the zero-padded edges
    assert np.abs(out[core] - np.sin(2 * np.pi * freq * t_out[core])).max() < 2e-3
    if rate > 16000:  # a tone above the new Nyquist must be removed, not aliased
        alias = resample(np.sin(2 * np.pi * 9500 * t_in).astype(np.float32), rate, 16000)
        assert np.sqrt(np.mean(alias[core] ** 2)) < 0.01


def test_stereo_and_other_rates_are_converted_and_reported(tmp_path: Path, caplog) -> None:
    t = np.arange(44100) / 44100
    tone = 0.5 * np.sin(2 * np.pi * 300 * t)
    path = tmp_path / "stereo44k.wav"
    sf.write(path, np.stack([tone, tone], axis=1), 44100)
    with caplog.at_level("WARNING"):
        wav = load_wav(path)
    assert wav.shape == (16000,) and wav.dtype == np.float32
    assert "resampling 44100 Hz -> 16000 Hz" in caplog.text and "down-mixing 2 channels" in caplog.text
    with pytest.raises(AudioInputError, match="stereo44k.wav has 2 channels; expected mono"):
        load_wav(path, strict=True)
    mono = tmp_path / "mono8k.wav"
    sf.write(mono, tone[:8000], 8000)
    with pytest.raises(AudioInputError, match="mono8k.wav is 8000 Hz; expected 16000 Hz"):
        load_wav(mono, strict=True)


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(AudioInputError, match="nothing.wav does not exist"):
        load_wav(tmp_path / "nothing.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioInputError, match="empty.wav is empty"):
        load_wav(tmp_path / "empty.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(AudioInputError, match="junk.wav is corrupt or not a supported format"):
        load_wav(tmp_path / "junk.wav")
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioInputError, match="zero.wav holds no samples"):
        load_wav(tmp_path / "zero.wav")


def test_frontend_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; import numpy as np; "
            "from opens2s_edge.runtime.audio import audio_features; "
            "f, n = audio_features(np.zeros(16000, np.float32)); assert f.shape == (1, 128, 3000) and n == 100")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
