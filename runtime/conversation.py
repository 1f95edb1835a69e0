"""A conversation: everything per user, on a shared `Engine`, and the one turn loop every backend runs.

Each turn renders the whole history with the checkpoint's chat template as the reference worker renders its
`messages`, then prefills only the positions after the longest common prefix of what the LLM cache holds and the
new prompt (earlier audio is never re-encoded: its embeddings stay with the message). The TTS LM starts afresh
every reply (the speaker input, then this reply's hidden states).

Barge-in: `Turn.cancel()` (or closing the turn's iterator) stops the turn at the next token. The reply kept in
the history is the text that belongs to the audio delivered: the schedule pairs text chunk r with speech chunk r,
so the text of every round up to the one whose speech was last heard. The LLM cache is rolled back to the end of
that text, and the next turn continues from what the user heard.

When the history no longer fits the context, the oldest messages are dropped (the system prompt stays) and the
prompt re-rendered; the turn reports it (`HistoryTrimmed`).
"""

from __future__ import annotations

import itertools
import json
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .audio import AudioInputError, load_wav
from .decoder import ContextFull
from .decoding import interleave_config, make_samplers
from .engine import (
    AudioChunk,
    Engine,
    HistoryTrimmed,
    Latency,
    OnStep,
    SpeechToken,
    StepTiming,
    TextDelta,
    Trace,
    TurnDone,
    TurnOptions,
)
from .files import atomic_file
from .interleave import InterleaveResult, interleave
from .prompt import AUDIO_PLACEHOLDER_ID, SPEECH_TOKEN_FORMAT, MessageError
from .token2wav_stream import Token2WavStream


class ConversationError(ValueError):
    """A turn or a history the conversation cannot take (no input, a malformed message)."""


@dataclass
class AudioPart:
    wav: np.ndarray  # mono at the engine's frontend rate
    uid: int
    embeds: np.ndarray | None = None  # the adapter's rows, computed once


@dataclass
class Message:
    role: str
    parts: list[str | AudioPart]  # text and audio in order (an assistant reply: its text)
    speech_units: list[int] = field(default_factory=list)  # an assistant reply's units, for saving

    def content(self) -> str | list[dict]:
        """The reference worker's message content."""
        if self.role != "user":
            return "".join(p for p in self.parts if isinstance(p, str))
        return [{"audio": True} if isinstance(p, AudioPart) else {"text": p} for p in self.parts]


Key = tuple  # one LLM position: ("t", token id) or ("a", audio uid, row)


