"""Per-component timing of a running pipeline, by wrapping the callables it already calls on one object.

A peer's own objects (an onnxruntime session wrapper, a PyTorch module, a token2wav backend) get an instance
attribute that times the original method and forwards to it; nothing else about the pipeline changes, so the
turn measured is the turn a user runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Call:
    """One decoder call. A decode step is a single position unless the pipeline says otherwise (`step`):
    the TTS LM's first input is one position but a feed, not a sampled token."""

    positions: int
    seconds: float
    step: bool | None = None

    @property
    def is_step(self) -> bool:
        return self.positions == 1 if self.step is None else self.step


@dataclass
class Chunk:
    """One token2wav chunk: a flow encoder call, the estimator calls of its Euler solve, the vocoder call after."""

    tokens_so_far: int
    encode_s: float
    window_tokens: int
    estimator_s: float = 0.0
    estimator_calls: int = 0
    estimator_frames: int = 0
    hift_s: float = 0.0
    hift_calls: int = 0

    @property
    def seconds(self) -> float:
        return self.encode_s + self.estimator_s + self.hift_s

    def to_json(self) -> dict[str, Any]:
        return {"tokens_so_far": self.tokens_so_far, "window_tokens": self.window_tokens,
                "estimator_frames": self.estimator_frames, "encode_s": self.encode_s,
                "estimator_s": self.estimator_s, "estimator_calls": self.estimator_calls, "hift_s": self.hift_s,
                "hift_calls": self.hift_calls, "seconds": self.seconds}


@dataclass
class TurnTimings:
    """Everything one turn's wrapped callables saw. `units_pushed` is kept current by the peer so a chunk
    knows where in the response it ends."""

    audio_encoder_s: float = 0.0
    llm: list[Call] = field(default_factory=list)
    tts: list[Call] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    units_pushed: int = 0

    def components(self) -> dict[str, Any]:
        prefill = [c for c in self.llm if not c.is_step]
        llm_steps = [c for c in self.llm if c.is_step]
        tts_steps = [c for c in self.tts if c.is_step]
        tts_feeds = [c for c in self.tts if not c.is_step]
        return {
            "audio_encoder_s": self.audio_encoder_s,
            "llm_prefill_s": prefill[0].seconds if prefill else None,
            "llm_prefill_positions": prefill[0].positions if prefill else None,
            "llm_decode_steps": len(llm_steps),
            "llm_decode_s": sum(c.seconds for c in llm_steps),
            "llm_decode_tok_s": _rate(llm_steps),
            "tts_decode_steps": len(tts_steps),
            "tts_decode_s": sum(c.seconds for c in tts_steps),
            "tts_decode_tok_s": _rate(tts_steps),
            "tts_feed_calls": len(tts_feeds),
            "tts_feed_s": sum(c.seconds for c in tts_feeds),
            "token2wav_chunks": [c.to_json() for c in self.chunks],
        }


def _rate(calls: list[Call]) -> float | None:
    total = sum(c.seconds for c in calls)
    return len(calls) / total if calls and total > 0 else None


def wrap(obj: Any, name: str, record: Callable[[tuple, dict, Any, float], None]) -> None:
    """Replace `obj.name` by a timed forwarder; `record(args, kwargs, result, seconds)` sees each call."""
    original = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        record(args, kwargs, result, time.perf_counter() - t0)
        return result

    setattr(obj, name, timed)


class Recorder:
    """Holds the current turn's timings; the wrapped callables append to whichever turn is current."""

    def __init__(self) -> None:
        self.turn = TurnTimings()

    def new_turn(self) -> TurnTimings:
        self.turn = TurnTimings()
        return self.turn

    # -- hooks -------------------------------------------------------------------------------------
    def audio(self, _args: tuple, _kwargs: dict, _result: Any, seconds: float) -> None:
        self.turn.audio_encoder_s += seconds

    def decoder(self, which: str, positions: Callable[[tuple, dict], int]) -> Callable[..., None]:
        def record(args: tuple, kwargs: dict, _result: Any, seconds: float) -> None:
            getattr(self.turn, which).append(Call(positions(args, kwargs), seconds))
        return record

    def encode(self, args: tuple, _kwargs: dict, _result: Any, seconds: float) -> None:
        self.turn.chunks.append(Chunk(self.turn.units_pushed, seconds, len(args[0])))

    def estimate(self, args: tuple, _kwargs: dict, _result: Any, seconds: float) -> None:
        if self.turn.chunks:
            chunk = self.turn.chunks[-1]
            chunk.estimator_s += seconds
            chunk.estimator_calls += 1
            chunk.estimator_frames = int(args[0].shape[-1])

    def vocode(self, _args: tuple, _kwargs: dict, _result: Any, seconds: float) -> None:
        if self.turn.chunks:
            self.turn.chunks[-1].hift_s += seconds
            self.turn.chunks[-1].hift_calls += 1

    def instrument_token2wav(self, backend: Any, vocoder_owner: Any | None = None) -> None:
        """Time a token2wav backend's encode/estimate and the vocoder (on the backend or another object)."""
        wrap(backend, "encode", self.encode)
        wrap(backend, "estimate", self.estimate)
        wrap(vocoder_owner if vocoder_owner is not None else backend, "vocode", self.vocode)
