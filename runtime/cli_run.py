"""`opens2s-edge run`: one voice turn on a bundle, torch-free. Streams the text, writes the reply audio
atomically, ends with a latency line (or prints JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from . import cli_args
from .decoding import add_decode_arguments, decode_options_from_args
from .files import check_audio_output, write_audio


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle folder written by `opens2s-edge export`")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", type=Path, help="user utterance file (16 kHz mono preferred)")
    source.add_argument("--mic", type=float, metavar="SECONDS", help="record the utterance from the microphone")
    p.add_argument("--out", type=Path, help="reply audio file (wav, 22.05 kHz)")
    p.add_argument("--play", action="store_true", help="play the reply on the speaker as it streams")
    add_decode_arguments(p)
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="onnxruntime (the bundle's ONNX graphs, on --provider) or tensorrt (the bundle's engines "
                        "from `opens2s-edge build`, run natively with cuda-python); default onnxruntime")
    p.add_argument("--provider", action="append", default=None, choices=["cpu", "cuda", "tensorrt"],
                   help="onnxruntime execution provider (repeatable, in priority order; default cpu)")
    p.add_argument("--engines", metavar="KEY", default=None,
                   help="--backend tensorrt: the engine set to use (a folder name under BUNDLE/engines/); "
                        "default: the one built for this GPU and TensorRT")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="--backend tensorrt: launch every decode step instead of replaying a captured CUDA graph")
    p.add_argument("--threads", type=cli_args.threads, default=0, help="intra-op threads (0 = onnxruntime default)")
    p.add_argument("--json", action="store_true",
                   help="print {text, text_ids, speech_ids, speech_units, latency} instead of streaming text")


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError

    from .audio import AudioInputError, Frontend, load_wav
    from .audio_io import AudioDeviceError, Speaker, record
    from .bundle import BundleError, load_bundle, read_manifest
    from .engine import AudioChunk, AudioTooLong, Engine, TextDelta, TurnDone, TurnOptions
    from .onnx_backend import BackendError

    if args.out is None and not args.play:
        raise UserError("say where the reply goes: --out FILE.wav and/or --play")
    try:
        if args.out is not None:
            check_audio_output(args.out)
        if args.mic is not None:
            print(f"[mic] recording {args.mic:g} s ...", file=sys.stderr, flush=True)
            wav = record(args.mic)
        else:
            wav = load_wav(args.audio, Frontend.from_json(read_manifest(args.bundle)["audio"]).sample_rate)
        if args.backend == "tensorrt" and args.provider:
            raise UserError("--provider chooses onnxruntime's execution providers; --backend tensorrt runs the "
                            "bundle's engines directly (drop --provider, or use --backend onnxruntime)")
        if args.backend != "tensorrt" and (args.engines or args.no_cuda_graphs):
            raise UserError("--engines and --no-cuda-graphs apply to --backend tensorrt")
        engine = Engine.from_bundle(load_bundle(args.bundle), tuple(args.provider or ["cpu"]), args.threads,
                             backend=args.backend, engines=args.engines, cuda_graphs=not args.no_cuda_graphs)
        options = decode_options_from_args(args, TurnOptions)
    except (AudioInputError, AudioDeviceError, BundleError, BackendError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    try:
        events = engine.turn(wav, options)
    except AudioTooLong as exc:
        raise UserError(f"{args.audio or 'microphone'}: {exc}") from exc
    try:
        with Speaker(engine.token2wav.spec.sample_rate) if args.play else nullcontext() as speaker:
            done = None
            for event in events:
                if isinstance(event, TextDelta) and not args.json:
                    print(event.text, end="", flush=True)
                elif isinstance(event, AudioChunk) and speaker is not None:
                    speaker.play(event.pcm)
                elif isinstance(event, TurnDone):
                    done = event
    except (AudioDeviceError, BackendError) as exc:  # mid-turn: e.g. an input outside the engines' profiles
        raise UserError(str(exc)) from exc
    assert done is not None
    if args.out is not None:
        try:
            write_audio(args.out, done.audio, done.sample_rate)
        except OSError as exc:  # the disk filled up meanwhile: nothing half-written is left
            raise UserError(f"--out {args.out}: the reply could not be written: {exc}") from exc
    lat = done.latency
    if args.json:
        json.dump(done.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(flush=True)
        rtf = f"{lat.rtf:.3f}" if lat.rtf is not None else "n/a"
        first_text = f"{lat.first_text_s * 1000:.0f} ms" if lat.first_text_s is not None else "n/a"
        first_audio = f"{lat.first_audio_s * 1000:.0f} ms" if lat.first_audio_s is not None else "n/a"
        print(f"[latency] first text token {first_text} | first audio {first_audio} | RTF {rtf} | "
              f"{lat.audio_s:.2f} s of audio in {lat.total_s:.2f} s | stopped: {done.stopped}"
              + (f" -> {args.out}" if args.out else ""),
              file=sys.stderr)
    return 0
