"""Audio in: read a file, make it mono at the model's rate, and compute the Whisper log-mel (numpy only).

The log-mel equals transformers' WhisperFeatureExtractor (as OpenS2S calls it): audio is zero-padded to
a whole number of 30 s windows, the STFT is centred with reflect padding, and the dynamic range is
clamped to 8 (log10) below the maximum over the whole padded input. Its settings (`Frontend`) are read from
the checkpoint's `audio/preprocessor_config.json`; the constants below are the released model's values.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
N_MELS = 128
WINDOW_SECONDS = 30
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 480000
WINDOW_FRAMES = WINDOW_SAMPLES // HOP  # 3000

log = logging.getLogger(__name__)


class AudioInputError(ValueError):
    """An audio input is missing, unreadable, empty, or not in the expected form."""


class FrontendError(ValueError):
    """A feature extractor config this frontend does not compute."""


@dataclass(frozen=True)
class Frontend:
    """A WhisperFeatureExtractor's settings: the rate audio is brought to and the log-mel computed at."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = N_FFT
    hop: int = HOP
    n_mels: int = N_MELS
    window_seconds: int = WINDOW_SECONDS

    @property
    def window_samples(self) -> int:
        return self.window_seconds * self.sample_rate

    @property
    def window_frames(self) -> int:
        return self.window_samples // self.hop

    @classmethod
    def from_config(cls, config: dict, where: str = "preprocessor_config.json") -> Frontend:
        """From a preprocessor_config.json's fields; FrontendError names every setting we do not compute."""
        if not isinstance(config, dict):
            raise FrontendError(f"{where}: expected a JSON object")
        kind = config.get("feature_extractor_type", "WhisperFeatureExtractor")
        problems = [] if kind == "WhisperFeatureExtractor" else [
            f"feature_extractor_type {kind!r} (expected WhisperFeatureExtractor)"]
        fields = {"sample_rate": "sampling_rate", "n_fft": "n_fft", "hop": "hop_length", "n_mels": "feature_size",
                  "window_seconds": "chunk_length"}
        values = {}
        for name, key in fields.items():
            value = config.get(key, getattr(cls, name))
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{key} {value!r} (expected a positive integer)")
            values[name] = value
        for key in ("dither", "padding_value"):
            value = config.get(key, 0.0) or 0.0
            if not isinstance(value, (int, float)) or float(value) != 0.0:
                problems.append(f"{key} {value!r} (expected 0.0: the reference's features are deterministic)")
        if not problems and (values["window_seconds"] * values["sample_rate"]) % values["hop"]:
            problems.append(f"hop_length {values['hop']} does not divide the {values['window_seconds']} s window")
        if problems:
            raise FrontendError(f"{where}: " + "; ".join(problems))
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> Frontend:
        path = Path(path)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FrontendError(f"missing feature extractor config {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FrontendError(f"{path} is not a readable JSON file: {exc}") from exc
        return cls.from_config(config, str(path))

    def to_json(self) -> dict:
        """The bundle manifest's `audio` section (window_frames derived, written for readers)."""
        return {**asdict(self), "window_frames": self.window_frames}

    @classmethod
    def from_json(cls, d: dict) -> Frontend:
        return cls(**{k: d[k] for k in ("sample_rate", "n_fft", "hop", "n_mels", "window_seconds")})


DEFAULT_FRONTEND = Frontend()


def read_audio_file(path: str | Path) -> tuple[np.ndarray, int]:
    """An audio file's float32 samples (frames, channels) and its rate, or AudioInputError saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise AudioInputError(f"audio input {path} is a folder; expected a wav/flac/ogg file")
    if not path.is_file():
        raise AudioInputError(f"audio file {path} does not exist")
    if path.stat().st_size == 0:
        raise AudioInputError(f"audio file {path} is empty (expected a wav/flac/ogg file)")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except PermissionError as exc:
        raise AudioInputError(f"audio file {path} cannot be read: permission denied") from exc
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioInputError(f"audio file {path} is corrupt or not a supported format (wav/flac/ogg): {exc}") from exc
    if data.shape[0] == 0:
        raise AudioInputError(f"audio file {path} holds no samples")
    short = _wav_shortfall(path)
    if short:
        raise AudioInputError(f"audio file {path} is truncated: its header promises {short[0]} bytes of samples, "
                              f"the file holds {short[1]} (an interrupted copy or recording?)")
    return data, int(rate)


def _wav_shortfall(path: Path) -> tuple[int, int] | None:
    """(promised, present) sample bytes of a RIFF/WAVE file whose data chunk is cut short, else None. libsndfile
    reads what is there without a word, so the header is checked here."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            size = f.seek(0, 2)
    except OSError:
        return None
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos:pos + 4], struct.unpack("<I", head[pos + 4:pos + 8])[0]
        if chunk == b"data":
            present = size - (pos + 8)
            # 0 and 0xFFFFFFFF mark a stream whose length was never written back: nothing promised.
            return (length, present) if 0 < length < 0xFFFFFFFF and present < length else None
        pos += 8 + length + (length & 1)
    return None


