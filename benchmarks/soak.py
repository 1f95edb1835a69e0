"""Soak: many turns in one process, or through the server; resident memory and open file descriptors must stay flat
after warm-up, and every reply must equal the first one given the same input (greedy).

Usage:
    python -m opens2s_edge.benchmarks.soak BUNDLE [--turns 200] [--warmup 20] [--json soak.json]
    python -m opens2s_edge.benchmarks.soak BUNDLE --server [--per-connection 10] [--turns 200] [--json soak.json]

In-process (the default), the turns alternate between one-utterance turns (`Engine.turn`) and a conversation of
several turns that is reset every 4 turns (caches reused, history trimmed or cleared), so both paths run.

`--server` starts the real `opens2s-edge serve BUNDLE --port 0` in a subprocess and drives it with the official
`openai` SDK's realtime client: typed user text (`conversation.item.create` + `response.create`, up to
`response.done`), a fresh connection every `--per-connection` turns; of the connections' last turns one in three is
cancelled at its first audio (`response.cancel`) and one in three is cut by closing the connection at its first audio.
Every other turn's reply (transcript and audio bytes) must equal the first reply to the same prompt at the same place
in a fresh session. The server's RSS (/proc/PID/status VmRSS) and descriptor count (/proc/PID/fd) are sampled after
each turn; at the end it is stopped with SIGINT and must exit with status 0.

The slope is a least-squares fit of RSS (bytes per turn) and of the descriptor count over the turns after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import time
from importlib import resources
from pathlib import Path

import numpy as np

from opens2s_edge.runtime.audio import load_wav
from opens2s_edge.runtime.bundle import load_bundle
from opens2s_edge.runtime.engine import Engine, TurnDone, TurnOptions

from .harness import cpu_model, open_fds, process_rss_bytes
from .serve_process import serve_process

HELLO = Path(str(resources.files("opens2s_edge") / "assets" / "hello.wav"))  # the package's, installed or not
MAX_TEXT_TOKENS, MAX_SPEECH_TOKENS = 12, 48
PROMPTS = ("Hello! How are you today?", "Tell me about the weather.", "That sounds lovely, thank you.",
           "What should I do this weekend?")
TURN_TIMEOUT_S = 300


def slope(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    x = np.arange(len(values), dtype=np.float64)
    return float(np.polyfit(x, np.asarray(values, np.float64), 1)[0])


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs"


def summary(rows: list[dict], warmup: int) -> dict:
    """The slopes after warm-up; also over the last half alone, and the largest one-turn RSS rise after warm-up (a
    one-off step, such as the allocator taking another arena, moves a least-squares slope as a steady leak would)."""
    steady = rows[warmup:]
    rises = [(b["rss"] - a["rss"], b["turn"]) for a, b in zip(steady[:-1], steady[1:], strict=True)]
    rise, at = max(rises) if rises else (0, None)
    return {"rss_slope_bytes_per_turn": slope([r["rss"] for r in steady]),
            "rss_slope_last_half_bytes_per_turn": slope([r["rss"] for r in rows[len(rows) // 2:]]),
            "rss_largest_rise_bytes": rise, "rss_largest_rise_turn": at,
            "rss_steady_min": min(r["rss"] for r in steady), "rss_steady_max": max(r["rss"] for r in steady),
            "fds_slope_per_turn": slope([r["fds"] for r in steady]),
            "rss_first_steady": steady[0]["rss"] if steady else None, "rss_last": rows[-1]["rss"],
            "fds_first_steady": steady[0]["fds"] if steady else None, "fds_last": rows[-1]["fds"],
            "seconds_per_turn_p50": float(np.median([r["seconds"] for r in rows]))}


# -- in one process ------------------------------------------------------------------------------------------------
def soak(bundle: Path, turns: int, warmup: int, threads: int = 1) -> dict:
    engine = Engine.from_bundle(load_bundle(bundle, verify=False), threads=threads)
    wav = load_wav(HELLO, engine.frontend.sample_rate)
    options = TurnOptions(greedy=True, max_text_tokens=MAX_TEXT_TOKENS, max_speech_tokens=MAX_SPEECH_TOKENS)
    conv = engine.conversation()
    first: dict[str, tuple] = {}
    rows = []
    t0 = time.perf_counter()
    for k in range(turns):
        kind = "oneshot" if k % 2 == 0 else f"conversation[{(k // 2) % 4}]"
        if kind == "conversation[0]":
            conv.reset()
        events = engine.turn(wav, options) if kind == "oneshot" else conv.turn(wav, "", options)
        done = None
        for event in events:
            if isinstance(event, TurnDone):
                done = event
        assert done is not None
        ids = (tuple(done.text_ids), tuple(done.speech_ids))
        same = first.setdefault(kind, ids) == ids
        rows.append({"turn": k, "kind": kind, "rss": process_rss_bytes(), "fds": open_fds(), "same_ids": same,
                     "seconds": done.latency.total_s})
        if (k + 1) % 20 == 0:
            print(f"[soak] {k + 1}/{turns} turns, rss {rows[-1]['rss'] / 2**20:.1f} MiB, {rows[-1]['fds']} fds",
                  flush=True)
    return {"mode": "engine", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "bundle": str(bundle),
            "turns": turns, "warmup": warmup, "threads": threads, "wall_s": time.perf_counter() - t0,
            **summary(rows, warmup), "all_ids_equal": all(r["same_ids"] for r in rows), "rows": rows}


# -- through the server --------------------------------------------------------------------------------------------
def _plan(turns: int, per_connection: int) -> list[tuple[int, int, str]]:
    """(connection, place in it, action) per turn: every connection's last turn is completed, cancelled or cut by
    closing the connection, in turn; all other turns are completed."""
    plan = []
    for k in range(turns):
        c, j = divmod(k, per_connection)
        last = j == per_connection - 1 or k == turns - 1
        plan.append((c, j, ("complete", "cancel", "disconnect")[c % 3] if last else "complete"))
    return plan


async def _turn(conn, prompt: str, action: str) -> dict:  # noqa: ANN001 - the SDK's connection type
    """One typed turn: the reply's transcript, audio and final status (`disconnected` when the client left)."""
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": prompt}]})
    await conn.response.create()
    text, audio, status, acted, errors = [], [], None, False, []
    async with asyncio.timeout(TURN_TIMEOUT_S):
        async for event in conn:
            if event.type == "response.output_audio_transcript.delta":
                text.append(event.delta)
            elif event.type == "response.output_audio.delta":
                audio.append(base64.b64decode(event.delta))
                if action != "complete" and not acted:
                    acted = True
                    if action == "disconnect":
                        status = "disconnected"
                        break
                    await conn.response.cancel()
            elif event.type == "error":
                if event.error.code == "response_cancel_not_active":
                    continue  # the cancel came after the reply had ended: it completed
                errors.append(f"{event.error.code}: {event.error.message}")
            elif event.type == "response.done":
                status = event.response.status
                break
    if status is None:
        raise RuntimeError(f"the connection closed before response.done ({prompt!r})")
    audio_bytes = b"".join(audio)
    return {"status": status, "text": "".join(text), "audio_bytes": len(audio_bytes),
            "audio_sha256": hashlib.sha256(audio_bytes).hexdigest(), "errors": errors}


