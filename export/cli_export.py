"""`opens2s-edge export`: an OpenS2S checkpoint and a GLM-4-Voice decoder -> a verified bundle."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="OpenS2S checkpoint folder")
    p.add_argument("--decoder", type=Path, required=True,
                   help="GLM-4-Voice decoder folder (config.yaml, flow.pt, hift.pt)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--max-context", type=int, default=2048, help="KV-cache length of the LLM and TTS LM graphs")
    p.add_argument("--max-audio-seconds", type=int, default=30, help="longest user utterance the audio graph takes")
    p.add_argument("--form", choices=["classic", "modern"], default="classic",
                   help="decoder graph ops: classic (ScatterElements + MatMul/Softmax; TensorRT 10.3, JetPack 6) or "
                        "modern (opset 24 TensorScatter, Attention, RMSNormalization, RotaryEmbedding; TensorRT 10.15)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime.prompt import TokenizerError
    from opens2s_edge.training.checkpoint import CheckpointError
    from opens2s_edge.training.token2wav.config import DecoderConfigError
    from opens2s_edge.training.token2wav.decoder import DecoderFilesError

    from .checks import GraphCheckError
    from .pipeline import ExportError, export_bundle

    for name, path in (("--checkpoint", args.checkpoint), ("--decoder", args.decoder)):
        if not path.is_dir():
            raise UserError(f"{name} {path} is not a folder")
    try:
        export_bundle(args.checkpoint, args.decoder, args.out, args.dtype, args.max_context, args.max_audio_seconds,
                      args.force, progress=lambda line: print(line, flush=True), form=args.form)
    except (ExportError, CheckpointError, TokenizerError, DecoderFilesError, DecoderConfigError,
            GraphCheckError) as exc:
        raise UserError(str(exc)) from exc
    return 0
