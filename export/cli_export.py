"""`opens2s-edge export`: an OpenS2S checkpoint and a GLM-4-Voice decoder -> a verified bundle."""

from __future__ import annotations

import argparse
import errno
import re
from pathlib import Path


def _form(value: str) -> str:
    """classic, modern, gqa, or trtX.Y: the form TensorRT X.Y parses (resolved in main, where onnx may be imported)."""
    if value in ("classic", "modern", "gqa") or re.fullmatch(r"trt\d+\.\d+(\.\d+)*", value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not classic, modern or trtX.Y (a TensorRT version: trt10.3, "
                                     "trt10.16, trt11.4), nor gqa (onnxruntime's form)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="OpenS2S checkpoint folder")
    p.add_argument("--decoder", type=Path, required=True,
                   help="GLM-4-Voice decoder folder (config.yaml, flow.pt, hift.pt)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--max-context", type=int, default=2048, help="KV-cache length of the LLM and TTS LM graphs")
    p.add_argument("--max-audio-seconds", type=int, default=30, help="longest user utterance the audio graph takes")
    p.add_argument("--form", type=_form, default="classic", metavar="classic|modern|gqa|trtX.Y",
                   help="decoder graph ops: classic (ScatterElements + MatMul/Softmax; TensorRT 10.3, JetPack 6), "
                        "modern (opset 24 TensorScatter, Attention, RMSNormalization, RotaryEmbedding; TensorRT 10.15 "
                        "and later), gqa (onnxruntime's GroupQueryAttention: a step reads only the filled cache rows; "
                        "onnxruntime CPU/CUDA only, the fastest there), or trtX.Y: the form TensorRT X.Y parses, every "
                        "graph then checked against that release's ONNX support list (trt10.3 -> classic, trt10.16 / "
                        "trt11.4 -> modern)")
    p.add_argument("--weights", choices=["float", "int4", "int8"], default="float",
                   help="weight-only quantization with onnxruntime's MatMulNBitsQuantizer (onnxruntime CPU/CUDA; "
                        "not TensorRT): int4 or int8 weights, activations at --dtype")
    p.add_argument("--block-size", type=int, default=32, help="--weights: block along K per scale (32, 64 or 128)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=True,
                     help="--weights: symmetric blocks, no zero points (default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="--weights: a zero point per block")
    p.add_argument("--accuracy-level", type=int, default=4,
                   help="--weights: MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations "
                        "inside the matmul (default 4: the fast CPU kernel)")
    p.add_argument("--weight-graphs", default="llm,tts_lm",
                   help="--weights: graphs to quantize, comma-separated (llm, tts_lm, audio_encoder, estimator, flow, "
                        "tts_projection; default llm,tts_lm)")
    p.add_argument("--float-lm-head", action="store_true", help="--weights: keep the decoders' lm_head in float")
    p.add_argument("--flow-steps", type=int, default=None,
                   help="token2wav Euler steps recorded in the manifest (default: the decoder's own, 10)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out that is a bundle export wrote, or an empty folder (anything else "
                        "is refused and left untouched)")


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime.prompt import TokenizerError
    from opens2s_edge.training.checkpoint import CheckpointError
    from opens2s_edge.training.token2wav.config import DecoderConfigError
    from opens2s_edge.training.token2wav.decoder import DecoderFilesError

    from .checks import GraphCheckError, UnsupportedTensorRT, release_for, tensorrt_readiness
    from .pipeline import ExportError, export_bundle
    from .weight_quant import WeightOptions

    for name, path in (("--checkpoint", args.checkpoint), ("--decoder", args.decoder)):
        if not path.is_dir():
            raise UserError(f"{name} {path} is not a folder")
    release = None
    form = args.form
    if form.startswith("trt"):
        try:
            release = release_for(form[3:])
        except UnsupportedTensorRT as exc:
            raise UserError(str(exc)) from exc
        form = release.form
        print(f"[export] --form {args.form}: the {form} form (TensorRT {release.name}'s ONNX support list: "
              f"{release.covers})", flush=True)
    weights = None
    if args.weights != "float":
        weights = WeightOptions(args.weights, args.block_size, args.symmetric, args.accuracy_level,
                                tuple(g.strip() for g in args.weight_graphs.split(",") if g.strip()),
                                args.float_lm_head)
    elif args.block_size != 32 or args.accuracy_level != 4 or not args.symmetric or args.float_lm_head:
        raise UserError("--block-size, --asymmetric, --accuracy-level and --float-lm-head apply to --weights int4|int8")
    if weights is not None and release is not None:
        raise UserError(f"--weights {args.weights} writes MatMulNBits (onnxruntime's op), which TensorRT does not "
                        f"parse: drop --form {args.form}, or quantize for TensorRT with "
                        "`opens2s-edge build --precision`")
    try:
        bundle = export_bundle(args.checkpoint, args.decoder, args.out, args.dtype, args.max_context,
                               args.max_audio_seconds, args.force, progress=lambda line: print(line, flush=True),
                               form=form, weights=weights, flow_steps=args.flow_steps)
    except (ExportError, CheckpointError, TokenizerError, DecoderFilesError, DecoderConfigError,
            GraphCheckError) as exc:
        raise UserError(str(exc)) from exc
    except OSError as exc:  # the disk filled up, a file-size limit, a folder that became unwritable
        full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        raise UserError(f"--out {args.out}: the export stopped: {exc.strerror or exc}"
                        f"{' (the disk is full or a file-size limit was reached)' if full else ''}"
                        f"{f' at {exc.filename}' if exc.filename else ''}; no partial bundle was left") from exc
    if release is not None:
        # The export itself checks against the 10.15 list; a bundle for another release is checked against its own.
        from opens2s_edge.runtime.bundle import load_bundle

        loaded = load_bundle(bundle, verify=False)
        problems = [f"{g}: {p}" for g in loaded.manifest["graphs"]
                    for p in tensorrt_readiness(loaded.graph_path(g), release=release)]
        if problems:
            raise UserError(f"{bundle} was written, but TensorRT {release.name} would not parse it:\n  "
                            + "\n  ".join(problems))
        print(f"[export] every graph is ready for TensorRT {release.name}", flush=True)
    return 0
