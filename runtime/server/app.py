"""`opens2s-edge serve`: the Realtime WebSocket endpoint, the health and metrics endpoints and the browser page, on
one port, on websockets' own HTTP handling (no web framework on the device).

```
GET /                 the browser page (static files in web/)
GET /health           {"status": "ok", ...}
GET /metrics          Prometheus text (needs the API key when one is set)
GET /v1/realtime      WebSocket upgrade: one Realtime session, one conversation on the shared engine
```

Security: loopback by default; with an API key, the upgrade (and /metrics) needs `Authorization: Bearer KEY` (what
the openai SDKs send) or, from a browser that cannot set headers, the `openai-insecure-api-key.KEY` WebSocket
subprotocol (what the SDKs' browser clients send); a browser page from another origin is refused (no cross-site
WebSocket hijacking of a local assistant); messages are bounded by the bundle's audio profile, events by a rate;
errors reach clients as `error` events with a message, tracebacks stay in the server's log.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..engine import Engine, TurnOptions
from ..vad import Endpointer, SileroVad, VadConfig, VadError
from .audio import WIRE_RATE
from .metrics import Metrics
from .protocol import TurnDetection, error_event
from .session import RealtimeSession
from .worker import EngineWorker

log = logging.getLogger("opens2s_edge.serve")

REALTIME_PATH = "/v1/realtime"
KEY_SUBPROTOCOL = "openai-insecure-api-key."
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/worklets.js": ("worklets.js", "text/javascript; charset=utf-8")}
PAGE_POLICY = ("default-src 'self'; connect-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; media-src 'self' blob:")


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 8
    max_message_bytes: int = 4 << 20  # replaced by the bundle's audio profile (see RealtimeServer)
    events_per_second: float = 100.0
    event_burst: float = 400.0


class _SharedSileroVad(SileroVad):
    """Silero VAD with its own recurrent state on a model session loaded once for every Realtime session."""

    def __init__(self, session: Any):
        self.session = session
        self.reset()


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class RealtimeServer:
    """The shared engine (on its one thread) and everything per connection."""

    def __init__(self, engine: Engine, options: TurnOptions | None = None, *, api_key: str | None = None,
                 max_sessions: int = 8, events_per_second: float = 100.0, instructions: str | None = None,
                 model_name: str = "opens2s-edge", allowed_origins: tuple[str, ...] = (), vad: bool = True,
                 vad_default: bool = True):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.engine = engine
        self.options = options or TurnOptions()
        self.api_key = api_key or None
        # A message carries at most the longest utterance the audio graph takes, as base64 pcm16 at 24 kHz.
        audio_bytes = int(engine.max_audio_seconds * WIRE_RATE * 2 * 4 / 3) + 1
        self.limits = Limits(max_sessions, audio_bytes + (64 << 10), events_per_second, 4 * events_per_second)
        self.instructions = engine.system_prompt if instructions is None else instructions
        self.model_name = model_name
        self.allowed_origins = set(allowed_origins)
        self.metrics = Metrics()
        self.worker = EngineWorker()
        self._vad_session = None
        self.vad_default = vad_default
        if vad:
            try:
                self._vad_session = SileroVad().session
            except VadError as exc:
                log.warning("server VAD off: %s", exc)
        self.started = time.time()

    @property
    def vad_available(self) -> bool:
        return self._vad_session is not None

    def default_turn_detection(self) -> TurnDetection | None:
        """Server VAD on, as the hosted API starts every session (off where Silero VAD is not installed)."""
        return TurnDetection() if self.vad_available and self.vad_default else None

    def make_endpointer(self, config: VadConfig) -> Endpointer:
        return Endpointer(config, _SharedSileroVad(self._vad_session))

    # -- HTTP -------------------------------------------------------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), self.api_key.encode()):
            return True
        for header in request.headers.get_all("Sec-WebSocket-Protocol"):
            for proto in header.split(","):
                proto = proto.strip()
                if proto.startswith(KEY_SUBPROTOCOL) and hmac.compare_digest(
                        proto[len(KEY_SUBPROTOCOL):].encode(), self.api_key.encode()):
                    return True
        return False

    def _origin_allowed(self, request: Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None or origin in self.allowed_origins:  # not a browser, or a page the operator allowed
            return True
        return urlsplit(origin).netloc.lower() == request.headers.get("Host", "").lower()

    @staticmethod
    def _response(status: int, body: bytes, content_type: str, extra: tuple[tuple[str, str], ...] = ()) -> Response:
        status = HTTPStatus(status)
        headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                           ("Connection", "close"), *extra])
        return Response(status.value, status.phrase, headers, body)

    def _json(self, status: int, obj: dict) -> Response:
        return self._response(status, json.dumps(obj).encode(), "application/json")

    def _api_error(self, status: int, code: str, message: str) -> Response:
        return self._json(status, {"error": {"type": "invalid_request_error", "code": code, "message": message}})

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in (REALTIME_PATH, REALTIME_PATH + "/"):
            if not self._origin_allowed(request):
                self.metrics.sessions_refused["origin"] += 1
                return self._api_error(403, "origin_not_allowed", "this page's origin may not open sessions here "
                                       "(serve --allow-origin ORIGIN allows it)")
            if not self._authorized(request):
                self.metrics.sessions_refused["auth"] += 1
                return self._api_error(401, "invalid_api_key", "missing or wrong API key: send it as "
                                       "'Authorization: Bearer KEY' (or the openai-insecure-api-key subprotocol)")
            return None  # the WebSocket handshake goes on (426 if this was not an upgrade)
        if path == "/health":
            return self._json(200, {"status": "ok", "sessions": self.metrics.sessions_active,
                                    "max_sessions": self.limits.max_sessions, "model": self.model_name,
                                    "server_vad": self.vad_available, "uptime_s": round(time.time() - self.started, 1),
                                    "auth": self.api_key is not None})
        if path == "/metrics":
            if not self._authorized(request):
                return self._api_error(401, "invalid_api_key", "/metrics needs the API key (Authorization: Bearer)")
            text = self.metrics.render(self.worker.busy_s, self.worker.live_turns)
            return self._response(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        if path in STATIC:
            name, content_type = STATIC[path]
            body = (files(__package__) / "web" / name).read_bytes()
            return self._response(200, body, content_type, (("Content-Security-Policy", PAGE_POLICY),))
        return self._response(404, f"no such path: {path[:200]}\n".encode(), "text/plain; charset=utf-8")

    @staticmethod
    def select_subprotocol(connection: ServerConnection, subprotocols: Any) -> str | None:
        # Browsers offer "realtime" beside the key; answering with one they offered keeps the handshake valid.
        return "realtime" if "realtime" in subprotocols else None

    # -- WebSocket sessions ---------------------------------------------------------------------------------------
    async def handler(self, ws: ServerConnection) -> None:
        metrics = self.metrics
        if metrics.sessions_active >= self.limits.max_sessions:
            metrics.sessions_refused["max_sessions"] += 1
            reason = f"server busy: all {self.limits.max_sessions} sessions in use (--max-sessions); retry later"
            try:
                await ws.send(json.dumps({"event_id": "event_refused", **error_event(
                    "session_limit_reached", reason, kind="server_error")}))
                await ws.close(1013, reason)  # 1013: try again later
            except ConnectionClosed:
                pass
            return
        metrics.sessions_active += 1  # counted before any await: two connections cannot both take the last place
        metrics.sessions_total += 1
        query = parse_qs(urlsplit(ws.request.path).query)
        model = (query.get("model") or [self.model_name])[0][:100]
        session = RealtimeSession(self, ws, model)
        try:
            await session.run()
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("session %s failed", session.id)
            try:
                await ws.close(1011, "internal server error (logged on the server)")
            except ConnectionClosed:
                pass
        finally:
            metrics.sessions_active -= 1  # the place is free now, before the conversation is released
            await session.close()

    def warm_up(self) -> None:
        """One short turn on a throwaway conversation, so the first client does not pay onnxruntime's first runs."""
        conv = self.engine.conversation(self.instructions)
        for _ in conv.turn(None, "Hello.", TurnOptions(greedy=True, max_text_tokens=2, max_speech_tokens=12)):
            pass

    async def run(self, host: str = "127.0.0.1", port: int = 8000, *, ready: Callable[[str, int], None] | None = None,
                  stop: asyncio.Event | None = None, warm_up: bool = True) -> None:
        """Serve until `stop` is set."""
        if not _is_loopback(host) and self.api_key is None:
            log.warning("serving on %s without an API key: anyone who reaches this address can use the model", host)
        self.worker.start()
        try:
            if warm_up:
                await self.worker.call(self.warm_up)
            async with serve(self.handler, host, port, process_request=self.process_request,
                             select_subprotocol=self.select_subprotocol, max_size=self.limits.max_message_bytes,
                             compression=None, ping_interval=20, ping_timeout=20, close_timeout=2,
                             server_header="opens2s-edge") as server:
                bound = server.sockets[0].getsockname()
                if ready is not None:
                    ready(bound[0], bound[1])
                await (stop or asyncio.Event()).wait()
        finally:
            self.worker.stop()


__all__ = ["Limits", "REALTIME_PATH", "RealtimeServer"]
