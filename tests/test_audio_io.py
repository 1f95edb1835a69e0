"""Microphone and speaker through sounddevice: real where a device exists, the named error where none does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opens2s_edge.runtime.audio_io import AudioDeviceError, Speaker, record

REPO = Path(__file__).resolve().parents[1]


def _has_device(kind: str) -> bool:
    try:
        import sounddevice as sd

        info = sd.query_devices(kind=kind)
        return info["max_input_channels" if kind == "input" else "max_output_channels"] > 0
    except Exception:  # no PortAudio, no package or no device: all mean "cannot test for real here"
        return False


@pytest.mark.skipif(not _has_device("output"), reason="no audio output device on this machine")
def test_speaker_plays_chunks() -> None:
    with Speaker(22050) as speaker:
        for _ in range(3):
            speaker.play(np.zeros(2205, np.float32))


@pytest.mark.skipif(not _has_device("input"), reason="no microphone on this machine")
def test_microphone_records() -> None:
    audio = record(0.2)
    assert audio.shape == (3200,) and audio.dtype == np.float32


@pytest.mark.skipif(_has_device("output"), reason="this machine has a speaker: the no-device path cannot be shown")
def test_no_speaker_is_a_named_error(tiny_bundle: Path) -> None:
    with pytest.raises(AudioDeviceError, match="audio device|sounddevice|PortAudio"):
        Speaker(22050)
    run = subprocess.run([sys.executable, "-m", "opens2s_edge", "run", str(tiny_bundle), "--audio",
                          str(REPO / "opens2s_edge" / "assets" / "hello.wav"), "--play"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "audio device" in run.stderr or "sounddevice" in run.stderr or "PortAudio" in run.stderr


def test_reply_needs_a_destination(tiny_bundle: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "opens2s_edge", "run", str(tiny_bundle), "--audio",
                          str(REPO / "opens2s_edge" / "assets" / "hello.wav")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "--out FILE.wav and/or --play" in run.stderr