async def _drive(port: int, pid: int, turns: int, per_connection: int) -> tuple[list[dict], int]:
    import openai

    client = openai.AsyncOpenAI(api_key="sk-local", websocket_base_url=f"ws://127.0.0.1:{port}/v1")
    plan = _plan(turns, per_connection)
    first: dict[int, tuple] = {}
    rows: list[dict] = []
    k = 0
    while k < turns:
        async with client.realtime.connect(model="opens2s-edge") as conn:
            created = await conn.recv()
            if created.type != "session.created":
                raise RuntimeError(f"expected session.created, got {created.type}")
            while k < turns:
                c, j, action = plan[k]
                t0 = time.perf_counter()
                reply = await _turn(conn, PROMPTS[j % len(PROMPTS)], action)
                seconds = time.perf_counter() - t0
                same = None
                if action == "complete":  # every earlier turn of this connection completed too: same history
                    signature = (reply["text"], reply["audio_sha256"])
                    same = first.setdefault(j, signature) == signature
                rows.append({"turn": k, "connection": c, "place": j, "action": action, **reply, "same_reply": same,
                             "seconds": seconds, "rss": process_rss_bytes(pid), "fds": open_fds(pid)})
                k += 1
                if (k % 20) == 0:
                    print(f"[soak --server] {k}/{turns} turns ({c + 1} connections), server rss "
                          f"{rows[-1]['rss'] / 2**20:.1f} MiB, {rows[-1]['fds']} fds", flush=True)
                if action == "disconnect" or j == per_connection - 1:
                    break  # leaving the block closes the connection (mid-reply for a disconnect)
    return rows, len(first)


