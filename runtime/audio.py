"""Audio in: read a file, make it 16 kHz mono, and compute the Whisper 128-bin log-mel (numpy only).

The log-mel equals transformers' WhisperFeatureExtractor (as OpenS2S calls it): audio is zero-padded to
a whole number of 30 s windows, the STFT is centred with reflect padding, and the dynamic range is
clamped to 8 (log10) below the maximum over the whole padded input.
"""

from __future__ import annotations

import logging
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

FRONTEND = {"sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS,
            "window_frames": WINDOW_FRAMES, "window_seconds": WINDOW_SECONDS}

log = logging.getLogger(__name__)


class AudioInputError(ValueError):
    """An audio input is missing, unreadable, empty, or not in the expected form."""


def load_wav(path: str | Path, expected_rate: int = SAMPLE_RATE, strict: bool = False) -> np.ndarray:
    """Read an audio file as float32 mono at `expected_rate`.

    Multi-channel audio is averaged to mono and another rate is resampled, both reported in the log;
    with `strict=True` either raises instead.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioInputError(f"audio file {path} does not exist")
    if path.stat().st_size == 0:
        raise AudioInputError(f"audio file {path} is empty (expected a wav/flac/ogg file)")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioInputError(f"audio file {path} is corrupt or not a supported format (wav/flac/ogg): {exc}") from exc
    if data.shape[0] == 0:
        raise AudioInputError(f"audio file {path} holds no samples")
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


@lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic, as torch.hann_window


def log_mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """(N_MELS, len(wav)//HOP) Whisper log-mel of an already padded waveform."""
    x = np.pad(np.asarray(wav, dtype=np.float64), (N_FFT // 2, N_FFT // 2), mode="reflect")
    n_frames = 1 + (len(x) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(x, shape=(n_frames, N_FFT), strides=(x.strides[0] * HOP, x.strides[0]))
    power = np.abs(np.fft.rfft(frames * _hann(), axis=1)) ** 2
    mel = power[:-1] @ mel_filters()  # Whisper drops the last frame
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).T.astype(np.float32)


def audio_features(wav: np.ndarray) -> tuple[np.ndarray, int]:
    """Model input for one utterance: (1, N_MELS, WINDOW_FRAMES * S) features and the valid frame count.

    S is the number of 30 s windows the audio needs; the encoder runs each window separately.
    """
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.size == 0:
        raise AudioInputError("audio has no samples")
    windows = -(-wav.size // WINDOW_SAMPLES)
    padded = np.zeros(windows * WINDOW_SAMPLES, dtype=np.float32)
    padded[: wav.size] = wav
    valid = -(-wav.size // HOP)
    return log_mel_spectrogram(padded)[None], valid
