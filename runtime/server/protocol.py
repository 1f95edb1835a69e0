"""The subset of the OpenAI Realtime protocol (GA, as the `openai` SDK 3.x types it) that a speech-to-speech model
can honour: the session's configuration, its parsing from `session.update`, conversation items, and the error shape.

What the model cannot do (voices, tools, text-only output, noise reduction, input transcription, tracing, ...) is
accepted and reported back as ignored (`ignored_fields` on `session.updated` / `response.created`), never silently
pretended: an app written for the hosted API keeps working, and can see what did not apply. Values this server
cannot take at all (another audio format, semantic VAD, out-of-band responses) are refused with an `error` that names
the parameter.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..vad import VadConfig
from .audio import WIRE_FORMAT, WIRE_RATE, decode_pcm16, resample


class ProtocolError(Exception):
    """A client event the server refuses; sent back as an `error` event (the connection stays up)."""

    def __init__(self, code: str, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.message, self.param, self.kind = code, message, param, kind


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def error_event(code: str, message: str, param: str | None = None, event_id: str | None = None,
                kind: str = "invalid_request_error") -> dict:
    """The standard `error` server event; `event_id` inside `error` is the client event that caused it."""
    return {"type": "error", "error": {"type": kind, "code": code, "message": message, "param": param,
                                       "event_id": event_id}}


@dataclass(frozen=True)
class TurnDetection:
    """Server VAD (runtime/vad.py's Endpointer on Silero VAD, the detector `chat --mic` uses)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True

    def vad_config(self) -> VadConfig:
        return VadConfig(self.threshold, self.prefix_padding_ms, self.silence_duration_ms)

    def to_json(self) -> dict:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
                "interrupt_response": self.interrupt_response, "idle_timeout_ms": None}


@dataclass(frozen=True)
class SessionConfig:
    instructions: str
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    max_output_tokens: int | None = None  # None: "inf" (the server's own budget)

    def to_json(self, session_id: str, model: str) -> dict:
        """The session object of `session.created` / `session.updated` (the SDK's RealtimeSessionCreateRequest)."""
        return {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": model,
            "output_modalities": ["audio"], "instructions": self.instructions,
            "audio": {
                "input": {"format": dict(WIRE_FORMAT), "transcription": None, "noise_reduction": None,
                          "turn_detection": self.turn_detection.to_json() if self.turn_detection else None},
                "output": {"format": dict(WIRE_FORMAT), "voice": None, "speed": 1.0},
            },
            "tools": [], "tool_choice": "auto", "tracing": None, "prompt": None, "include": None,
            "max_output_tokens": "inf" if self.max_output_tokens is None else self.max_output_tokens,
        }


# Session fields a speech-to-speech model has no use for: accepted, reported as ignored when set to something.
_IGNORED_SESSION_FIELDS = ("tools", "tool_choice", "tracing", "prompt", "include", "truncation", "reasoning",
                           "parallel_tool_calls", "model")


def _set(value: Any) -> bool:
    """Whether a field the client sent asks for something (null, empty and defaults ask for nothing)."""
    return value not in (None, [], {}, "", "auto", "none")


def _check_format(value: Any, param: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or value.get("type", "audio/pcm") != "audio/pcm" \
            or value.get("rate", WIRE_RATE) != WIRE_RATE:
        raise ProtocolError("unsupported_audio_format", f"{param}: this server speaks audio/pcm at {WIRE_RATE} Hz "
                            f"(pcm16 mono) only; got {value!r}", param)


def _number(obj: dict, key: str, param: str, kind: type, default: Any) -> Any:
    value = obj.get(key)
    if value is None:
        return default
    wrong = isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and (not math.isfinite(value) or (kind is int and not value.is_integer())))
    if not wrong:
        try:
            return kind(value)
        except OverflowError:
            pass  # an integer no float holds (JSON allows any number of digits)
    raise ProtocolError("invalid_value", f"{param}.{key} must be {'an integer' if kind is int else 'a number'}, "
                        f"got {value!r:.40}", f"{param}.{key}")


