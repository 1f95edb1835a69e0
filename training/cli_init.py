"""`opens2s-edge init`: the embedded default, a deterministic random-init OpenS2S checkpoint and
GLM-4-Voice decoder, written without any download."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help="writes OUT_DIR/checkpoint (OpenS2S) and OUT_DIR/decoder (GLM-4-Voice)")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace existing folders")


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError

    from .presets import write_preset
    from .token2wav.init import write_random_decoder

    checkpoint, decoder = args.out_dir / "checkpoint", args.out_dir / "decoder"
    for path in (checkpoint, decoder):
        if path.exists() and not args.force:
            raise UserError(f"{path} already exists; pass --force to replace it")
    print(f"[init] writing {args.preset} OpenS2S checkpoint to {checkpoint}", flush=True)
    write_preset(args.preset, checkpoint, seed=args.seed, overwrite=args.force)
    print(f"[init] writing {args.preset} GLM-4-Voice decoder to {decoder}", flush=True)
    write_random_decoder(decoder, args.preset, seed=args.seed)
    print(f"[init] done: --checkpoint {checkpoint} --decoder {decoder}")
    return 0
