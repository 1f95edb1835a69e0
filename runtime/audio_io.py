"""Microphone in, speaker out (sounddevice / PortAudio), for the on-device voice assistant.

Optional: `pip install opens2s-edge[audio]` and the system's PortAudio (Debian: libportaudio2; Jetson:
`apt install libportaudio2`). Without them, or without a device, the errors say which is missing.
"""

from __future__ import annotations

from types import ModuleType, TracebackType

import numpy as np


class AudioDeviceError(RuntimeError):
    """No usable audio device, or the sounddevice/PortAudio stack is not installed."""


def _sounddevice() -> ModuleType:
    try:
        import sounddevice
    except ImportError as exc:
        raise AudioDeviceError("microphone/speaker need the sounddevice package: "
                               "pip install 'opens2s-edge[audio]'") from exc
    except OSError as exc:  # sounddevice imports but cannot find the PortAudio library
        raise AudioDeviceError(f"PortAudio is not installed ({exc}); on Debian/Ubuntu/JetPack: "
                               "apt install libportaudio2") from exc
    return sounddevice


def _device(kind: str) -> int:
    sd = _sounddevice()
    try:
        info = sd.query_devices(kind=kind)
    except sd.PortAudioError as exc:
        raise AudioDeviceError(f"no {kind} audio device available: {exc}") from exc
    channels = info["max_input_channels"] if kind == "input" else info["max_output_channels"]
    if channels < 1:
        raise AudioDeviceError(f"the default {kind} device {info['name']!r} has no {kind} channels")
    return int(info["index"])


def record(seconds: float, sample_rate: int = 16_000) -> np.ndarray:
    """Record mono float32 from the default microphone (blocking)."""
    if not 0 < seconds <= 600:
        raise ValueError(f"recording length must be in (0, 600] seconds, got {seconds}")
    sd = _sounddevice()
    device = _device("input")
    frames = int(round(seconds * sample_rate))
    audio = sd.rec(frames, samplerate=sample_rate, channels=1, dtype="float32", device=device)
    sd.wait()
    return np.ascontiguousarray(audio[:, 0])


class Speaker:
    """Plays PCM chunks as they arrive on the default output device (a context manager)."""

    def __init__(self, sample_rate: int):
        sd = _sounddevice()
        self._stream = sd.OutputStream(samplerate=sample_rate, channels=1, dtype="float32",
                                       device=_device("output"))
        self.written, self._rate = 0, sample_rate

    def __enter__(self) -> Speaker:
        self._stream.start()
        return self

    def play(self, pcm: np.ndarray) -> None:
        # Blocking write: PortAudio queues what the device has not played yet, so chunks play back to back.
        self._stream.write(np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1, 1))
        self.written += pcm.size

    @property
    def played(self) -> int:
        """Samples the device has played (written minus what its output latency still holds): what was heard."""
        return max(0, self.written - int(self._stream.latency * self._rate))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stream.stop()
        self._stream.close()


class Microphone:
    """The default input device as a stream of float32 mono blocks (a context manager); `read()` returns what
    arrived since the last call without waiting, `wait(seconds)` blocks until something arrives."""

    def __init__(self, sample_rate: int = 16_000, block: int = 512):
        import queue

        sd = _sounddevice()
        self._queue: queue.Queue[np.ndarray] = queue.Queue()
        self.sample_rate = sample_rate

        def callback(data: np.ndarray, _frames: int, _time: object, _status: object) -> None:
            self._queue.put(data[:, 0].copy())

        self._stream = sd.InputStream(samplerate=sample_rate, channels=1, dtype="float32", blocksize=block,
                                      device=_device("input"), callback=callback)

    def __enter__(self) -> Microphone:
        self._stream.start()
        return self

    def read(self) -> np.ndarray:
        import queue

        blocks = []
        while True:
            try:
                blocks.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)

    def wait(self, seconds: float = 0.1) -> np.ndarray:
        import queue

        try:
            first = self._queue.get(timeout=seconds)
        except queue.Empty:
            return np.zeros(0, np.float32)
        return np.concatenate([first, self.read()])

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stream.stop()
        self._stream.close()