def parse_turn_detection(value: Any, current: TurnDetection | None) -> TurnDetection | None:
    param = "session.audio.input.turn_detection"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("invalid_value", f"{param} must be an object or null", param)
    kind = value.get("type", "server_vad")
    if kind != "server_vad":
        raise ProtocolError("unsupported_value", f"{param}.type {kind!r}: this server has server_vad (or null for "
                            "manual turns) only", f"{param}.type")
    base = current or TurnDetection()
    flags = {}
    for key in ("create_response", "interrupt_response"):
        v = value.get(key)
        if v is not None and not isinstance(v, bool):
            raise ProtocolError("invalid_value", f"{param}.{key} must be a boolean", f"{param}.{key}")
        flags[key] = getattr(base, key) if v is None else v
    td = TurnDetection(_number(value, "threshold", param, float, base.threshold),
                       _number(value, "prefix_padding_ms", param, int, base.prefix_padding_ms),
                       _number(value, "silence_duration_ms", param, int, base.silence_duration_ms), **flags)
    try:
        td.vad_config().check()
    except ValueError as exc:
        raise ProtocolError("invalid_value", f"{param}: {exc}", param) from None
    return td


def parse_max_output_tokens(value: Any, param: str) -> int | None:
    if value is None or value == "inf":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ProtocolError("invalid_value", f"{param} must be an integer in 1..4096 or \"inf\", got {value!r}", param)
    return value


def parse_session_update(current: SessionConfig, session: Any, vad_available: bool) -> tuple[SessionConfig, list[str]]:
    """The new configuration and the dotted names of the fields that were ignored. Refuses (ProtocolError) without
    changing anything if any field cannot be honoured."""
    if not isinstance(session, dict):
        raise ProtocolError("invalid_value", "session.update needs a 'session' object", "session")
    if session.get("type", "realtime") != "realtime":
        raise ProtocolError("unsupported_value", f"session.type {session.get('type')!r}: this server has realtime "
                            "(speech-to-speech) sessions only", "session.type")
    ignored = [f"session.{k}" for k in _IGNORED_SESSION_FIELDS if _set(session.get(k))]
    known = {"type", "instructions", "audio", "output_modalities", "max_output_tokens", *_IGNORED_SESSION_FIELDS}
    ignored += [f"session.{k}" for k in session if k not in known]
    config = current
    if "instructions" in session:
        if not isinstance(session["instructions"], str):
            raise ProtocolError("invalid_value", "session.instructions must be a string", "session.instructions")
        config = replace(config, instructions=session["instructions"])
    modalities = session.get("output_modalities")
    if modalities is not None and not isinstance(modalities, list):
        raise ProtocolError("invalid_value", "session.output_modalities must be a list", "session.output_modalities")
    if modalities is not None and modalities != ["audio"]:
        ignored.append("session.output_modalities")  # the model always speaks (its transcript comes with it)
    if "max_output_tokens" in session:
        config = replace(config, max_output_tokens=parse_max_output_tokens(session["max_output_tokens"],
                                                                           "session.max_output_tokens"))
    audio = session.get("audio") or {}
    if not isinstance(audio, dict):
        raise ProtocolError("invalid_value", "session.audio must be an object", "session.audio")
    inp, out = audio.get("input") or {}, audio.get("output") or {}
    if not isinstance(inp, dict) or not isinstance(out, dict):
        raise ProtocolError("invalid_value", "session.audio.input and .output must be objects", "session.audio")
    _check_format(inp.get("format"), "session.audio.input.format")
    _check_format(out.get("format"), "session.audio.output.format")
    if "turn_detection" in inp:
        td = parse_turn_detection(inp["turn_detection"], current.turn_detection)
        if td is not None and not vad_available:
            raise ProtocolError("unsupported_value", "server VAD needs Silero VAD's model, which is not installed "
                                "here (pip install 'opens2s-edge[serve]'); use turn_detection null",
                                "session.audio.input.turn_detection")
        config = replace(config, turn_detection=td)
    for key in ("noise_reduction", "transcription"):
        if _set(inp.get(key)):
            ignored.append(f"session.audio.input.{key}")
    ignored += [f"session.audio.input.{k}" for k in inp if k not in ("format", "turn_detection", "noise_reduction",
                                                                    "transcription")]
    if _set(out.get("voice")):
        ignored.append("session.audio.output.voice")  # one voice: the bundle's speaker vector
    if out.get("speed") not in (None, 1, 1.0):
        ignored.append("session.audio.output.speed")
    ignored += [f"session.audio.output.{k}" for k in out if k not in ("format", "voice", "speed")]
    return config, ignored


