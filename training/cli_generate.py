"""`opens2s-edge generate`: the PyTorch pipeline on one utterance; prints text (or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="OpenS2S checkpoint folder")
    p.add_argument("--audio", type=Path, required=True, help="user utterance (wav/flac; 16 kHz mono preferred)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding for text and speech")
    p.add_argument("--reference-sampling", action="store_true",
                   help="sample speech over the whole TTS vocabulary, as the reference does")
    p.add_argument("--max-text-tokens", type=int, default=None)
    p.add_argument("--max-speech-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print {text, text_ids, speech_ids, speech_units}")


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime.audio import AudioInputError, load_wav
    from opens2s_edge.runtime.prompt import TokenizerError

    from .checkpoint import CheckpointError
    from .generate import GenerationOptions, Generator

    try:
        wav = load_wav(args.audio)
        generator = Generator(args.checkpoint)
    except (AudioInputError, CheckpointError, TokenizerError) as exc:
        raise UserError(str(exc)) from exc
    options = GenerationOptions(
        greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        reference_sampling=args.reference_sampling, max_text_tokens=args.max_text_tokens,
        max_speech_tokens=args.max_speech_tokens, seed=args.seed)
    result = generator(wav, options)
    if args.json:
        json.dump(result.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(result.text)
        print(f"[{len(result.text_ids)} text tokens, {len(result.speech_ids)} speech tokens]", file=sys.stderr)
    return 0
