"""`opens2s-edge serve BUNDLE`: a realtime voice server (torch-free) speaking the OpenAI Realtime protocol over
WebSocket at /v1/realtime, with a browser page at /, /health and /metrics.

One engine is loaded and shared; every connection gets its own conversation; the turns of all sessions run round
robin, one step each, on the engine's one thread (runtime/server/worker.py). Point an OpenAI SDK at it with
`websocket_base_url="ws://HOST:PORT/v1"`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from . import cli_args
from .decoding import add_decode_arguments, decode_options_from_args

API_KEY_ENV = "OPENS2S_EDGE_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle folder written by `opens2s-edge export`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network, "
                        "with --api-key)")
    p.add_argument("--port", type=cli_args.at_least(0), default=8000, help="TCP port (0: any free one; default 8000)")
    p.add_argument("--max-sessions", type=cli_args.at_least(1), default=8,
                   help="concurrent sessions; the next connection is closed with code 1013 and a reason (default 8)")
    p.add_argument("--api-key", default=None,
                   help=f"require this key (Authorization: Bearer, as the OpenAI clients send it); default: the "
                        f"{API_KEY_ENV} environment variable, which keeps the key out of the process list")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web page origin (scheme://host:port) allowed to open sessions besides this server's own "
                        "page; repeatable")
    p.add_argument("--events-per-second", type=cli_args.at_least(1), default=100,
                   help="client events per second per session before events are dropped with an error (default 100)")
    p.add_argument("--system", default=None, help="default instructions (system prompt; default: the bundle's)")
    p.add_argument("--no-server-vad", action="store_true",
                   help="start sessions without server VAD (clients may still turn it on, if Silero VAD is installed)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up turn before listening")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--provider", action="append", choices=["cpu", "cuda", "tensorrt"], default=None)
    p.add_argument("--threads", type=cli_args.threads, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    add_decode_arguments(p)


async def _serve(server: object, host: str, port: int, warm_up: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or a platform without signals
            pass

    def ready(bound_host: str, bound_port: int) -> None:
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"[serve] listening on http://{shown}:{bound_port}/ (page), ws://{shown}:{bound_port}/v1/realtime "
              f"(Realtime API), /health, /metrics", file=sys.stderr, flush=True)

    await server.run(host, port, ready=ready, stop=stop, warm_up=warm_up)


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError

    try:
        import soxr  # noqa: F401  (checked here so a missing extra is one clear message, not a failed session)
        import websockets  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UserError(f"serve needs {exc.name}: pip install 'opens2s-edge[serve]'") from exc

    from .bundle import BundleError, load_bundle
    from .engine import Engine, TurnOptions
    from .onnx_backend import BackendError
    from .server import RealtimeServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # its per-connection lines would drown ours
    try:
        options = decode_options_from_args(args, TurnOptions)
        engine = Engine.from_bundle(load_bundle(args.bundle), tuple(args.provider or ["cpu"]), args.threads,
                                    backend=args.backend)
        server = RealtimeServer(engine, options, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                                max_sessions=args.max_sessions, events_per_second=args.events_per_second,
                                instructions=args.system, allowed_origins=tuple(args.allow_origin),
                                vad_default=not args.no_server_vad)
    except (BundleError, BackendError, ValueError, OSError) as exc:
        raise UserError(str(exc)) from exc
    try:
        asyncio.run(_serve(server, args.host, args.port, not args.no_warmup))
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    print("[serve] stopped", file=sys.stderr)
    return 0
