"""A multi-turn conversation: per-turn time to first audio and prefill, with KV reuse against the reference's way.

Usage:
    python -m opens2s_edge.benchmarks.conversation BUNDLE [--turns 5] [--threads 1] [--json conversation.json]
        [--audio WAV ...] [--max-text-tokens 24] [--max-speech-tokens 64]

Each turn the user speaks (the given wavs in rotation, or the embedded sample), then the assistant answers.
- `reuse`: one Conversation; turn k prefills only what follows the cached prefix, earlier audio is not encoded again.
- `reference`: what the reference worker does: turn k renders the whole history and runs it from empty caches,
  every audio of the history encoded again (a fresh Conversation given the same history each turn).
Both make the same greedy tokens (tests/test_conversation.py checks it); the table shows what each costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from opens2s_edge.runtime.audio import load_wav
from opens2s_edge.runtime.bundle import load_bundle
from opens2s_edge.runtime.engine import Engine, TurnDone, TurnOptions

HELLO = Path(__file__).resolve().parents[1] / "opens2s_edge" / "assets" / "hello.wav"


def _history(conv: object) -> list[dict]:
    from opens2s_edge.runtime.conversation import AudioPart

    out = []
    for m in conv.history:  # type: ignore[attr-defined]
        content = [{"audio": p.wav} if isinstance(p, AudioPart) else {"text": p} for p in m.parts] \
            if m.role == "user" else m.content()
        out.append({"role": m.role, "content": content})
    return out


def _timed(turn: object) -> tuple[TurnDone, float]:
    t0 = time.perf_counter()
    done = None
    for event in turn:  # type: ignore[attr-defined]
        if isinstance(event, TurnDone):
            done = event
    assert done is not None
    return done, time.perf_counter() - t0


def run(bundle: Path, wavs: list[np.ndarray], turns: int, threads: int, options: TurnOptions) -> list[dict]:
    engine = Engine.from_bundle(load_bundle(bundle, verify=False), threads=threads)
    reuse = engine.conversation()
    rows = []
    for k in range(turns):
        wav = wavs[k % len(wavs)]
        before = _history(reuse)
        done, wall = _timed(reuse.turn(wav, "", options))
        fresh = engine.conversation(history=before)
        ref_done, ref_wall = _timed(fresh.turn(wav, "", options))
        assert ref_done.text_ids == done.text_ids, "reuse and the reference's way must decide alike"
        audios = sum(1 for m in before if m["role"] == "user") + 1
        rows.append({
            "turn": k + 1, "history_audios": audios,
            "reuse": {"first_audio_s": done.latency.first_audio_s, "prefill_s": done.latency.prefill_s,
                      "encode_s": done.latency.encode_s, "reused": done.reused, "prefilled": done.prefilled,
                      "total_s": wall},
            "reference": {"first_audio_s": ref_done.latency.first_audio_s, "prefill_s": ref_done.latency.prefill_s,
                          "encode_s": ref_done.latency.encode_s, "reused": ref_done.reused,
                          "prefilled": ref_done.prefilled,
                          "total_s": ref_wall},
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| turn | audios in history | prefilled: reuse / reference | prefill ms: reuse / reference | "
             "first audio ms: reuse / reference | first-audio ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["reuse"], r["reference"]
        fa, fb = a["first_audio_s"] or float("nan"), b["first_audio_s"] or float("nan")
        lines.append(f"| {r['turn']} | {r['history_audios']} | {a['prefilled']} / {b['prefilled']} | "
                     f"{a['prefill_s'] * 1e3:.0f} / {b['prefill_s'] * 1e3:.0f} | {fa * 1e3:.0f} / {fb * 1e3:.0f} | "
                     f"{fb / fa:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--audio", type=Path, nargs="*", default=None)
    p.add_argument("--max-text-tokens", type=int, default=24)
    p.add_argument("--max-speech-tokens", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.turns < 1 or args.threads < 0:
        p.error("--turns must be at least 1 and --threads at least 0")
    frontend_rate = load_bundle(args.bundle, verify=False).spec.audio.sample_rate
    wavs = [load_wav(w, frontend_rate) for w in (args.audio or [HELLO])]
    options = TurnOptions(greedy=True, max_text_tokens=args.max_text_tokens, max_speech_tokens=args.max_speech_tokens)
    print(f"[conversation] {args.turns} turns on {args.bundle}, {args.threads} thread(s)", flush=True)
    rows = run(args.bundle, wavs, args.turns, args.threads, options)
    print(table(rows))
    if args.json is not None:
        report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                  "bundle": str(args.bundle), "threads": args.threads, "turns": rows}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
