"""The server's overhead on time to first audio: what a Realtime client sees against what the engine itself took,
with 1, 4, 8 ... sessions speaking at the same moment.

Usage:
    python -m opens2s_edge.benchmarks.serve_latency BUNDLE [--sessions 1,4,8] [--turns 3] [--threads 1]
        [--max-text-tokens 16] [--max-speech-tokens 48] [--seed 7] [--audio WAV] --out DIR

For each concurrency level a fresh `opens2s-edge serve BUNDLE --port 0 --no-server-vad --greedy` is started in a
subprocess (its warm-up turn runs before it listens), and that many connections of the official `openai` SDK's
realtime client are opened. Every turn, each session appends the spoken user turn (the wav resampled to 24 kHz pcm16,
in 100 ms pieces), then all sessions commit and send `response.create` at the same moment; the next turn starts when
every session has its `response.done`. Per turn:

- client first audio: `response.create` sent until the first `response.output_audio.delta` arrived (also kept from
  the commit);
- engine first audio: `timing.engine_first_audio_ms` of `response.done`, the engine's own clock from the turn's
  first step to its first audio chunk (on a shared engine thread that clock includes the other sessions' steps run
  between this turn's own);
- overhead = client - engine: the wait for the engine thread (`timing.queue_ms`), the protocol events, resampling,
  both event loops and the SDK's parsing; overhead - queue_ms is what the protocol path costs beyond the wait, and
  `timing.first_audio_ms` (the server's own, from receiving `response.create` to sending the first delta) splits
  the overhead into the server's part and the wire + client part.

`opens2s_step_wait_seconds_total` and `opens2s_engine_busy_seconds_total` are read from /metrics before and after.
Output: progress lines, the table, and DIR/serve_latency.json (every turn, every summary, the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .harness import machine_description, summarize
from .serve_process import serve_process

HELLO = Path(__file__).resolve().parents[1] / "opens2s_edge" / "assets" / "hello.wav"
WIRE_RATE = 24000
PIECE_MS = 100
START_TIMEOUT_S = 300.0

SCHEDULING = (
    "One engine thread owns the engine and runs every session's turn (runtime/server/worker.py). Live turns sit in "
    "one FIFO queue; the thread takes the turn at the front, advances it by exactly one event (the first step: the "
    "turn's setup, its audio encode, the prefill and the first token; then one LLM decode step, one TTS LM decode "
    "step, or one token2wav chunk), posts that event to the event loop, and puts the turn at the back while it has "
    "more. With k turns in flight each advances one step in k, so every reply slows by about the same factor instead "
    "of the k-th waiting for k-1 whole replies. Calls outside a turn (creating or releasing a conversation, a new "
    "system prompt) go first, before the next step. queue_ms is a turn's submission until its first step; wait_ms "
    "(summed in opens2s_step_wait_seconds_total) the time between its own steps spent on other sessions' steps. The "
    "event loop (WebSocket I/O, protocol events, soxr resampling, base64) runs on the process's main thread and "
    "never runs model work."
)

METRICS = ("opens2s_step_wait_seconds_total", "opens2s_engine_busy_seconds_total",
           'opens2s_turns_total{status="completed"}', 'opens2s_turns_total{status="incomplete"}',
           'opens2s_turns_total{status="failed"}', "opens2s_queue_seconds_sum", "opens2s_queue_seconds_count")

# The per-turn figures summarized at each level (milliseconds, and the ratio).
FIGURES = ("client_first_audio_ms", "client_first_audio_from_commit_ms", "engine_first_audio_ms", "overhead_ms",
           "queue_ms", "beyond_queue_ms", "server_first_audio_ms", "server_side_ms", "wire_client_ms", "wait_ms",
           "client_total_ms", "ratio")


# -- the clients -----------------------------------------------------------------------------------------------------
def wire_pcm(path: Path) -> bytes:
    """The user's turn as the wire carries it: 24 kHz pcm16 little-endian (resampled with soxr, as a client would)."""
    from opens2s_edge.runtime.audio import load_wav
    from opens2s_edge.runtime.server.audio import resample

    wav = load_wav(path, 16000)
    w24 = resample(wav, 16000, WIRE_RATE)
    return (np.clip(w24, -1, 1) * 32767).astype("<i2").tobytes()


async def _append(conn: Any, pcm: bytes) -> None:
    step = WIRE_RATE * 2 * PIECE_MS // 1000
    for i in range(0, len(pcm), step):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())


