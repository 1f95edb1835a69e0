"""Audio on the wire: base64 pcm16 mono at 24 kHz (the Realtime API's `audio/pcm`), to and from the engine's rates
(16 kHz in, the vocoder's 22.05 kHz out), resampled with soxr (libsoxr's streaming resampler: its chunked output
equals its one-shot output, so how a client slices its audio does not change what the model hears)."""

from __future__ import annotations

import base64
import binascii
from types import ModuleType

import numpy as np

WIRE_RATE = 24_000  # the only rate the Realtime API's audio/pcm format has
WIRE_FORMAT = {"type": "audio/pcm", "rate": WIRE_RATE}


class WireAudioError(ValueError):
    """A client's audio payload is not base64 pcm16."""


def _soxr() -> ModuleType:  # imported where audio is first converted: `serve` is an optional extra
    try:
        import soxr
    except ModuleNotFoundError as exc:
        raise RuntimeError("the server resamples with soxr: pip install 'opens2s-edge[serve]'") from exc
    return soxr


def decode_pcm16(payload: object) -> np.ndarray:
    """base64 little-endian int16 mono -> float32 in [-1, 1)."""
    if not isinstance(payload, str):
        raise WireAudioError("audio must be a base64 string of pcm16 samples")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WireAudioError(f"audio is not valid base64 ({exc})") from None
    if len(raw) % 2:
        raise WireAudioError(f"audio holds {len(raw)} bytes; pcm16 needs an even number")
    return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0


def encode_pcm16(samples: np.ndarray) -> str:
    """float32 -> base64 little-endian int16 (clipped, rounded)."""
    pcm = np.clip(np.rint(np.asarray(samples, np.float32) * 32767.0), -32768, 32767).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """One whole signal from `rate_in` to `rate_out` (float32 mono)."""
    samples = np.asarray(samples, np.float32).reshape(-1)
    if rate_in == rate_out or samples.size == 0:
        return samples
    return np.asarray(_soxr().resample(samples, rate_in, rate_out), np.float32)


class StreamResampler:
    """A stream from `rate_in` to `rate_out` fed in any pieces; `flush()` returns the filter's tail at the end."""

    def __init__(self, rate_in: int, rate_out: int):
        self.rate_in, self.rate_out = rate_in, rate_out
        self._stream = None if rate_in == rate_out else _soxr().ResampleStream(rate_in, rate_out, 1, dtype="float32")

    def push(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, np.float32).reshape(-1)
        if self._stream is None:
            return samples
        return np.asarray(self._stream.resample_chunk(samples), np.float32)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, np.float32)
        return np.asarray(self._stream.resample_chunk(np.zeros(0, np.float32), last=True), np.float32)


class ReplyEncoder:
    """One reply's audio: engine chunks (float32 at the vocoder's rate) -> base64 pcm16 deltas at 24 kHz. Tests and
    benchmarks run the same conversion on an engine's own chunks to compare bytes with what a client received."""

    def __init__(self, rate_in: int):
        self._resampler = StreamResampler(rate_in, WIRE_RATE)

    def push(self, pcm: np.ndarray) -> str:
        return encode_pcm16(self._resampler.push(pcm))

    def flush(self) -> str:
        return encode_pcm16(self._resampler.flush())


__all__ = ["WIRE_FORMAT", "WIRE_RATE", "ReplyEncoder", "StreamResampler", "WireAudioError", "decode_pcm16",
           "encode_pcm16", "resample"]
