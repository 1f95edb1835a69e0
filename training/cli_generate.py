"""`opens2s-edge generate`: the PyTorch pipeline on one utterance; prints text (or JSON), optionally speaks.

`--device cuda` runs it on a GPU with CUDA-graph decode steps (training/cuda_backend.py): the path for
machines without TensorRT.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from opens2s_edge.runtime.decoding import add_decode_arguments, decode_options_from_args


def _device(value: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not cpu, cuda or cuda:N")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="OpenS2S checkpoint folder")
    p.add_argument("--audio", type=Path, required=True, help="user utterance (wav/flac; 16 kHz mono preferred)")
    add_decode_arguments(p)
    p.add_argument("--json", action="store_true", help="print {text, text_ids, speech_ids, speech_units, prompt_ids}")
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="weights and activations (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the single-token decode steps as CUDA graphs (default: on with --device cuda)")
    p.add_argument("--compile", action="store_true",
                   help="decode steps through torch.compile(mode='reduce-overhead') instead of our own graphs")
    p.add_argument("--kernels", choices=["torch", "triton"], default="torch",
                   help="decode-step kernels: torch (PyTorch's ops) or triton (kernels/: RMSNorm, RoPE, SwiGLU and an "
                        "attention reading only the filled cache rows; reference fallbacks on the CPU)")
    p.add_argument("--weights", choices=["int8", "int4"], default=None,
                   help="quantize the decoders' projections weight-only (dequantized inside the Triton matvec kernel "
                        "with --kernels triton); default: the checkpoint's weights in --dtype")
    p.add_argument("--max-context", type=int, default=4096, help="KV cache length per LM (4096)")
    p.add_argument("--decoder", type=Path, default=None,
                   help="GLM-4-Voice decoder folder: synthesize the reply (streaming, on the same device)")
    p.add_argument("--out", type=Path, default=None, help="reply audio file (wav, 22.05 kHz); needs --decoder")
    p.add_argument("--timings", action="store_true",
                   help="print per-step timing statistics (JSON) to stderr")


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime.audio import AudioInputError, load_wav
    from opens2s_edge.runtime.files import check_audio_output, write_audio
    from opens2s_edge.runtime.prompt import TokenizerError
    from opens2s_edge.runtime.token2wav_stream import Token2WavError

    from .checkpoint import CheckpointError, read_frontend
    from .cuda_backend import DeviceError
    from .generate import Generator

    if args.out is not None and args.decoder is None:
        raise UserError("--out needs --decoder (the GLM-4-Voice decoder folder that turns speech tokens into audio)")
    if args.max_context < 2:
        raise UserError(f"--max-context must be at least 2, got {args.max_context}")
    try:
        if args.out is not None:
            check_audio_output(args.out)
        wav = load_wav(args.audio, read_frontend(args.checkpoint).sample_rate)
        generator = Generator(args.checkpoint, dtype=args.dtype, max_context=args.max_context, device=args.device,
                              cuda_graphs=args.cuda_graphs, compile=args.compile, decoder=args.decoder,
                              kernels=args.kernels, weights=args.weights)
    except (AudioInputError, CheckpointError, TokenizerError, DeviceError, Token2WavError) as exc:
        raise UserError(str(exc)) from exc
    if generator.device.type == "cuda" and args.dtype == "fp32":
        import torch

        # fp32 means fp32: no TF32 in cuDNN convolutions (the audio encoder) or matmuls.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    options = decode_options_from_args(args)
    result = generator(wav, options)
    if args.out is not None:
        try:
            write_audio(args.out, result.audio, result.sample_rate)
        except OSError as exc:  # the disk filled up meanwhile: nothing half-written is left
            raise UserError(f"--out {args.out}: the reply could not be written: {exc}") from exc
    if args.json:
        json.dump(result.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(result.text)
        print(f"[{len(result.text_ids)} text tokens, {len(result.speech_ids)} speech tokens]", file=sys.stderr)
    if args.out is not None:
        print(f"[{result.audio.shape[0] / result.sample_rate:.2f} s of audio -> {args.out}]", file=sys.stderr)
    if args.timings:
        summary = {"device": str(generator.device), "dtype": str(generator.dtype).removeprefix("torch."),
                   "step_mode": generator.step_mode, "kernels": args.kernels, "weights": args.weights,
                   **result.timing_summary()}
        print(json.dumps(summary, indent=1), file=sys.stderr)
    return 0