def load_wav(path: str | Path, expected_rate: int = SAMPLE_RATE, strict: bool = False) -> np.ndarray:
    """Read an audio file as float32 mono at `expected_rate`.

    Multi-channel audio is averaged to mono and another rate is resampled, both reported in the log;
    with `strict=True` either raises instead.
    """
    path = Path(path)
    data, rate = read_audio_file(path)
    if data.shape[1] > 1:
        if strict:
            raise AudioInputError(f"audio file {path} has {data.shape[1]} channels; expected mono")
        log.warning("%s: down-mixing %d channels to mono", path, data.shape[1])
    wav = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if rate != expected_rate:
        if strict:
            raise AudioInputError(f"audio file {path} is {rate} Hz; expected {expected_rate} Hz")
        log.warning("%s: resampling %d Hz -> %d Hz", path, rate, expected_rate)
        wav = resample(wav, rate, expected_rate)
    return np.ascontiguousarray(wav, dtype=np.float32)


def resample(wav: np.ndarray, rate_in: int, rate_out: int, taps_per_side: int = 32) -> np.ndarray:
    """Band-limited polyphase resampling with a Kaiser-windowed sinc (anti-aliased when downsampling)."""
    if rate_in == rate_out:
        return wav.astype(np.float32, copy=True)
    g = gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    cutoff = min(1.0, rate_out / rate_in)  # relative to the input Nyquist
    n_out = int(np.ceil(len(wav) * rate_out / rate_in))
    half = int(np.ceil(taps_per_side / cutoff))
    offsets = np.arange(-half + 1, half + 1)
    # Output j sits at input position (j*down)/up = base + r/up; the r-th filter serves every such j.
    r = np.arange(up)
    t = offsets[None, :] - r[:, None] / up
    beta = 8.6
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (t / half) ** 2, 0.0, 1.0))) / np.i0(beta)
    kernels = cutoff * np.sinc(cutoff * t) * window
    padded = np.pad(wav.astype(np.float64), (half, half + 1))
    j = np.arange(n_out)
    base, phase = np.divmod(j * down, up)
    out = np.empty(n_out)
    step = 1 << 16  # bounded memory for long inputs
    for lo in range(0, n_out, step):
        sl = slice(lo, lo + step)
        idx = base[sl, None] + offsets[None, :] + half
        out[sl] = np.einsum("ij,ij->i", padded[idx], kernels[phase[sl]])
    return out.astype(np.float32)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), 200.0 * m / 3.0)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = SAMPLE_RATE) -> np.ndarray:
    """(n_fft//2+1, n_mels) Slaney-normalised triangular filters from 0 to 8 kHz (Whisper's bank)."""
    fft_freqs = np.linspace(0, rate // 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2))
    slopes = edges[None, :] - fft_freqs[:, None]
    widths = np.diff(edges)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    bank = np.maximum(0.0, np.minimum(down, up))
    return bank * (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[None, :]


@lru_cache(maxsize=4)
def _hann(n_fft: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic, as torch.hann_window


def log_mel_spectrogram(wav: np.ndarray, frontend: Frontend = DEFAULT_FRONTEND) -> np.ndarray:
    """(n_mels, len(wav)//hop) Whisper log-mel of an already padded waveform."""
    n_fft, hop = frontend.n_fft, frontend.hop
    x = np.pad(np.asarray(wav, dtype=np.float64), (n_fft // 2, n_fft // 2), mode="reflect")
    n_frames = 1 + (len(x) - n_fft) // hop
    frames = np.lib.stride_tricks.as_strided(x, shape=(n_frames, n_fft), strides=(x.strides[0] * hop, x.strides[0]))
    power = np.abs(np.fft.rfft(frames * _hann(n_fft), axis=1)) ** 2
    mel = power[:-1] @ mel_filters(frontend.n_mels, n_fft, frontend.sample_rate)  # Whisper drops the last frame
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).T.astype(np.float32)


def audio_features(wav: np.ndarray, frontend: Frontend = DEFAULT_FRONTEND) -> tuple[np.ndarray, int]:
    """Model input for one utterance: (1, n_mels, window_frames * S) features and the valid frame count.

    S is the number of windows the audio needs; the encoder runs each window separately.
    """
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.size == 0:
        raise AudioInputError("audio has no samples")
    if not np.isfinite(wav).all():
        raise AudioInputError(f"audio holds {int((~np.isfinite(wav)).sum())} NaN or Inf samples; expected "
                              "finite samples in [-1, 1]")
    windows = -(-wav.size // frontend.window_samples)
    padded = np.zeros(windows * frontend.window_samples, dtype=np.float32)
    padded[: wav.size] = wav
    valid = -(-wav.size // frontend.hop)
    return log_mel_spectrogram(padded, frontend)[None], valid
