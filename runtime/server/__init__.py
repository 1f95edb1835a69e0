"""`opens2s-edge serve`: the OpenAI Realtime protocol over WebSocket on one shared engine (app.py), one conversation
per connection (session.py), turns of all sessions stepped round robin on the engine's one thread (worker.py), the
wire's audio and its resampling (audio.py), the protocol's shapes (protocol.py), Prometheus metrics (metrics.py) and
the browser page (web/). Needs the `serve` extra (websockets, soxr; Silero VAD for server VAD)."""

from .app import REALTIME_PATH, Limits, RealtimeServer

__all__ = ["REALTIME_PATH", "Limits", "RealtimeServer"]