class Conversation:
    """One user's state: KV caches and positions, history, speaker; turns one at a time."""

    def __init__(self, engine: Engine, system_prompt: str, speaker: np.ndarray | None = None,
                 history: Sequence[Any] = ()):
        self.engine = engine
        self.system_prompt = system_prompt
        self._uids = itertools.count()
        self.speaker = speaker
        self._speaker_input = engine.speaker_input(speaker)
        self.history: list[Message] = [self._message(m, i) for i, m in enumerate(history)]
        self.llm = engine.backend.decoder("llm", engine.llm_embed)
        self.tts = engine.backend.decoder("tts_lm", engine.tts_embed)
        self.cached: list[Key] = []  # what the LLM cache holds, position by position
        # Weak: a Turn refers to its conversation, and a strong link back would make every conversation a cycle that
        # only the cycle collector frees (with its caches) after the client has gone.
        self._current: weakref.ref[Turn] | None = None

    @property
    def current(self) -> Turn | None:
        """The turn in progress or last run, while its consumer still holds it."""
        return self._current() if self._current is not None else None

    # -- state --------------------------------------------------------------------------------------------
    def reset(self, system_prompt: str | None = None) -> None:
        """Forget the history (the caches stay allocated; their rows are overwritten)."""
        if system_prompt is not None:
            self.system_prompt = system_prompt
        self.history = []
        self.cached = []
        self.llm.reset()
        self._current = None

    def set_speaker(self, speaker: np.ndarray | None) -> None:
        """The TTS LM's speaker vector (the training data's `spk_emb`, 512 values; None = the learned start)."""
        self._speaker_input = self.engine.speaker_input(speaker)
        self.speaker = speaker

    def add_message(self, message: dict) -> None:
        """Append one message in the reference worker's format to the history without answering it (a client that
        sends several user items before asking for a reply, or seeds earlier assistant turns)."""
        if self.current is not None and not self.current.finished:
            raise ConversationError("a turn of this conversation is still running: finish or cancel it first")
        self.history.append(self._message(message, len(self.history)))

    def messages(self) -> list[dict]:
        """The history in the reference worker's format (audio items as `{"audio": True}`)."""
        return [{"role": m.role, "content": m.content()} for m in self.history]

    def _message(self, m: Any, index: int) -> Message:
        """A history entry from the worker's format; audio items hold samples (at the frontend's rate) or a path."""
        if isinstance(m, Message):
            return m
        where = f"history message {index}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise ConversationError(f"{where}: expected {{'role': user|assistant|system, 'content': ...}}")
        content = m.get("content", "")
        items = [{"text": content}] if isinstance(content, str) else (
            [content] if isinstance(content, dict) else content)
        if not isinstance(items, list):
            raise ConversationError(f"{where}: content must be a string, an item or a list of items")
        parts: list[str | AudioPart] = []
        for j, item in enumerate(items):
            if not isinstance(item, dict):
                raise ConversationError(f"{where}: item {j} must be an object with 'audio' and/or 'text'")
            audio = item.get("audio")
            if audio is not None and not (isinstance(audio, str) and not audio):
                wav = load_wav(audio, self.engine.frontend.sample_rate) if isinstance(audio, (str, Path)) \
                    else np.asarray(audio, np.float32).reshape(-1)
                self.engine.check_audio(wav)
                parts.append(AudioPart(wav, next(self._uids)))
            elif item.get("text"):
                parts.append(str(item["text"]))
        return Message(m["role"], parts)

    # -- a turn ---------------------------------------------------------------------------------------------
    def turn(self, audio: np.ndarray | None = None, text: str = "", options: TurnOptions | None = None,
             on_step: OnStep | None = None) -> Turn:
        """The user says `audio` (mono samples at the frontend's rate) and/or types `text`; returns the turn's
        event stream. The input is checked now; the work happens as the events are consumed."""
        if self.current is not None and not self.current.finished:
            raise ConversationError("a turn of this conversation is still running: finish or cancel it first")
        parts: list[str | AudioPart] = []
        if audio is not None:
            wav = np.asarray(audio, np.float32).reshape(-1)
            self.engine.check_audio(wav)
            parts.append(AudioPart(wav, next(self._uids)))
        if text:
            parts.append(text)
        if not parts:
            raise ConversationError("a turn needs audio or text from the user")
        turn = Turn(self, Message("user", parts), options or TurnOptions(), on_step)
        self._current = weakref.ref(turn)
        return turn

    def _render(self, history: list[Message]) -> tuple[list[int], list[Key]]:
        prompt_ids = self.engine.prompt.encode([{"role": m.role, "content": m.content()} for m in history],
                                               self.system_prompt or None)
        audio = iter(p for m in history for p in m.parts if isinstance(p, AudioPart))
        keys: list[Key] = []
        for i in prompt_ids:
            if i == AUDIO_PLACEHOLDER_ID:
                part = next(audio)
                keys.extend(("a", part.uid, r) for r in range(part.embeds.shape[0]))
            else:
                keys.append(("t", i))
        return prompt_ids, keys

    def _rows(self, keys: list[Key], parts: dict[int, AudioPart]) -> np.ndarray:
        """The LLM input rows of `keys`: token embeddings, and each audio's adapter rows."""
        pieces, run = [], []
        for key in keys:
            if key[0] == "t":
                run.append(key[1])
                continue
            if run:
                pieces.append(self.llm.embed(run))
                run = []
            pieces.append(parts[key[1]].embeds[key[2]:key[2] + 1].astype(self.llm.embed_dtype))
        if run:
            pieces.append(self.llm.embed(run))
        return np.concatenate(pieces)

    def save(self, path: str | Path) -> Path:
        """The history as one row of the reference's messages jsonl (the training data format), each user audio
        beside it as `<name>_<k>.wav`; written atomically."""
        import soundfile as sf

        path = Path(path)
        rate = self.engine.frontend.sample_rate
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        k = 0
        for m in self.history:
            if m.role != "user":
                units = "".join(SPEECH_TOKEN_FORMAT.format(u) for u in m.speech_units)
                messages.append({"role": m.role, "content": [{"text": m.content(), "audio": "",
                                                              "speech_units": units, "spk_emb": ""}]})
                continue
            items = []
            for p in m.parts:
                if isinstance(p, AudioPart):
                    name = f"{path.stem}_{k}.wav"
                    with atomic_file(path.parent / name) as tmp:
                        sf.write(tmp, p.wav, rate, subtype="FLOAT")
                    items.append({"text": "", "audio": name, "speech_units": "", "spk_emb": ""})
                    k += 1
                else:
                    items.append({"text": p, "audio": "", "speech_units": "", "spk_emb": ""})
            messages.append({"role": "user", "content": items})
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"messages": messages}, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


