"""The interleaved M:N decode: for every M text tokens the LLM produces, the TTS LM reads the M hidden
states that predicted them and writes N speech tokens; once text ends, speech runs to EOS or budget.

The schedule is written once, over two small decoder protocols, and serves both the PyTorch pipeline
(training/generate.py) and the onnxruntime runtime. Its control flow follows the reference
`OmniSpeechModel.generate(units_gen=True)` so that greedy decoding reproduces the reference's ids:
- the hidden state fed to the TTS LM for a text token is the one whose logits picked that token;
- the speech budget running out ends the turn, even if text has not ended;
- in a chunk before text ends, a speech EOS ends that chunk early and decoding goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .sampling import Sampler


class TextDecoder(Protocol):
    """The LLM. `prefill` consumes the prompt; `step` feeds one token. Both return the logits row and
    the final-norm hidden state at the last position."""

    def prefill(self) -> tuple[np.ndarray, np.ndarray]: ...

    def step(self, token: int) -> tuple[np.ndarray, np.ndarray]: ...


class SpeechDecoder(Protocol):
    """The TTS LM. `start` feeds the speaker input; `feed_hidden` projects LLM hidden states
    (llm2tts + llm_ln) and feeds them; `step` feeds one speech token. Each returns the last logits row."""

    def start(self) -> None: ...

    def feed_hidden(self, hidden: np.ndarray) -> np.ndarray: ...

    def step(self, token: int) -> np.ndarray: ...


def parse_strategy(strategy: str) -> tuple[int, int]:
    """OpenS2S's `interleave_strategy` "M:N": M text tokens' hidden states in, N speech tokens out."""
    try:
        m, n = (int(x) for x in str(strategy).split(":"))
    except ValueError as exc:
        raise ValueError(f"interleave_strategy must look like 'M:N', got {strategy!r}") from exc
    if m < 1 or n < 1:
        raise ValueError(f"interleave_strategy needs M, N >= 1, got {strategy!r}")
    return m, n


@dataclass(frozen=True)
class Event:
    kind: str  # "text" or "speech"
    token: int
    round: int  # the interleave round: text chunk r's hidden states produce speech chunk r


@dataclass
class InterleaveConfig:
    text_span: int  # M
    speech_span: int  # N
    max_text_tokens: int
    max_speech_tokens: int
    text_eos_ids: tuple[int, ...]
    speech_eos_ids: tuple[int, ...]

    @classmethod
    def from_strategy(cls, strategy: str, **kwargs: object) -> InterleaveConfig:
        m, n = parse_strategy(strategy)
        return cls(text_span=m, speech_span=n, **kwargs)  # type: ignore[arg-type]


@dataclass
class InterleaveResult:
    text_ids: list[int] = field(default_factory=list)
    speech_ids: list[int] = field(default_factory=list)  # as sampled, EOS included


def interleave(text: TextDecoder, speech: SpeechDecoder, cfg: InterleaveConfig, text_sampler: Sampler,
               speech_sampler: Sampler, result: InterleaveResult | None = None) -> Iterator[Event]:
    """Run one turn, yielding each token as soon as it is chosen. Fills `result` if given."""
    result = result if result is not None else InterleaveResult()
    text_left, speech_left = cfg.max_text_tokens, cfg.max_speech_tokens
    logits, hidden = text.prefill()
    speech.start()
    text_done = text_left < 1
    rnd = -1
    while not text_done:
        rnd += 1
        chunk_hidden = []
        for _ in range(min(cfg.text_span, text_left)):
            token = text_sampler(logits)
            chunk_hidden.append(hidden)
            result.text_ids.append(token)
            text_left -= 1
            yield Event("text", token, rnd)
            if token in cfg.text_eos_ids or text_left < 1:
                text_done = True
                break
            logits, hidden = text.step(token)
        budget = speech_left if text_done else min(cfg.speech_span, speech_left)
        if budget < 1:
            return
        speech_logits = speech.feed_hidden(np.stack(chunk_hidden))
        for i in range(budget):
            token = speech_sampler(speech_logits)
            result.speech_ids.append(token)
            speech_left -= 1
            yield Event("speech", token, rnd)
            if text_done and (token in cfg.speech_eos_ids or i == budget - 1):
                return
            # Every speech token is fed back, EOS included, as the reference does before the next chunk.
            speech_logits = speech.step(token)
            if token in cfg.speech_eos_ids:
                break
