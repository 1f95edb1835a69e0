"""One Realtime session: a WebSocket connection, its conversation on the shared engine, its input audio buffer and
server VAD, and at most one response at a time.

Input: pcm16 at 24 kHz, resampled as it arrives to the engine's 16 kHz; the buffer holds at most the bundle's audio
profile (`engine.max_audio_seconds`). With server VAD the Endpointer watches the stream: speech start (minus the
prefix padding) to speech stop becomes one user item, and a response starts; speech that starts during a response
cancels it (barge-in) and the conversation keeps the reply only as far as its audio was sent. Without VAD the client
commits the buffer and asks for the response itself.

Output: the engine's reply (text deltas, audio chunks at the vocoder's rate) becomes transcript deltas and pcm16
24 kHz audio deltas, framed by the item and content-part events the SDK expects, then `response.done` with the
status, usage, and a `timing` object of the server's own figures (queue, the engine's first audio, RTF).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from websockets.exceptions import ConnectionClosed

from ..decoder import ContextFull
from ..engine import AudioChunk, HistoryTrimmed, TextDelta, TurnDone
from .audio import WIRE_RATE, ReplyEncoder, StreamResampler, WireAudioError, decode_pcm16
from .protocol import (
    Message,
    ProtocolError,
    SessionConfig,
    error_event,
    new_id,
    parse_item,
    parse_max_output_tokens,
    parse_session_update,
    user_audio_message,
)
from .worker import JobEnd, TurnJob

if TYPE_CHECKING:
    from .app import RealtimeServer

log = logging.getLogger("opens2s_edge.serve")

MIN_COMMIT_MS = 100  # the hosted API refuses to commit less than 100 ms of audio; so do we


class TokenBucket:
    """At most `rate` events a second on average, `burst` at once."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class Response:
    id: str
    item: Message
    requested_at: float  # perf_counter at response.create (or at the end of speech, under server VAD)
    max_output_tokens: int | None
    metadata: dict | None
    job: TurnJob | None = None
    task: asyncio.Task | None = None
    cancel_reason: str | None = None
    sent_samples: int = 0  # engine-rate samples whose audio went out: what the conversation keeps on a cancel
    first_audio_at: float | None = None
    transcript: str = ""
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class RealtimeSession:
    def __init__(self, server: RealtimeServer, ws: Any, model: str):
        self.server, self.ws, self.model = server, ws, model
        self.engine = server.engine
        self.id = new_id("sess")
        self.config = SessionConfig(server.instructions, server.default_turn_detection())
        self.conv: Any = None
        self.last_item_id: str | None = None
        self.pending: list[Message] = []  # items the engine's conversation has not seen yet
        self.response: Response | None = None
        self.rate_in = self.engine.frontend.sample_rate
        self.max_samples = int(self.engine.max_audio_seconds * self.rate_in)
        self.resampler = StreamResampler(WIRE_RATE, self.rate_in)
        self.chunks: deque[np.ndarray] = deque()
        self.buffer_start = 0  # stream position (input-rate samples) of the buffer's first sample
        self.buffer_len = 0
        self.stream_pos = 0  # input-rate samples received this session
        self.endpointer: Any = None
        self.vad_base = 0  # stream position where the endpointer's own count starts
        self.speech_item: str | None = None
        self.speech_begin = 0
        self.bucket = TokenBucket(server.limits.events_per_second, server.limits.event_burst)
        self.dropped_events = 0
        self.last_rate_error = 0.0
        self._send_lock = asyncio.Lock()
        self._set_vad(self.config)

    # -- life -----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        instructions = self.config.instructions
        self.conv = await self.server.worker.call(lambda: self.engine.conversation(instructions))
        await self.send({"type": "session.created", "session": self.session_json()})
        async for message in self.ws:
            await self.handle(message)

    async def close(self) -> None:
        """The connection is gone: stop the response's work at its next step and free the conversation."""
        response = self.response
        if response is not None:
            if response.job is not None:
                response.job.abort()
            if response.task is not None and response.task is not asyncio.current_task():
                response.task.cancel()
        conv, self.conv = self.conv, None
        if conv is not None:
            # reset() drops the history and breaks the conversation <-> turn cycle, so the KV caches are freed as
            # soon as the last reference goes, not at the next garbage collection.
            try:
                await self.server.worker.call(conv.reset)
            except RuntimeError:  # the engine thread stopped first (server shutdown)
                pass

    def session_json(self) -> dict:
        return self.config.to_json(self.id, self.model)

    async def send(self, event: dict) -> None:
        event = {"type": event["type"], "event_id": new_id("event"), **{k: v for k, v in event.items() if k != "type"}}
        data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        async with self._send_lock:
            await self.ws.send(data)

    async def error(self, code: str, message: str, param: str | None = None, event_id: str | None = None,
                    kind: str = "invalid_request_error") -> None:
        self.server.metrics.client_errors[code] += 1
        await self.send(error_event(code, message, param, event_id, kind))

    # -- client events ----------------------------------------------------------------------------------------
    async def handle(self, message: str | bytes) -> None:
        if not self.bucket.take():
            self.dropped_events += 1
            now = time.monotonic()
            if now - self.last_rate_error >= 1.0:  # one error a second, not one per dropped event
                self.last_rate_error = now
                await self.error("rate_limit_exceeded",
                                 f"more than {self.server.limits.events_per_second:g} events/s: {self.dropped_events} "
                                 "events dropped so far", kind="rate_limit_error")
            return
        if isinstance(message, bytes):
            await self.error("invalid_event", "binary frames are not events: send each event as JSON text")
            return
        try:
            event = json.loads(message)
        except (ValueError, RecursionError) as exc:  # ValueError: also an integer past Python's 4300-digit limit
            await self.error("invalid_json", f"the message is not JSON ({exc.__class__.__name__}: "
                             f"{str(exc)[:120]})")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self.error("invalid_event", "an event is a JSON object with a string 'type'", "type")
            return
        kind = event["type"]
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        handler = self.HANDLERS.get(kind)
        if handler is None:
            why = self.UNSUPPORTED.get(kind)
            if why is not None:
                await self.error("unsupported_event", f"{kind!r} is not supported: {why}", "type", event_id)
            else:
                await self.error("unknown_event", f"unknown event type {kind[:80]!r}", "type", event_id)
            return
        try:
            await handler(self, event)
        except ProtocolError as exc:
            await self.error(exc.code, exc.message, exc.param, event_id, exc.kind)
        except (ConnectionClosed, asyncio.CancelledError):
            raise  # the connection closed under us: the handler's loop ends
        except Exception:
            log.exception("session %s: %s failed", self.id, kind)  # the traceback stays here, never on the wire
            await self.error("server_error", f"the server failed handling {kind!r}; it logged the cause", None,
                             event_id, "server_error")

    async def on_session_update(self, event: dict) -> None:
        config, ignored = parse_session_update(self.config, event.get("session"), self.server.vad_available)
        if config.instructions != self.config.instructions:
            conv, text = self.conv, config.instructions
            await self.server.worker.call(lambda: setattr(conv, "system_prompt", text))
        if config.turn_detection != self.config.turn_detection:
            self._set_vad(config)
        self.config = config
        if ignored:
            log.info("session %s: ignored %s", self.id, ", ".join(ignored))
        await self.send({"type": "session.updated", "session": self.session_json(), "ignored_fields": ignored})

    async def on_append(self, event: dict) -> None:
        try:
            wire = decode_pcm16(event.get("audio"))
        except WireAudioError as exc:
            raise ProtocolError("invalid_value", f"input_audio_buffer.append: {exc}", "audio") from None
        samples = self.resampler.push(wire)
        if self.endpointer is None and self.buffer_len + samples.size > self.max_samples:
            raise ProtocolError("input_audio_buffer_full", f"the input audio buffer holds at most "
                                f"{self.engine.max_audio_seconds:g} s (the bundle's audio profile): commit or clear "
                                "it; this append was dropped", "audio")
        self.chunks.append(samples)
        self.buffer_len += samples.size
        self.stream_pos += samples.size
        if self.endpointer is None:
            return
        for vad_event in self.endpointer.push(samples):
            if vad_event.kind == "speech_started":
                await self._speech_started(self.vad_base + vad_event.sample)
            elif self.speech_item is not None:
                await self._speech_stopped(self.vad_base + vad_event.sample)
        if self.speech_item is not None and self.stream_pos - self.speech_begin >= self.max_samples:
            # The utterance reached the longest the audio graph takes: end the turn there (as `chat --mic` does).
            await self._speech_stopped(self.speech_begin + self.max_samples)
        elif self.speech_item is None:
            self._trim_buffer(self.stream_pos - self.max_samples)  # silence: keep a bounded look-back only

    async def on_commit(self, event: dict) -> None:
        item_id = self.speech_item or new_id("item")
        if self.speech_item is not None:  # a manual commit during detected speech ends that speech here
            self.speech_item = None
            self._reset_endpointer()
        await self._commit(item_id, self.stream_pos)

    async def on_clear(self, event: dict) -> None:
        self._trim_buffer(self.stream_pos)
        self.speech_item = None
        self._reset_endpointer()
        await self.send({"type": "input_audio_buffer.cleared"})

    async def on_item_create(self, event: dict) -> None:
        message = parse_item(event.get("item"), self.rate_in)
        previous = event.get("previous_item_id")
        if previous is not None and previous != self.last_item_id:
            raise ProtocolError("invalid_value", "previous_item_id: items can only be appended after the last one "
                                f"({self.last_item_id!r})", "previous_item_id")
        for part in message.parts:
            if isinstance(part, np.ndarray):
                try:
                    self.engine.check_audio(part)
                except ValueError as exc:
                    raise ProtocolError("invalid_value", f"item audio: {exc}", "item.content") from None
        await self._add_item(message)

    async def on_response_create(self, event: dict) -> None:
        params = event.get("response") or {}
        if not isinstance(params, dict):
            raise ProtocolError("invalid_value", "response must be an object", "response")
        await self._start_response(params, time.perf_counter())

    async def on_response_cancel(self, event: dict) -> None:
        response = self.response
        wanted = event.get("response_id")
        if response is None or response.cancel_reason is not None:
            raise ProtocolError("response_cancel_not_active", "there is no response in progress to cancel")
        if wanted is not None and wanted != response.id:
            raise ProtocolError("invalid_value", f"response_id {wanted!r} is not the response in progress "
                                f"({response.id})", "response_id")
        self._cancel(response, "client_cancelled")

    HANDLERS = {
        "session.update": on_session_update,
        "input_audio_buffer.append": on_append,
        "input_audio_buffer.commit": on_commit,
        "input_audio_buffer.clear": on_clear,
        "conversation.item.create": on_item_create,
        "response.create": on_response_create,
        "response.cancel": on_response_cancel,
    }
    UNSUPPORTED = {
        "conversation.item.truncate": "the conversation keeps a cut reply as far as its audio was sent",
        "conversation.item.delete": "the engine's conversation cannot drop a message from its cached history",
        "conversation.item.retrieve": "the server does not keep item audio",
        "output_audio_buffer.clear": "that event is for WebRTC/SIP connections; over WebSocket send response.cancel",
    }

    # -- input audio and VAD --------------------------------------------------------------------------------------
    def _set_vad(self, config: SessionConfig) -> None:
        td = config.turn_detection
        self.endpointer = self.server.make_endpointer(td.vad_config()) if td is not None else None
        self.vad_base = self.stream_pos
        self.speech_item = None

    def _reset_endpointer(self) -> None:
        if self.endpointer is not None:
            self.endpointer.reset()
        self.vad_base = self.stream_pos

    def _trim_buffer(self, start: int) -> None:
        """Drop the buffered samples before stream position `start`."""
        while self.chunks and self.buffer_start + self.chunks[0].size <= start:
            dropped = self.chunks.popleft()
            self.buffer_start += dropped.size
            self.buffer_len -= dropped.size
        if self.chunks and self.buffer_start < start:
            cut = start - self.buffer_start
            self.chunks[0] = self.chunks[0][cut:]
            self.buffer_start += cut
            self.buffer_len -= cut
        if not self.chunks:
            self.buffer_start = max(self.buffer_start, min(start, self.stream_pos))

    def _take(self, end: int) -> np.ndarray:
        """The buffered samples up to stream position `end`, removed from the buffer."""
        start = self.buffer_start
        audio = np.concatenate(list(self.chunks)) if self.chunks else np.zeros(0, np.float32)
        taken = audio[: max(0, end - start)]
        rest = audio[taken.size:]
        self.chunks = deque([rest]) if rest.size else deque()
        self.buffer_start, self.buffer_len = start + taken.size, rest.size
        return taken

    def _ms(self, position: int) -> int:
        return int(round(position * 1000 / self.rate_in))

    async def _speech_started(self, position: int) -> None:
        td = self.config.turn_detection
        pad = td.prefix_padding_ms * self.rate_in // 1000
        self.speech_begin = max(self.buffer_start, position - pad)
        self._trim_buffer(self.speech_begin)
        self.speech_item = new_id("item")
        await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": self._ms(self.speech_begin),
                         "item_id": self.speech_item})
        response = self.response
        if td.interrupt_response and response is not None and response.cancel_reason is None:
            self._cancel(response, "turn_detected")  # barge-in

    async def _speech_stopped(self, position: int) -> None:
        item_id, self.speech_item = self.speech_item, None
        end = min(position, self.stream_pos)
        await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": self._ms(end),
                         "item_id": item_id})
        if self.stream_pos - end > 0 and self.endpointer is not None and self.endpointer.speaking:
            self._reset_endpointer()  # cut at the length limit: whatever follows is a new utterance
        stopped_at = time.perf_counter()
        if await self._commit(item_id, end) and self.config.turn_detection.create_response:
            await self._start_response({}, stopped_at)

    async def _commit(self, item_id: str, end: int) -> bool:
        if self.buffer_len == 0 or end <= self.buffer_start:
            raise ProtocolError("input_audio_buffer_commit_empty", "the input audio buffer is empty: append audio "
                                f"(at least {MIN_COMMIT_MS} ms) before committing")
        audio = self._take(end)
        if audio.size < MIN_COMMIT_MS * self.rate_in // 1000:
            raise ProtocolError("input_audio_buffer_commit_empty", f"the input audio buffer holds "
                                f"{self._ms(audio.size)} ms; at least {MIN_COMMIT_MS} ms are needed (dropped)")
        previous = self.last_item_id
        await self.send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous})
        await self._add_item(user_audio_message(item_id, audio))
        return True

    async def _add_item(self, message: Message) -> None:
        previous, self.last_item_id = self.last_item_id, message.id
        self.pending.append(message)
        item = message.item()
        await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": previous, "item": item})

    # -- responses -------------------------------------------------------------------------------------------------
    async def _start_response(self, params: dict, requested_at: float) -> None:
        if self.response is not None:
            if self.response.cancel_reason is None:
                raise ProtocolError("conversation_already_has_active_response",
                                    f"response {self.response.id} is still in progress: cancel it or wait for its "
                                    "response.done")
            await self.response.finished.wait()  # a cancelled one finishes within one engine step
        if params.get("conversation") not in (None, "auto"):
            raise ProtocolError("unsupported_value", "response.conversation: out-of-band responses are not supported "
                                "(the engine's conversation is the session's)", "response.conversation")
        if params.get("input") is not None:
            raise ProtocolError("unsupported_value", "response.input: responses answer the session's conversation",
                                "response.input")
        ignored = [f"response.{k}" for k in ("instructions", "tools", "tool_choice", "prompt", "reasoning")
                   if params.get(k)]
        if params.get("output_modalities") not in (None, ["audio"]):
            ignored.append("response.output_modalities")
        if ((params.get("audio") or {}).get("output") or {}).get("voice"):
            ignored.append("response.audio.output.voice")
        limit = parse_max_output_tokens(params["max_output_tokens"], "response.max_output_tokens") \
            if "max_output_tokens" in params else self.config.max_output_tokens
        metadata = params.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise ProtocolError("invalid_value", "response.metadata: at most 16 string keys and values",
                                "response.metadata")
        if not self.pending or self.pending[-1].role != "user":
            raise ProtocolError("no_user_input", "nothing to answer: this model replies to a user turn, so commit "
                                "input audio or add a user item after the last response first")
        earlier, last = self.pending[:-1], self.pending[-1]
        self.pending = []
        base = self.server.options
        cap = base.max_text_tokens or self.engine.defaults.max_text_tokens
        options = replace(base, max_text_tokens=min(limit, cap)) if limit is not None else base
        audio, text = last.turn_input()
        conv = self.conv

        def make_turn() -> Any:  # on the engine thread
            for message in earlier:
                conv.add_message(message.worker_message())
            return conv.turn(audio, text, options)

        response = Response(new_id("resp"), Message(new_id("item"), "assistant", [], []), requested_at, limit,
                            metadata)
        self.response = response
        created = {"type": "response.created", "response": self._response_json(response, "in_progress")}
        if ignored:
            created["ignored_fields"] = ignored
        await self.send(created)
        item = self._assistant_item(response, "in_progress", None)
        await self.send({"type": "response.output_item.added", "response_id": response.id, "output_index": 0,
                         "item": item})
        previous, self.last_item_id = self.last_item_id, response.item.id
        await self.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        await self.send({"type": "response.content_part.added", **self._where(response),
                         "part": {"type": "audio", "transcript": ""}})
        response.job = self.server.worker.submit(make_turn)
        response.task = asyncio.create_task(self._stream(response, previous))

    def _cancel(self, response: Response, reason: str) -> None:
        response.cancel_reason = reason
        if response.job is not None:
            response.job.cancel(response.sent_samples)

    def _where(self, response: Response) -> dict:
        return {"response_id": response.id, "item_id": response.item.id, "output_index": 0, "content_index": 0}

    def _assistant_item(self, response: Response, status: str, transcript: str | None) -> dict:
        content = [] if transcript is None else [{"type": "output_audio", "transcript": transcript}]
        return {"id": response.item.id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": content}

    def _response_json(self, response: Response, status: str, details: dict | None = None,
                       output: list | None = None, usage: dict | None = None) -> dict:
        return {"id": response.id, "object": "realtime.response", "status": status, "status_details": details,
                "output": output or [], "conversation_id": self.id.replace("sess_", "conv_"),
                "output_modalities": ["audio"], "metadata": response.metadata, "usage": usage,
                "max_output_tokens": "inf" if response.max_output_tokens is None else response.max_output_tokens,
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": WIRE_RATE}, "voice": None}}}

    async def _stream(self, response: Response, previous_item: str | None) -> None:
        metrics = self.server.metrics
        encoder = ReplyEncoder(self.engine.sample_rate or WIRE_RATE)
        where = self._where(response)
        done: TurnDone | None = None
        end: JobEnd | None = None
        trimmed = 0
        try:
            while end is None:
                event = await response.job.events.get()
                if isinstance(event, JobEnd):
                    end = event
                elif isinstance(event, TurnDone):
                    done = event
                elif response.cancel_reason is not None:
                    continue  # cancelled: nothing more goes out
                elif isinstance(event, TextDelta) and event.text:
                    response.transcript += event.text
                    await self.send({"type": "response.output_audio_transcript.delta", **where, "delta": event.text})
                elif isinstance(event, AudioChunk):
                    delta = encoder.push(event.pcm)
                    if delta:
                        await self.send({"type": "response.output_audio.delta", **where, "delta": delta})
                        if response.first_audio_at is None:
                            response.first_audio_at = time.perf_counter()
                    response.sent_samples += event.pcm.size
                elif isinstance(event, HistoryTrimmed):
                    trimmed += event.dropped
            if response.cancel_reason is None and end.error is None:
                tail = encoder.flush()
                if tail:
                    await self.send({"type": "response.output_audio.delta", **where, "delta": tail})
            await self._finish(response, done, end, trimmed)
        except ConnectionClosed:  # the client went away mid-response: stop the work at its next step
            response.job.abort()
            metrics.turns["disconnected"] += 1
        except asyncio.CancelledError:
            metrics.turns["disconnected"] += 1
            raise
        finally:
            response.finished.set()
            if self.response is response:
                self.response = None

    async def _finish(self, response: Response, done: TurnDone | None, end: JobEnd, trimmed: int) -> None:
        metrics = self.server.metrics
        where = self._where(response)
        details = None
        if response.cancel_reason is not None:
            status, details = "cancelled", {"type": "cancelled", "reason": response.cancel_reason}
        elif end.error is not None or done is None:
            status = "failed"
            err = end.error
            named = isinstance(err, (ValueError, ContextFull))  # input errors say what was wrong; others do not
            details = {"type": "failed", "error": {
                "type": "invalid_request_error" if named else "server_error",
                "code": type(err).__name__ if named else "engine_error",
                "message": str(err) if named else "the engine failed on this turn; the server logged the cause"}}
        elif done.stopped in ("budget", "context"):
            status = "incomplete"
            details = {"type": "incomplete", "reason": "max_output_tokens" if done.stopped == "budget" else None}
        else:
            status = "completed"
        transcript = response.transcript
        if done is not None and status == "cancelled":
            transcript = done.history_text  # what the conversation kept: the reply as far as its audio was sent
        elif done is not None:
            transcript = done.text
        item_status = "completed" if status == "completed" else "incomplete"
        await self.send({"type": "response.output_audio.done", **where})
        await self.send({"type": "response.output_audio_transcript.done", **where, "transcript": transcript})
        await self.send({"type": "response.content_part.done", **where,
                         "part": {"type": "audio", "transcript": transcript}})
        item = self._assistant_item(response, item_status, transcript)
        await self.send({"type": "response.output_item.done", "response_id": response.id, "output_index": 0,
                         "item": item})
        await self.send({"type": "conversation.item.done", "previous_item_id": None, "item": item})
        usage = timing = None
        if done is not None:
            audio_in = sum(1 for i in done.prompt_ids if i < 0)
            prompt = done.reused + done.prefilled
            usage = {"total_tokens": prompt + len(done.text_ids) + len(done.speech_ids), "input_tokens": prompt,
                     "output_tokens": len(done.text_ids) + len(done.speech_ids),
                     "input_token_details": {"cached_tokens": done.reused, "text_tokens": len(done.prompt_ids)
                                             - audio_in, "audio_tokens": prompt - len(done.prompt_ids) + audio_in,
                                             "image_tokens": 0},
                     "output_token_details": {"text_tokens": len(done.text_ids), "audio_tokens": len(done.speech_ids)}}
            lat = done.latency
            first = None if response.first_audio_at is None else response.first_audio_at - response.requested_at
            timing = {"queue_ms": end.queue_s * 1000, "wait_ms": end.wait_s * 1000,
                      "engine_first_audio_ms": None if lat.first_audio_s is None else lat.first_audio_s * 1000,
                      "first_audio_ms": None if first is None else first * 1000, "engine_total_ms": lat.total_s * 1000,
                      "audio_ms": lat.audio_s * 1000, "rtf": lat.rtf, "stopped": done.stopped,
                      "history_trimmed": trimmed}
            if first is not None:
                metrics.first_audio.observe(first)
            if lat.first_audio_s is not None:
                metrics.engine_first_audio.observe(lat.first_audio_s)
            if lat.rtf is not None and status != "cancelled":
                metrics.rtf.observe(lat.rtf)
            metrics.audio_out_s += response.sent_samples / (done.sample_rate or 1)
        metrics.queue.observe(end.queue_s)
        metrics.wait_s += end.wait_s
        metrics.turns[status] += 1
        final = {"type": "response.done", "response": self._response_json(response, status, details, [item], usage)}
        if timing is not None:
            final["timing"] = timing
        await self.send(final)


__all__ = ["RealtimeSession", "TokenBucket"]
