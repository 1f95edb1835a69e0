"""`opens2s-edge token2wav`: speech tokens -> 22.05 kHz wav with the GLM-4-Voice decoder (PyTorch)."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np

from opens2s_edge.cli import UserError
from opens2s_edge.runtime.files import check_audio_output, write_audio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoder", required=True, type=Path, help="folder with config.yaml, flow.pt, hift.pt")
    parser.add_argument(
        "--tokens",
        required=True,
        help="speech token ids: a comma/space separated list, a text file of ints, or a .npy file",
    )
    parser.add_argument("--out", required=True, type=Path, help="output .wav (16-bit PCM)")
    parser.add_argument("--stream", action="store_true", help="decode in streaming chunks (bounded history)")
    parser.add_argument("--chunk", type=int, default=20, help="tokens per streaming chunk after the first (20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flow noise and the vocoder source (0)")


def parse_tokens(spec: str) -> np.ndarray:
    """Token ids from a list literal or a file; UserError names the input on anything else."""
    path = Path(spec)
    source = f"--tokens {spec[:60]!r}" + ("..." if len(spec) > 60 else "")
    try:
        is_file = path.is_file()
    except OSError:  # a pasted list longer than a file name may be: it is a list
        is_file = False
    if path.suffix == ".npy" or is_file:
        if not path.is_file():
            raise UserError(f"{source}: file not found")
        if path.suffix == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise UserError(f"{source}: not a readable .npy array ({exc})") from exc
            if not np.issubdtype(arr.dtype, np.integer):
                raise UserError(f"{source}: expected an integer array, got dtype {arr.dtype}")
            if arr.ndim != 1:
                raise UserError(f"{source}: expected a 1-D array of token ids, got shape {arr.shape}")
            return arr.astype(np.int64)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{source}: cannot read as text ({exc})") from exc
        source = f"--tokens file {spec!r}"
    else:
        text = spec
    words = [w for w in re.split(r"[\s,\[\]]+", text) if w]
    bad = [w for w in words if not re.fullmatch(r"[+-]?\d+", w)]
    if bad:
        raise UserError(f"{source}: expected integer token ids, found {bad[0]!r}")
    if not words:
        raise UserError(f"{source}: no token ids; expected at least one integer")
    return np.array([int(w) for w in words], dtype=np.int64)


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.runtime.token2wav_stream import InvalidTokensError, StreamConfig, Token2WavError

    from .decoder import load_decoder

    tokens = parse_tokens(args.tokens)
    try:
        check_audio_output(args.out)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    try:
        decoder = load_decoder(args.decoder)
        start = time.perf_counter()
        if args.stream:
            config = StreamConfig(first_chunk=decoder.spec.block_size, chunk=args.chunk)
            stream = decoder.stream(config, seed=args.seed)
            pieces, first_audio = [], None
            for tok in tokens:
                pcm = stream.push([int(tok)])
                if len(pcm):
                    if first_audio is None:
                        first_audio = time.perf_counter() - start
                    pieces.append(pcm)
            pieces.append(stream.finalize())
            wav = np.concatenate(pieces)
            detail = f", {len(stream.estimator_frames)} chunks, max {max(stream.estimator_frames)} estimator frames"
            if first_audio is not None:
                detail += f", first audio after {first_audio * 1000:.0f} ms"
        else:
            wav = decoder.tokens_to_wav(tokens, seed=args.seed)
            detail = ""
    except InvalidTokensError as exc:
        raise UserError(f"--tokens {args.tokens!r}: {exc}") from exc
    except Token2WavError as exc:
        raise UserError(str(exc)) from exc
    elapsed = time.perf_counter() - start
    try:
        write_audio(args.out, wav, decoder.sample_rate)
    except OSError as exc:  # the disk filled up meanwhile: nothing half-written is left
        raise UserError(f"--out {args.out}: the audio could not be written: {exc}") from exc
    seconds = len(wav) / decoder.sample_rate
    print(
        f"{args.out}: {len(tokens)} tokens -> {len(wav)} samples ({seconds:.2f} s at {decoder.sample_rate} Hz) "
        f"in {elapsed:.2f} s{detail}"
    )
    return 0