def soak_server(bundle: Path, turns: int, warmup: int, per_connection: int, threads: int = 1) -> dict:
    args = ["--threads", str(threads), "--greedy", "--max-text-tokens", str(MAX_TEXT_TOKENS), "--max-speech-tokens",
            str(MAX_SPEECH_TOKENS), "--log-level", "warning"]
    t0 = time.perf_counter()
    with serve_process(bundle, args, require_clean_exit=False) as server:
        proc, port, log = server.proc, server.port, server.log
        start = {"rss": process_rss_bytes(proc.pid), "fds": open_fds(proc.pid)}
        rows, places = asyncio.run(_drive(port, proc.pid, turns, per_connection))
        deadline = time.monotonic() + 10
        while (health := json.loads(server.get("/health")[2]))["sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        end = {"rss": process_rss_bytes(proc.pid), "fds": open_fds(proc.pid), "health": health}
    compared = [r for r in rows if r["same_reply"] is not None]
    clean = proc.returncode == 0 and not any("Traceback" in line for line in log)
    return {"mode": "server", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "bundle": str(bundle),
            "command": ["opens2s-edge", "serve", str(bundle), "--port", "0", *args], "turns": turns,
            "warmup": warmup, "per_connection": per_connection, "connections": rows[-1]["connection"] + 1,
            "actions": {a: sum(r["action"] == a for r in rows) for a in ("complete", "cancel", "disconnect")},
            "statuses": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
            "wall_s": time.perf_counter() - t0, **summary(rows, warmup), "server_at_start": start,
            "server_at_end": end, "replies_compared": len(compared), "distinct_places": places,
            "all_replies_equal": all(r["same_reply"] for r in compared),
            "client_errors": [e for r in rows for e in r["errors"]], "server_exit_code": proc.returncode,
            "clean_exit": clean, "server_log_tail": log[-20:], "rows": rows}


def _table(report: dict) -> str:
    mib = 2**20
    same = report["all_ids_equal"] if report["mode"] == "engine" else (
        f"{report['all_replies_equal']} ({report['replies_compared']} compared)")
    extra = f", {report['connections']} connections" if report["mode"] == "server" else ""
    return (f"| mode | turns | RSS after warm-up -> end (MiB) | RSS slope (bytes/turn) | fds after warm-up -> end | "
            f"fd slope (/turn) | s/turn p50 | same replies |\n|---|---|---|---|---|---|---|---|\n"
            f"| {report['mode']} | {report['turns']}{extra} | {report['rss_first_steady'] / mib:.1f} -> "
            f"{report['rss_last'] / mib:.1f} | {report['rss_slope_bytes_per_turn']:.0f} | "
            f"{report['fds_first_steady']} -> {report['fds_last']} | {report['fds_slope_per_turn']:.3f} | "
            f"{report['seconds_per_turn_p50']:.2f} | {same} |\n"
            f"after warm-up RSS between {report['rss_steady_min'] / mib:.1f} and {report['rss_steady_max'] / mib:.1f} "
            f"MiB; slope over the last half {report['rss_slope_last_half_bytes_per_turn']:.0f} bytes/turn; largest "
            f"one-turn rise {report['rss_largest_rise_bytes'] / mib:.2f} MiB (turn {report['rss_largest_rise_turn']})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--server", action="store_true", help="through `opens2s-edge serve` and the openai SDK client")
    p.add_argument("--per-connection", type=int, default=10, help="--server: turns per connection (default 10)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.turns <= args.warmup or args.warmup < 0:
        p.error("--turns must exceed --warmup (>= 0)")
    if args.per_connection < 1:
        p.error("--per-connection must be at least 1")
    if args.server:
        report = soak_server(args.bundle, args.turns, args.warmup, args.per_connection, args.threads)
        ok = report["all_replies_equal"] and report["clean_exit"] and not report["client_errors"]
        print(_table(report))
        print(f"actions {report['actions']}, statuses {report['statuses']}, server exit {report['server_exit_code']}"
              f"{'' if report['clean_exit'] else ' (not clean)'}, client errors {len(report['client_errors'])}")
    else:
        report = soak(args.bundle, args.turns, args.warmup, args.threads)
        ok = report["all_ids_equal"]
        print(_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
