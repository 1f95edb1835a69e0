"""The reference worker's streaming token2wav, reproduced: for parity tests and as the benchmarks' reference peer.

What `ModelWorker.generate_stream` does with the units it receives (OpenS2S model_worker.py with
flow_inference.AudioDecoder.token2wav), on our modules:
- every 24 units, one call: the flow re-encodes *all* units so far, the new ones after the earlier ones as its
  prompt, with every mel it returned before as the prompt condition (so a chunk's cost grows with the reply);
- the mel's first 34 frames are cross-faded (Hamming) with the previous call's held-back last 34 frames;
- the previous call's last vocoded mel frame is prepended, and the first 256 source samples are replaced by the
  previous call's last 256 (HiFT's cache), then all but the last 34 frames are vocoded and the audio's last 256
  samples dropped;
- a final call (`finalize`) for the units left over vocodes everything.

Its known defects come out exactly (../shared/golden/README.md): the returned mel includes the duplicated cache
frame, so each later prompt is one frame too long and k non-final chunks lose k-1 frames; a unit count that is a
multiple of 24 never gets its final call (34 frames never vocoded); under 24 units there is no audio at all (the
reference's single call fails on `prompt_feat=None`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from opens2s_edge.runtime.token2wav_stream import solve_flow, validate_tokens

from .decoder import Token2Wav

BLOCK_TOKENS = 24  # the worker's block_size
TOKEN_OVERLAP = 5  # AudioDecoder.token_overlap_len
MEL_CACHE_FRAMES = 1
SOURCE_CACHE_SAMPLES = 256  # AudioDecoder.source_cache_len: mel_cache_len * 256, a literal in the reference

Noise = Callable[[int, int], np.ndarray]  # (call index, frames) -> (mel_bins, frames) initial flow noise


class ReferenceStream:
    """One reply through the reference's streaming schedule; `push` units, then `finish`. Deterministic source
    (no phase or noise draws), as the golden data records it; `noise` gives each call's initial flow noise."""

    def __init__(self, decoder: Token2Wav, noise: Noise | None = None, seed: int = 0):
        self.decoder = decoder
        spec = decoder.spec
        self.mel_overlap = int(TOKEN_OVERLAP / spec.token_rate * 22050 / 256)
        self.window = np.hamming(2 * self.mel_overlap)
        rng = np.random.default_rng(seed)
        self.noise = noise or (lambda _call, frames: rng.standard_normal((spec.mel_bins, frames)).astype(np.float32))
        self.units: list[int] = []  # units not yet sent to token2wav
        self.prompt_tokens = np.zeros(0, np.int64)
        self.returned_mels: list[np.ndarray] = []
        self.overlap: np.ndarray | None = None
        self.cache: tuple[np.ndarray, torch.Tensor] | None = None  # (last mel frame, last source samples)
        self.calls = 0
        self.flow_mels: list[np.ndarray] = []  # each call's whole flow output, prompt frames included

    def push(self, units: np.ndarray | list[int]) -> list[np.ndarray]:
        """Add units; returns the audio chunks the worker would have yielded meanwhile."""
        out = []
        for u in validate_tokens(units, self.decoder.spec.vocab_size, allow_empty=True).tolist():
            self.units.append(u)
            if len(self.units) >= BLOCK_TOKENS:
                out.append(self._token2wav(finalize=False))
        return out

    def finish(self) -> np.ndarray:
        """The worker's last record: the audio of the units left over, or nothing (none left, or no earlier call)."""
        if not self.units or not self.returned_mels:
            return np.zeros(0, np.float32)
        return self._token2wav(finalize=True)

    def _token2wav(self, finalize: bool) -> np.ndarray:
        tokens = np.asarray(self.units, np.int64)
        self.units = []
        prompt_feat = np.concatenate(self.returned_mels, axis=1) if self.returned_mels else None
        mel = self._flow(tokens, prompt_feat)
        self.prompt_tokens = np.concatenate([self.prompt_tokens, tokens])
        if self.overlap is not None:
            n = self.mel_overlap
            faded = mel[:, :n].astype(np.float64) * self.window[:n] + self.overlap[:, -n:] * self.window[n:]
            mel[:, :n] = faded.astype(np.float32)
        cache_source = None
        if self.cache is not None:
            mel = np.concatenate([self.cache[0], mel], axis=1)
            cache_source = self.cache[1]
        if not finalize:
            self.overlap = mel[:, -self.mel_overlap:].copy()
            mel = mel[:, : -self.mel_overlap]
        wav, source = self._vocode(mel, cache_source)
        if not finalize:
            self.cache = (mel[:, -MEL_CACHE_FRAMES:].copy(), source[:, :, -SOURCE_CACHE_SAMPLES:].clone())
            wav = wav[:-SOURCE_CACHE_SAMPLES]
            self.returned_mels.append(mel)
        self.calls += 1
        return wav

    def _flow(self, tokens: np.ndarray, prompt_feat: np.ndarray | None) -> np.ndarray:
        d = self.decoder
        spec = d.spec
        everything = np.concatenate([self.prompt_tokens, tokens])
        mu, spks = d.backend.encode(everything, np.zeros(spec.spk_dim, np.float32))
        cond = np.zeros_like(mu)
        n_prompt = 0 if prompt_feat is None else prompt_feat.shape[1]
        if n_prompt:
            cond[:, :n_prompt] = prompt_feat[:, : mu.shape[1]]
        mel = solve_flow(d.backend.estimate, mu, spks, cond, self.noise(self.calls, mu.shape[1]),
                         n_steps=spec.n_timesteps, cfg_rate=spec.cfg_rate, scheduler=spec.t_scheduler)
        self.flow_mels.append(mel)
        return mel[:, n_prompt:].copy()

    def _vocode(self, mel: np.ndarray, cache_source: torch.Tensor | None) -> tuple[np.ndarray, torch.Tensor]:
        hift = self.decoder.hift
        p = next(hift.parameters())
        with torch.inference_mode():
            m = torch.from_numpy(np.ascontiguousarray(mel)).to(p.device, p.dtype)[None]
            sines = torch.zeros(1, hift.n_sines, 1, device=p.device, dtype=p.dtype)
            noise = torch.zeros(1, hift.n_sines, m.shape[-1] * hift.hop, device=p.device, dtype=p.dtype)
            source, _ = hift.source(hift.f0_predictor(m), sines, noise)
            if cache_source is not None:
                source[:, :, : cache_source.shape[2]] = cache_source
            wav = hift.decode(m, source)
        return wav[0].float().cpu().numpy(), source
