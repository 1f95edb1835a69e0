"""Token sampling on a logits row (numpy): greedy, temperature, top-k, top-p, seeded.

One sampler serves the PyTorch pipeline and the onnxruntime runtime, so a seed gives the same reply on
both. A sampler may be restricted to a set of allowed ids (speech tokens + EOS for the TTS LM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


class Sampler:
    """Picks one id from a 1-D logits row. `allowed` is a contiguous id range plus extra ids."""

    def __init__(self, config: SamplingConfig, rng: np.random.Generator,
                 allowed_range: tuple[int, int] | None = None, allowed_extra: tuple[int, ...] = ()):
        self.config = config
        self.rng = rng
        self._mask: np.ndarray | None = None
        self._allowed_range = allowed_range
        self._allowed_extra = allowed_extra

    def _allowed_mask(self, vocab: int) -> np.ndarray | None:
        if self._allowed_range is None:
            return None
        if self._mask is None or self._mask.shape[0] != vocab:
            mask = np.zeros(vocab, dtype=bool)
            lo, hi = self._allowed_range
            mask[lo:hi] = True
            mask[list(self._allowed_extra)] = True
            self._mask = mask
        return self._mask

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        mask = self._allowed_mask(logits.shape[0])
        if mask is not None:
            logits = np.where(mask, logits, -np.inf)
        c = self.config
        if c.is_greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / c.temperature
        if c.top_k:
            k = min(c.top_k, scaled.shape[0])
            kth = np.partition(scaled, -k)[-k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if c.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
            keep = cumulative - probs[order] < c.top_p
            trimmed = np.zeros_like(probs)
            trimmed[order[keep]] = probs[order[keep]]
            probs = trimmed / trimmed.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))
