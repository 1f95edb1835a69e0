"""`opens2s-edge chat BUNDLE`: a spoken conversation in the terminal (torch-free).

Each line on standard input is a turn: a path to an audio file (the user speaks it) or text (the user types it).
Lines starting with `/` are commands: `/reset`, `/history`, `/save FILE` (the history as the reference's
messages jsonl, user audio beside it), `/quit`. With `--mic` each turn is recorded from the microphone until the
speaker stops (Silero VAD endpointing); with `--play` replies are spoken as they stream, and speaking over a
reply (with `--mic`) interrupts it: the conversation keeps only what was heard. `--out-dir` writes every reply as
`reply_NNN.wav`; `--json` prints one object per turn.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from . import cli_args
from .decoding import add_decode_arguments, decode_options_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle folder written by `opens2s-edge export`")
    p.add_argument("--mic", action="store_true", help="record each turn from the microphone (VAD endpointing)")
    p.add_argument("--play", action="store_true", help="speak replies as they stream")
    p.add_argument("--out-dir", type=Path, default=None, help="write each reply as OUT_DIR/reply_NNN.wav")
    p.add_argument("--json", action="store_true", help="one JSON object per turn on stdout")
    p.add_argument("--system", default=None, help="system prompt (default: the bundle's)")
    p.add_argument("--speaker", type=Path, default=None, help="a 512-value speaker vector (.npy) for the TTS LM")
    p.add_argument("--vad-threshold", type=float, default=0.5, help="speech probability threshold (0.5)")
    p.add_argument("--silence-ms", type=int, default=700, help="silence that ends a spoken turn, ms (700)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--provider", action="append", choices=["cpu", "cuda", "tensorrt"], default=None)
    p.add_argument("--threads", type=cli_args.threads, default=0, help="onnxruntime intra-op threads (0: its default)")
    add_decode_arguments(p)


def _turns_from_stdin() -> Iterator[str]:
    for line in sys.stdin:
        line = line.strip()
        if line:
            yield line


def _spoken_turns(mic: Any, endpointer: Any, max_seconds: float) -> Iterator[np.ndarray]:
    """One utterance per turn: from speech start (with the prefix padding) to its end, or the length limit."""
    rate = mic.sample_rate
    pad = endpointer.config.prefix_padding_ms * rate // 1000
    while True:
        print("[mic] listening ...", file=sys.stderr, flush=True)
        endpointer.reset()
        audio: list[np.ndarray] = []
        total = 0
        start = None
        while True:
            block = mic.wait(0.2)
            audio.append(block)
            total += block.size
            for event in endpointer.push(block):
                if event.kind == "speech_started" and start is None:
                    start = max(0, event.sample - pad)
                elif event.kind == "speech_stopped" and start is not None:
                    wav = np.concatenate(audio)
                    yield wav[start:event.sample]
                    break
            else:
                if start is not None and (total - start) / rate >= max_seconds:
                    yield np.concatenate(audio)[start:]
                elif start is not None or total < rate * 30:
                    continue
                else:  # keep a bounded look-back while nobody speaks
                    audio, total = [np.concatenate(audio)[-pad:]], min(total, pad)
                    endpointer.reset()
                continue
            break


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError

    from .audio import AudioInputError, load_wav
    from .audio_io import AudioDeviceError
    from .bundle import BundleError, load_bundle
    from .conversation import ConversationError
    from .decoder import ContextFull
    from .engine import AudioChunk, Engine, HistoryTrimmed, TextDelta, TurnDone, TurnOptions
    from .files import check_audio_output, write_audio
    from .onnx_backend import BackendError
    from .prompt import MessageError

    try:
        options = decode_options_from_args(args, TurnOptions)
        speaker = None
        if args.speaker is not None:
            try:
                speaker = np.load(args.speaker, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise UserError(f"--speaker {args.speaker}: not a readable .npy array ({exc})") from exc
        if args.out_dir is not None:
            check_audio_output(args.out_dir / "reply_001.wav", "--out-dir")
        engine = Engine.from_bundle(load_bundle(args.bundle), tuple(args.provider or ["cpu"]), args.threads,
                                    backend=args.backend)
        conv = engine.conversation(args.system, speaker)
    except (BundleError, BackendError, ValueError, OSError) as exc:
        raise UserError(str(exc)) from exc

    with ExitStack() as stack:
        try:
            speaker_out = mic = endpointer = barge = None
            if args.play:
                from .audio_io import Speaker

                speaker_out = stack.enter_context(Speaker(engine.sample_rate))
            if args.mic:
                from .audio_io import Microphone
                from .vad import Endpointer, VadConfig

                endpointer = Endpointer(VadConfig(args.vad_threshold, silence_duration_ms=args.silence_ms))
                barge = Endpointer(VadConfig(args.vad_threshold, silence_duration_ms=args.silence_ms))
                mic = stack.enter_context(Microphone(engine.frontend.sample_rate))
        except (AudioDeviceError, ValueError, RuntimeError) as exc:
            raise UserError(str(exc)) from exc
        inputs: Iterator[Any] = _spoken_turns(mic, endpointer, engine.max_audio_seconds) if mic else _turns_from_stdin()
        n = 0
        for item in inputs:
            audio, text = (item, "") if isinstance(item, np.ndarray) else (None, item)
            if text.startswith("/") and not Path(text).is_file():  # a command, unless it names a file
                command, _, rest = text.partition(" ")
                if command == "/quit":
                    break
                if command == "/reset":
                    conv.reset()
                    print("[chat] history cleared", file=sys.stderr)
                elif command == "/history":
                    print(json.dumps(conv.messages(), ensure_ascii=False, default=lambda _: "<audio>"))
                elif command == "/save" and rest.strip():
                    print(f"[chat] saved {conv.save(Path(rest.strip()))}", file=sys.stderr)
                else:
                    print(f"[chat] unknown command {text!r} (/reset, /history, /save FILE, /quit)", file=sys.stderr)
                continue
            if audio is None and Path(text).is_file():
                try:
                    audio, text = load_wav(text, engine.frontend.sample_rate), ""
                except AudioInputError as exc:
                    print(f"[chat] {exc}", file=sys.stderr)
                    continue
            try:
                turn = conv.turn(audio, text, options)
                done = None
                if barge is not None:
                    barge.reset()
                for event in turn:
                    if isinstance(event, TextDelta) and not args.json:
                        print(event.text, end="", flush=True)
                    elif isinstance(event, HistoryTrimmed):
                        print(f"\n[chat] history trimmed: {event.dropped} oldest messages left out",
                              file=sys.stderr)
                    elif isinstance(event, AudioChunk) and speaker_out is not None:
                        speaker_out.play(event.pcm)
                        heard = barge.push(mic.read()) if barge is not None else []
                        if any(e.kind == "speech_started" for e in heard):
                            done = turn.cancel(speaker_out.played)  # barge-in: keep what was heard
                            break
                    elif isinstance(event, TurnDone):
                        done = event
            except (AudioInputError, ConversationError, MessageError, ContextFull) as exc:
                print(f"[chat] {exc}", file=sys.stderr)
                continue
            except (BackendError, AudioDeviceError) as exc:
                raise UserError(str(exc)) from exc
            assert done is not None
            n += 1
            if args.out_dir is not None and done.audio.size:
                try:
                    write_audio(args.out_dir / f"reply_{n:03d}.wav", done.audio, done.sample_rate)
                except OSError as exc:  # the disk filled up: say so and go on with the conversation
                    print(f"[chat] reply {n} not written: {exc}", file=sys.stderr)
            if args.json:
                print(json.dumps(done.to_json()), flush=True)
            else:
                lat = done.latency
                first = f"{lat.first_audio_s * 1000:.0f} ms" if lat.first_audio_s is not None else "n/a"
                print(f"\n[turn {n}] first audio {first} | reused {done.reused} + prefilled {done.prefilled} "
                      f"positions | {lat.audio_s:.2f} s of audio | stopped: {done.stopped}", file=sys.stderr)
    return 0
