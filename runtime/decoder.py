"""One decoder (the LLM or the TTS LM) for one sequence: its KV cache, position and limit, over any backend.

Every backend (onnxruntime, TensorRT, PyTorch) specializes `KVDecoder._run`, which feeds (T, D) input rows at
`start` into that sequence's cache and returns the last row of each result; everything else is here once: the
position, the cache limit (`ContextFull` before any work), embedding lookups in the graph's input dtype (bf16
tables widened the same way everywhere), and rolling back (`truncate`) for a conversation whose reply was cut.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from .dtypes import host_rows


class ContextFull(RuntimeError):
    """The KV cache has no room for the next positions: the turn stops here."""


class KVDecoder(ABC):
    """Per-sequence decoder state. `pos` rows of the cache are filled; rows at and after `pos` may hold stale
    values from a longer past, which every later step overwrites before it reads them (causal attention)."""

    def __init__(self, embed_table: np.ndarray, max_len: int, embed_dtype: type, hint: str = "--max-context"):
        self.embed_table = embed_table
        self.max_len = int(max_len)
        self.embed_dtype = embed_dtype
        self.pos = 0
        self._hint = hint

    def reset(self) -> None:
        self.pos = 0

    def truncate(self, pos: int) -> None:
        """Forget every position from `pos` on (a rollback: the rows stay, masked, until overwritten)."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot roll back to position {pos}: the cache holds {self.pos}")
        self.pos = pos

    def embed(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return host_rows(self.embed_table, np.asarray(ids, dtype=np.int64), self.embed_dtype)

    def run(self, embeds: np.ndarray) -> dict[str, np.ndarray]:
        """Feed (T, D) rows at the current position; the last row of each output ("logits", "hidden") as float32."""
        t = embeds.shape[0]
        if self.pos + t > self.max_len:
            raise ContextFull(f"the turn needs {self.pos + t} positions but the cache holds {self.max_len} "
                              f"(export with a larger {self._hint})")
        out = self._run(np.ascontiguousarray(embeds, dtype=self.embed_dtype), self.pos)
        self.pos += t
        return out

    def feed_token(self, token: int) -> dict[str, np.ndarray]:
        """One generated token at the current position (a backend may embed it on the device instead)."""
        return self.run(self.embed([token]))

    @abstractmethod
    def _run(self, embeds: np.ndarray, start: int) -> dict[str, np.ndarray]:
        """The backend's step: rows `embeds` at positions start.. into this sequence's cache."""
