"""`opens2s-edge export-tokenizer`: a GLM-4-Voice speech tokenizer folder -> a verified ONNX tokenizer bundle."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=Path, required=True,
                   help="GLM-4-Voice tokenizer folder (config.json, model.safetensors, preprocessor_config.json)")
    p.add_argument("--out", type=Path, required=True, help="tokenizer bundle folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime.speech_tokenizer import SpeechTokenizerError

    from .checks import GraphCheckError
    from .pipeline import ExportError
    from .speech_tokenizer import export_speech_tokenizer

    try:
        export_speech_tokenizer(args.tokenizer, args.out, args.force, progress=lambda line: print(line, flush=True))
    except (ExportError, SpeechTokenizerError, GraphCheckError) as exc:
        raise UserError(str(exc)) from exc
    return 0