# -- conversation items --------------------------------------------------------------------------------------------
@dataclass
class Message:
    """A conversation item the server holds: its wire form (without audio bytes) and what the engine gets."""

    id: str
    role: str
    parts: list[str | np.ndarray]  # text, or audio as float32 at the engine's input rate
    content: list[dict]  # the item's content as events show it

    def item(self, status: str = "completed") -> dict:
        return {"id": self.id, "object": "realtime.item", "type": "message", "role": self.role, "status": status,
                "content": self.content}

    def worker_message(self) -> dict:
        """The reference worker's message format, which Conversation.add_message takes."""
        return {"role": self.role, "content": [{"audio": p} if isinstance(p, np.ndarray) else {"text": p}
                                               for p in self.parts]}

    def turn_input(self) -> tuple[np.ndarray | None, str]:
        """The (audio, text) one engine turn takes: audio parts joined in order, then the text parts."""
        audio = [p for p in self.parts if isinstance(p, np.ndarray)]
        text = " ".join(p for p in self.parts if isinstance(p, str) and p)
        return (np.concatenate(audio) if audio else None), text


def user_audio_message(item_id: str, audio: np.ndarray) -> Message:
    return Message(item_id, "user", [audio], [{"type": "input_audio", "transcript": None}])


def parse_item(item: Any, input_rate: int) -> Message:
    """A `conversation.item.create` item: a user, assistant or system message of text and/or pcm16 audio."""
    if not isinstance(item, dict):
        raise ProtocolError("invalid_value", "conversation.item.create needs an 'item' object", "item")
    if item.get("type", "message") != "message":
        raise ProtocolError("unsupported_value", f"item.type {item.get('type')!r}: only messages (no function calls: "
                            "this model has no tools)", "item.type")
    role = item.get("role")
    if role not in ("user", "assistant", "system"):
        raise ProtocolError("invalid_value", f"item.role must be user, assistant or system, got {role!r}", "item.role")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise ProtocolError("invalid_value", "item.content must be a non-empty list of content parts", "item.content")
    parts: list[str | np.ndarray] = []
    shown: list[dict] = []
    for i, part in enumerate(content):
        param = f"item.content[{i}]"
        if not isinstance(part, dict):
            raise ProtocolError("invalid_value", f"{param} must be an object", param)
        kind = part.get("type")
        if kind in ("input_text", "text", "output_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise ProtocolError("invalid_value", f"{param}.text must be a string", f"{param}.text")
            parts.append(text)
            shown.append({"type": kind, "text": text})
        elif kind == "input_audio" and role == "user":
            if not isinstance(part.get("transcript"), (str, type(None))):  # echoed back on the item's events
                raise ProtocolError("invalid_value", f"{param}.transcript must be a string or null",
                                    f"{param}.transcript")
            try:
                wav = resample(decode_pcm16(part.get("audio")), WIRE_RATE, input_rate)
            except ValueError as exc:
                raise ProtocolError("invalid_value", f"{param}.audio: {exc}", f"{param}.audio") from None
            if wav.size:
                parts.append(wav)
            shown.append({"type": "input_audio", "transcript": part.get("transcript")})
        elif kind == "output_audio" and role == "assistant" and isinstance(part.get("transcript"), str):
            parts.append(part["transcript"])  # an earlier spoken reply: the model's history keeps its text
            shown.append({"type": "output_audio", "transcript": part["transcript"]})
        else:
            raise ProtocolError("unsupported_value", f"{param}.type {kind!r} for a {role} message: expected "
                                + ("input_text or input_audio" if role == "user" else "input_text/output_text"
                                   + (" or output_audio with a transcript" if role == "assistant" else "")),
                                f"{param}.type")
    if not parts:
        raise ProtocolError("invalid_value", "item.content holds no text and no audio samples", "item.content")
    item_id = item.get("id")
    if item_id is not None and (not isinstance(item_id, str) or not 0 < len(item_id) <= 64):
        raise ProtocolError("invalid_value", "item.id must be a string of 1..64 characters", "item.id")
    return Message(item_id or new_id("item"), role, parts, shown)


__all__ = ["Message", "ProtocolError", "SessionConfig", "TurnDetection", "error_event", "new_id", "parse_item",
           "parse_max_output_tokens", "parse_session_update", "parse_turn_detection", "user_audio_message"]