@dataclass
class _TurnState:
    """What a Turn and its generator share (the generator holds this, never the Turn)."""

    cancelled: bool = False
    finished: bool = False
    delivered_samples: int | None = None  # how much of the reply audio the user heard (None: all of it)


class Turn:
    """One turn's events (TextDelta, SpeechToken, AudioChunk, HistoryTrimmed, then TurnDone). `cancel()` stops it
    at the next token; `delivered_samples` says how much of the reply audio the user heard (default: all of it
    that was yielded)."""

    def __init__(self, conv: Conversation, user: Message, options: TurnOptions, on_step: OnStep | None):
        self.conv, self.user, self.options, self.on_step = conv, user, options, on_step
        self.state = _TurnState()
        self._events = self._run(conv, user, options, on_step, self.state)

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def cancelled(self) -> bool:
        return self.state.cancelled

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        try:
            event = next(self._events)
            if isinstance(event, TurnDone):
                # Consumers stop at TurnDone: end the generator now, or its frame (prompt, pieces, trace) and the Turn
                # hold each other until the cycle collector runs, which a server may not do for many turns.
                self._events.close()
            return event
        except StopIteration:
            raise
        except Exception:
            # A turn that failed (a backend error, the prompt alone over the context) is over: the conversation takes
            # the next one; the failed user message is not kept in the history.
            self.state.finished = True
            raise

    def cancel(self, delivered_samples: int | None = None) -> TurnDone | None:
        """Barge-in: stop now and keep in the history only what was heard. Returns the final TurnDone."""
        self.state.cancelled = True
        self.state.delivered_samples = delivered_samples
        done = None
        for event in self._events:  # runs the loop to its cancel check, then the rollback
            if isinstance(event, TurnDone):
                done = event
        return done

    def close(self) -> None:
        if not self.finished:
            self.cancel()

    @staticmethod
    def _run(conv: Conversation, user: Message, options: TurnOptions, on_step: OnStep | None,
             state: _TurnState) -> Iterator[Any]:
        # A static generator: its frame must not hold the Turn, or a turn dropped mid-reply would be a cycle.
        eng = conv.engine
        t0 = time.perf_counter()
        latency = Latency()
        timings: list[StepTiming] = []
        trace = Trace()

        def record(kind: str, positions: int, started: float) -> None:
            now = time.perf_counter()
            timing = StepTiming(kind, positions, started - t0, now - started)
            timings.append(timing)
            if on_step is not None:
                on_step(timing)

        # 1. The new audio: encoded once, kept with its message.
        for part in user.parts:
            if isinstance(part, AudioPart) and part.embeds is None:
                started = time.perf_counter()
                part.embeds = eng.encode_audio(part.wav)
                record("audio", int(part.embeds.shape[0]), started)
                trace.audio_embeds.append(part.embeds)
        for m in conv.history:  # a history given at construction: its audio too, once
            for part in m.parts:
                if isinstance(part, AudioPart) and part.embeds is None:
                    part.embeds = eng.encode_audio(part.wav)
        latency.encode_s = time.perf_counter() - t0

        # 2. The prompt of the whole history, trimmed from the oldest turn while it does not fit.
        cfg = interleave_config(eng.interleave_strategy, eng.defaults, options)
        reserve = min(max(cfg.max_text_tokens, 1), conv.llm.max_len // 4)
        history = [*conv.history, user]
        prompt_ids, keys = conv._render(history)
        dropped = 0
        while len(keys) + reserve > conv.llm.max_len and len(history) > 1:
            cut = 2 if len(history) > 2 and history[1].role != "user" else 1
            history, dropped = history[cut:], dropped + cut
            prompt_ids, keys = conv._render(history)
        if dropped:
            conv.history = history[:-1]
            yield HistoryTrimmed(time.perf_counter() - t0, dropped, len(history) - 1)
        if len(keys) >= conv.llm.max_len:
            raise ContextFull(f"the prompt alone needs {len(keys)} positions; the cache holds {conv.llm.max_len}")

        # 3. Reuse the cached prefix, prefill the rest.
        reused = 0
        for a, b in zip(conv.cached, keys, strict=False):
            if a != b:
                break
            reused += 1
        reused = min(reused, len(keys) - 1)  # the last prompt position is always run: its logits start the reply
        conv.llm.truncate(min(reused, conv.llm.pos))
        reused = conv.llm.pos
        conv.cached = conv.cached[:reused]
        parts = {p.uid: p for m in history for p in m.parts if isinstance(p, AudioPart)}
        rows = conv._rows(keys[reused:], parts)
        prompt_len = len(keys)
        text_side = _TextSide(conv, rows, keys[reused:], record, latency, trace)
        speech_side = _SpeechSide(conv, record, trace)

        # 4. The interleaved decode, streaming audio as speech tokens arrive.
        text_sampler, speech_sampler = make_samplers(options, eng.vocab)
        stream = Token2WavStream(eng.token2wav, options.stream, seed=options.seed) \
            if eng.token2wav is not None else None
        result = InterleaveResult()
        text_rounds: list[int] = []
        speech_rounds: list[int] = []  # the round of every voiced (non-eos) speech token
        pieces: list[np.ndarray] = []
        text_so_far = ""
        stopped = "budget"
        sample_rate = eng.sample_rate
        voiced = pushed = 0
        closed = False

        def emit_audio(pcm: np.ndarray, started: float) -> Iterator[AudioChunk]:
            nonlocal voiced
            record("token2wav", pushed - voiced, started)
            voiced = pushed
            if pcm.size:
                now = time.perf_counter() - t0
                if latency.first_audio_s is None:
                    latency.first_audio_s = now
                pieces.append(pcm)
                yield AudioChunk(now, pcm, sample_rate)

        schedule = interleave(text_side, speech_side, cfg, text_sampler, speech_sampler, result)
        try:
            for event in schedule:
                if state.cancelled:
                    stopped = "cancelled"
                    break
                now = time.perf_counter() - t0
                if event.kind == "text":
                    text_rounds.append(event.round)
                    if latency.first_text_s is None:
                        latency.first_text_s = now
                    if event.token in cfg.text_eos_ids:
                        stopped = "eos"
                    full = eng.prompt.decode(result.text_ids)
                    # A token may end inside a UTF-8 character: hold the text back until it completes.
                    delta = "" if full.endswith("\ufffd") else full[len(text_so_far):]
                    text_so_far += delta
                    yield TextDelta(now, event.token, delta)
                else:
                    yield SpeechToken(now, event.token)
                    if eng.vocab.is_eos(event.token):
                        continue
                    speech_rounds.append(event.round)
                    if stream is None:
                        continue
                    started = time.perf_counter()
                    pushed += 1
                    pcm = stream.push(eng.vocab.to_units([event.token]))
                    if pcm.size:
                        yield from emit_audio(pcm, started)
        except ContextFull:
            stopped = "context"
        except GeneratorExit:  # the consumer dropped the turn: a barge-in with what it had, nothing more yielded
            state.cancelled, stopped, closed = True, "cancelled", True
        if not state.cancelled and stream is not None:
            started = time.perf_counter()
            yield from emit_audio(stream.finalize(), started)
        schedule.close()

        # 5. The history: what was heard, and the LLM cache rolled back to its end.
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        kept = list(result.text_ids)
        if state.cancelled:
            delivered = audio.size if state.delivered_samples is None else min(state.delivered_samples, audio.size)
            spec = eng.token2wav.spec
            heard = 0
            while heard < len(speech_rounds) and spec.frames(heard + 1) * spec.hop <= delivered:
                heard += 1
            last_round = speech_rounds[heard - 1] if heard else -1
            # A token the schedule chose as the cancel arrived was never shown: zip stops at the ones that were.
            kept = [t for t, r in zip(result.text_ids, text_rounds, strict=False) if r <= last_round]
            end = prompt_len + min(len(kept), text_side.fed)
            if conv.llm.pos > end:
                conv.llm.truncate(end)
                conv.cached = conv.cached[:end]
        speech_ids = [i for i in result.speech_ids if not eng.vocab.is_eos(i)]
        units = eng.vocab.to_units(speech_ids)
        history_text = eng.prompt.decode(kept)
        conv.history = [*history]
        if history_text or not state.cancelled:
            conv.history.append(Message("assistant", [history_text], units))
        latency.total_s = time.perf_counter() - t0
        latency.audio_s = audio.shape[0] / sample_rate if sample_rate else 0.0
        state.finished = True
        done = TurnDone(latency.total_s, eng.prompt.decode(result.text_ids), result.text_ids, speech_ids, units,
                        audio, sample_rate, latency, stopped, prompt_ids, reused, prompt_len - reused, timings, trace,
                        history_text)
        if not closed:
            yield done


class _TextSide:
    """The LLM side of one turn's schedule: the new prompt rows prefilled, then one step per text token. A module
    class (not one defined per turn): a class object is always in a reference cycle, and one made per turn would
    keep the turn's arrays alive until the cycle collector ran."""

    def __init__(self, conv: Conversation, rows: np.ndarray, new_keys: list, record: Callable[[str, int, float], None],
                 latency: Latency, trace: Trace):
        self.conv, self.rows, self.new_keys, self.record, self.latency, self.trace = (
            conv, rows, new_keys, record, latency, trace)
        self.fed = 0  # text tokens fed back into the LLM cache

    def prefill(self) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        out = self.conv.llm.run(self.rows)
        self.conv.cached.extend(self.new_keys)
        self.record("llm_prefill", self.rows.shape[0], started)
        self.latency.prefill_s = time.perf_counter() - started
        self.trace.llm_first_logits = out["logits"]
        return out["logits"], out["hidden"]

    def step(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        out = self.conv.llm.feed_token(token)
        self.conv.cached.append(("t", token))
        self.fed += 1
        self.record("llm_step", 1, started)
        return out["logits"], out["hidden"]


class _SpeechSide:
    """The TTS LM side of one turn's schedule: the speaker row, projected LLM hidden states, speech tokens."""

    def __init__(self, conv: Conversation, record: Callable[[str, int, float], None], trace: Trace):
        self.conv, self.record, self.trace = conv, record, trace

    def start(self) -> None:
        started = time.perf_counter()
        self.conv.tts.reset()
        self.conv.tts.run(self.conv._speaker_input)
        self.record("tts_start", 1, started)

    def feed_hidden(self, hidden: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        projected = self.conv.engine.project_hidden(hidden)
        self.trace.tts_inputs.append(projected)
        logits = self.conv.tts.run(projected)["logits"]
        self.record("tts_feed", projected.shape[0], started)
        if self.trace.tts_first_logits is None:
            self.trace.tts_first_logits = logits
        return logits

    def step(self, token: int) -> np.ndarray:
        started = time.perf_counter()
        logits = self.conv.tts.feed_token(token)["logits"]
        self.record("tts_step", 1, started)
        return logits


__all__ = ["AudioInputError", "AudioPart", "Conversation", "ConversationError", "Message", "MessageError", "Turn"]