async def _one_turn(conn: Any, session: int, turn: int, timeout: float) -> dict[str, Any]:
    """Commit, ask, and read the events up to response.done; the client's clock and the server's timing."""
    t_commit = time.perf_counter()
    await conn.input_audio_buffer.commit()
    t_create = time.perf_counter()
    await conn.response.create()
    first_audio = None
    deltas = 0

    async def until_done() -> Any:
        nonlocal first_audio, deltas
        async for event in conn:
            if event.type == "response.output_audio.delta":
                deltas += 1
                if first_audio is None:
                    first_audio = time.perf_counter()
            elif event.type == "error":
                raise RuntimeError(f"session {session}, turn {turn}: error {event.error.code}: {event.error.message}")
            elif event.type == "response.done":
                return event
        raise RuntimeError(f"session {session}, turn {turn}: the connection closed before response.done")

    done = await asyncio.wait_for(until_done(), timeout)
    t_done = time.perf_counter()
    status = done.response.status
    timing = (done.model_extra or {}).get("timing")
    if status not in ("completed", "incomplete") or timing is None or first_audio is None:
        raise RuntimeError(f"session {session}, turn {turn}: response {status} with timing {timing} and "
                           f"{deltas} audio deltas; nothing to time")
    client = (first_audio - t_create) * 1000
    engine = timing["engine_first_audio_ms"]
    server = timing["first_audio_ms"]
    usage = done.response.usage
    return {
        "session": session, "turn": turn, "status": status, "stopped": timing["stopped"],
        "client_first_audio_ms": client, "client_first_audio_from_commit_ms": (first_audio - t_commit) * 1000,
        "engine_first_audio_ms": engine, "overhead_ms": client - engine, "queue_ms": timing["queue_ms"],
        "beyond_queue_ms": client - engine - timing["queue_ms"],
        "server_first_audio_ms": server, "server_side_ms": server - engine, "wire_client_ms": client - server,
        "wait_ms": timing["wait_ms"], "ratio": client / engine, "client_total_ms": (t_done - t_create) * 1000,
        "engine_total_ms": timing["engine_total_ms"], "audio_ms": timing["audio_ms"], "rtf": timing["rtf"],
        "audio_deltas": deltas, "text_tokens": usage.output_token_details.text_tokens,
        "speech_tokens": usage.output_token_details.audio_tokens,
        "cached_tokens": usage.input_token_details.cached_tokens,
    }


async def drive(port: int, sessions: int, turns: int, pcm: bytes, timeout: float,
                progress: Any = print) -> list[dict[str, Any]]:
    """`sessions` SDK connections, `turns` rounds in which all of them speak, then ask at once."""
    import openai

    client = openai.AsyncOpenAI(api_key="sk-local", websocket_base_url=f"ws://127.0.0.1:{port}/v1")
    rows: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(client.realtime.connect(model="opens2s-edge"))
                 for _ in range(sessions)]
        for i, conn in enumerate(conns):
            created = await asyncio.wait_for(conn.recv(), timeout)
            if created.type != "session.created":
                raise RuntimeError(f"session {i}: expected session.created, got {created.type}")
            if created.session.audio.input.turn_detection is not None:
                raise RuntimeError(f"session {i} started with server VAD on: the server needs --no-server-vad")
        for k in range(turns):
            await asyncio.gather(*(_append(conn, pcm) for conn in conns))
            got = await asyncio.gather(*(_one_turn(conn, i, k + 1, timeout) for i, conn in enumerate(conns)))
            rows.extend(got)
            client_ms = float(np.median([r["client_first_audio_ms"] for r in got]))
            engine_ms = float(np.median([r["engine_first_audio_ms"] for r in got]))
            queue_ms = float(np.median([r["queue_ms"] for r in got]))
            progress(f"[serve-latency] {sessions} session(s), turn {k + 1}/{turns}: first audio (median over "
                     f"sessions) client {client_ms:.0f} ms, engine {engine_ms:.0f} ms, queue {queue_ms:.0f} ms")
    return rows


# -- one level, the run ----------------------------------------------------------------------------------------------
def server_args(args: argparse.Namespace, sessions: int) -> list[str]:
    return ["--threads", str(args.threads), "--max-sessions", str(sessions), "--seed", str(args.seed), "--greedy",
            "--max-text-tokens", str(args.max_text_tokens), "--max-speech-tokens", str(args.max_speech_tokens),
            "--no-server-vad", "--log-level", "warning"]


