"""`opens2s-edge init`: the embedded default, a deterministic random-init OpenS2S checkpoint and
GLM-4-Voice decoder, written without any download."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help="writes OUT_DIR/checkpoint (OpenS2S) and OUT_DIR/decoder (GLM-4-Voice)")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace OUT_DIR/checkpoint and OUT_DIR/decoder when they are "
                   "empty or written by init (anything else is refused)")


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime.files import atomic_dir

    from .checkpoint import CheckpointError
    from .presets import INIT_MARKER, check_replaceable, init_marker, write_preset
    from .token2wav.init import write_random_decoder

    checkpoint, decoder = args.out_dir / "checkpoint", args.out_dir / "decoder"
    # Both folders checked before either is written: --force replaces only an empty folder or one init wrote.
    for path, kind in ((checkpoint, "checkpoint"), (decoder, "decoder")):
        try:
            check_replaceable(path, kind)
        except CheckpointError as exc:
            raise UserError(str(exc)) from None
        if (path.exists() or path.is_symlink()) and not args.force:
            raise UserError(f"{path} already exists; pass --force to replace it")
    print(f"[init] writing {args.preset} OpenS2S checkpoint to {checkpoint}", flush=True)
    try:
        write_preset(args.preset, checkpoint, seed=args.seed, overwrite=args.force)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    print(f"[init] writing {args.preset} GLM-4-Voice decoder to {decoder}", flush=True)
    with atomic_dir(decoder) as tmp:  # written beside, then renamed over what was there
        write_random_decoder(tmp, args.preset, seed=args.seed)
        (tmp / INIT_MARKER).write_bytes(init_marker("decoder", args.preset, args.seed,
                                                    [p.name for p in tmp.iterdir()]))
    print(f"[init] done: --checkpoint {checkpoint} --decoder {decoder}")
    return 0
