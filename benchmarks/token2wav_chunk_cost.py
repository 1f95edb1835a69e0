"""Per-chunk cost of streaming token2wav against the response length: bounded window vs full-history re-encode.

Usage:
    python -m opens2s_edge.benchmarks.token2wav_chunk_cost [--decoder DIR | --preset small] [--tokens 360]
        [--json token2wav_chunk_cost.json] [--repeats 1]

Both sides run the same weights through the same PyTorch backend and the same Euler/CFG solver:
- ours: `Token2WavStream` (first chunk 10 tokens, then 20; the flow sees a 20-token window of history);
- reference-style: the OpenS2S worker's loop, 24-token chunks, every chunk re-encodes the whole history as the
  flow prompt with all earlier mel as the condition, and vocodes the new mel.
Without --decoder a deterministic random decoder of the given preset (default "small") is written to a
temporary folder; timing does not depend on the weights' values. The table shows, per chunk, where the chunk
ends in the response, the estimator frames per call and the wall time of the chunk (flow + vocoder), with the
cost per second of produced audio; the JSON holds every row.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from opens2s_edge.runtime.token2wav_stream import StreamConfig, Token2WavBackend, Token2WavStream, solve_flow
from opens2s_edge.training.token2wav.decoder import load_decoder
from opens2s_edge.training.token2wav.init import write_random_decoder


def ours(backend: Token2WavBackend, tokens: np.ndarray, config: StreamConfig) -> list[dict]:
    stream = Token2WavStream(backend, config, random_source=False)
    rows, pos = [], 0
    sizes = [config.first_chunk] + [config.chunk] * len(tokens)
    for size in sizes:
        if pos >= len(tokens):
            break
        piece = tokens[pos : pos + size]
        final = pos + size >= len(tokens)
        start = time.perf_counter()
        pcm = stream.push(piece)
        if final:
            pcm = np.concatenate([pcm, stream.finalize()])
        elapsed = time.perf_counter() - start
        pos += len(piece)
        rows.append({"tokens_so_far": pos, "chunk_tokens": len(piece), "estimator_frames": stream.estimator_frames[-1],
                     "seconds": elapsed, "audio_seconds": len(pcm) / backend.spec.sample_rate})
    return rows


def reference_style(backend: Token2WavBackend, tokens: np.ndarray, chunk: int = 24) -> list[dict]:
    """The reference worker's schedule: whole history as the flow prompt, one chunk of new tokens at a time."""
    spec = backend.spec
    embedding = np.zeros(spec.spk_dim, np.float32)
    rng = np.random.default_rng(0)
    phase = np.zeros(spec.n_sines, np.float32)
    mel_so_far = np.zeros((spec.mel_bins, 0), np.float32)
    rows, prev = [], 0
    for end in range(chunk, len(tokens) + chunk, chunk):
        end = min(end, len(tokens))
        start = time.perf_counter()
        mu, spks = backend.encode(tokens[:end], embedding)
        n_prompt = mel_so_far.shape[1]
        cond = np.zeros_like(mu)
        cond[:, :n_prompt] = mel_so_far
        noise = rng.standard_normal(mu.shape).astype(np.float32)
        mel = solve_flow(backend.estimate, mu, spks, cond, noise, n_steps=spec.n_timesteps,
                         cfg_rate=spec.cfg_rate, scheduler=spec.t_scheduler)[:, n_prompt:]
        mel_so_far = np.concatenate([mel_so_far, mel], axis=1)
        wav, _ = backend.vocode(mel, phase, np.zeros((spec.n_sines, mel.shape[1] * spec.hop), np.float32))
        elapsed = time.perf_counter() - start
        rows.append({"tokens_so_far": end, "chunk_tokens": end - prev, "estimator_frames": mu.shape[1],
                     "seconds": elapsed, "audio_seconds": len(wav) / spec.sample_rate})
        prev = end
        if end == len(tokens):
            break
    return rows


def _best(runs: list[list[dict]]) -> list[dict]:
    """Row-wise minimum time over repeats (the least disturbed measurement)."""
    best = [dict(r) for r in runs[0]]
    for run in runs[1:]:
        for b, r in zip(best, run, strict=True):
            b["seconds"] = min(b["seconds"], r["seconds"])
    return best


def _table(name: str, rows: list[dict], token_rate: float) -> str:
    lines = [f"{name}", f"{'ends at (s)':>11} {'tokens':>6} {'est. frames':>11} {'chunk ms':>9} {'ms per s audio':>14}"]
    for r in rows:
        per_audio = 1000 * r["seconds"] / r["audio_seconds"] if r["audio_seconds"] else float("nan")
        lines.append(f"{r['tokens_so_far'] / token_rate:11.2f} {r['chunk_tokens']:6d} {r['estimator_frames']:11d} "
                     f"{1000 * r['seconds']:9.1f} {per_audio:14.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", type=Path, help="decoder folder (default: a random one of --preset)")
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "full"))
    parser.add_argument("--tokens", type=int, default=360, help="response length in speech tokens (360 = 28.8 s)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side; the fastest time per chunk is kept")
    parser.add_argument("--json", type=Path, default=Path("token2wav_chunk_cost.json"), help="where to write rows")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        decoder_dir = args.decoder
        if decoder_dir is None:
            decoder_dir = Path(tmp) / args.preset
            write_random_decoder(decoder_dir, args.preset, seed=0)
        decoder = load_decoder(decoder_dir)
    spec = decoder.spec
    tokens = np.random.default_rng(0).integers(0, spec.vocab_size, args.tokens)
    config = StreamConfig(first_chunk=spec.block_size)
    decoder.tokens_to_wav(tokens[:12], random_source=False)  # warm-up: allocator, kernels
    ours_rows = _best([ours(decoder.backend, tokens, config) for _ in range(args.repeats)])
    ref_rows = _best([reference_style(decoder.backend, tokens) for _ in range(args.repeats)])

    print(_table(f"ours: bounded window ({config.window} tokens), chunks {config.first_chunk}/{config.chunk}",
                 ours_rows, spec.token_rate))
    print()
    print(_table("reference-style: full history re-encoded, 24-token chunks", ref_rows, spec.token_rate))
    steady = float(np.median([r["seconds"] for r in ours_rows[1:]]))
    widest = max(r["estimator_frames"] for r in ours_rows)
    print(f"\nours: median {1000 * steady:.0f} ms per chunk at any length (max {widest}"
          f" estimator frames); reference-style: {1000 * ref_rows[-1]['seconds']:.0f} ms for its last chunk "
          f"({ref_rows[-1]['estimator_frames']} frames) at {args.tokens / spec.token_rate:.1f} s")
    result = {
        "decoder": str(args.decoder) if args.decoder else f"random {args.preset} preset",
        "tokens": args.tokens,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "stream_config": config.__dict__,
        "ours": ours_rows,
        "reference_style": ref_rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
