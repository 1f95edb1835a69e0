"""`opens2s-edge generate`: the PyTorch pipeline on one utterance; prints text (or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opens2s_edge.runtime.decoding import add_decode_arguments, decode_options_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="OpenS2S checkpoint folder")
    p.add_argument("--audio", type=Path, required=True, help="user utterance (wav/flac; 16 kHz mono preferred)")
    add_decode_arguments(p)
    p.add_argument("--json", action="store_true", help="print {text, text_ids, speech_ids, speech_units}")


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime.audio import AudioInputError, load_wav
    from opens2s_edge.runtime.prompt import TokenizerError

    from .checkpoint import CheckpointError
    from .generate import Generator

    try:
        wav = load_wav(args.audio)
        generator = Generator(args.checkpoint)
    except (AudioInputError, CheckpointError, TokenizerError) as exc:
        raise UserError(str(exc)) from exc
    options = decode_options_from_args(args)
    result = generator(wav, options)
    if args.json:
        json.dump(result.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(result.text)
        print(f"[{len(result.text_ids)} text tokens, {len(result.speech_ids)} speech tokens]", file=sys.stderr)
    return 0