def run_level(args: argparse.Namespace, sessions: int, pcm: bytes, progress: Any = print) -> dict[str, Any]:
    progress(f"[serve-latency] {sessions} session(s): starting the server")
    started = time.perf_counter()
    extra = server_args(args, sessions)
    with serve_process(args.bundle, extra, start_timeout_s=START_TIMEOUT_S) as server:
        progress(f"[serve-latency] {sessions} session(s): listening on port {server.port} "
                 f"({time.perf_counter() - started:.1f} s to start, warm-up turn included)")
        before = server.metrics()
        t0 = time.perf_counter()
        rows = asyncio.run(drive(server.port, sessions, args.turns, pcm, args.timeout, progress))
        wall = time.perf_counter() - t0
        after = server.metrics()
    growth = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in METRICS}
    summary = {name: summarize([r[name] for r in rows]) for name in FIGURES}
    return {"sessions": sessions, "server_args": extra, "wall_s": wall, "summary": summary, "metrics_growth": growth,
            "turns": rows}


def _cell(stat: dict, spec: str = ".0f") -> str:
    if not stat["n"]:
        return "-"
    return f"{stat['p50']:{spec}} [{stat['p90']:{spec}}]"


def table(levels: list[dict[str, Any]]) -> str:
    lines = ["| sessions | turns | client first audio ms | engine first audio ms | overhead ms | of which queue ms | "
             "beyond queue ms | client / engine | step wait s | engine busy s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for level in levels:
        s, g = level["summary"], level["metrics_growth"]
        lines.append(
            f"| {level['sessions']} | {s['client_first_audio_ms']['n']} | {_cell(s['client_first_audio_ms'])} | "
            f"{_cell(s['engine_first_audio_ms'])} | {_cell(s['overhead_ms'])} | {_cell(s['queue_ms'])} | "
            f"{_cell(s['beyond_queue_ms'], '.1f')} | {_cell(s['ratio'], '.2f')} | "
            f"{g['opens2s_step_wait_seconds_total']:.1f} | {g['opens2s_engine_busy_seconds_total']:.1f} | "
            f"{level['wall_s']:.1f} |")
    lines.append("")
    lines.append("Cells: p50 [p90] over all turns of all sessions. overhead = client - engine, per turn; beyond "
                 "queue = overhead - queue_ms (protocol events, resampling, base64, both event loops, the SDK's "
                 "parsing); step wait and engine busy: growth of the /metrics counters over the level.")
    return "\n".join(lines)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sessions wants counts separated by commas, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"--sessions wants counts of at least 1, got {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--sessions", type=_levels, default=[1, 4, 8], help="concurrency levels (default 1,4,8)")
    p.add_argument("--turns", type=int, default=3, help="turns per session at each level (default 3)")
    p.add_argument("--threads", type=int, default=1, help="the server's onnxruntime intra-op threads (default 1)")
    p.add_argument("--max-text-tokens", type=int, default=16)
    p.add_argument("--max-speech-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--audio", type=Path, default=HELLO, help="the user's turn (default: the embedded hello.wav)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one turn may take (default 600)")
    p.add_argument("--out", type=Path, required=True, help="folder for serve_latency.json")
    args = p.parse_args(argv)
    if args.turns < 1 or args.threads < 0 or args.max_text_tokens < 1 or args.max_speech_tokens < 1:
        p.error("--turns, --max-text-tokens and --max-speech-tokens must be at least 1, --threads at least 0")
    if not (args.bundle / "manifest.json").is_file():
        p.error(f"{args.bundle} is not a bundle (no manifest.json)")
    if not args.audio.is_file():
        p.error(f"--audio {args.audio} does not exist")
    try:
        import openai  # noqa: F401
    except ModuleNotFoundError:
        p.error("this benchmark drives the server with the openai SDK: pip install 'openai[realtime]'")

    from opens2s_edge.runtime.files import write_text_atomic

    pcm = wire_pcm(args.audio)
    print(f"[serve-latency] {args.bundle}: sessions {','.join(map(str, args.sessions))}, {args.turns} turn(s) each, "
          f"{len(pcm) / 2 / WIRE_RATE:.2f} s of user audio per turn, server --threads {args.threads}, greedy, "
          f"{args.max_text_tokens} text / {args.max_speech_tokens} speech tokens", flush=True)
    levels = [run_level(args, n, pcm, lambda line: print(line, flush=True)) for n in args.sessions]
    print()
    print(table(levels))
    print()
    print("Scheduling: " + SCHEDULING)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine_description(), "bundle": str(args.bundle),
              "command": [Path(sys.executable).name, "-m", "opens2s_edge.benchmarks.serve_latency",
                          *(sys.argv[1:] if argv is None else argv)],
              "user_audio": {"path": str(args.audio), "seconds": len(pcm) / 2 / WIRE_RATE, "piece_ms": PIECE_MS},
              "turns_per_session": args.turns, "scheduling": SCHEDULING, "levels": levels}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "serve_latency.json"
    write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
