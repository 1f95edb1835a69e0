"""`opens2s-edge train --stage 1|2a|2b|3 --config FILE`: one training stage from a YAML or JSON config.

Single process: `opens2s-edge train --stage 2a --config tts.yaml`
Multi-GPU:      `torchrun --nproc_per_node=8 -m opens2s_edge.cli train --stage 3 --config sft.yaml`

Config keys are TrainConfig's fields (training/trainer.py); `checkpoint`, `data` and `output_dir` are
required, and relative paths in them resolve against the config file's folder. Running again with the same
output_dir resumes from the last saved state.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = ("1", "2a", "2b", "3")
PATH_KEYS = ("checkpoint", "output_dir")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", required=True, choices=STAGES, help="1: adapter; 2a: TTS LM pretraining; "
                   "2b: interleaved TTS training; 3: empathetic instruction fine-tuning")
    p.add_argument("--config", required=True, type=Path, help="YAML or JSON file with TrainConfig keys")
    p.add_argument("--output-dir", type=Path, default=None, help="override output_dir")
    p.add_argument("--max-steps", type=int, default=None, help="override max_steps")
    p.add_argument("--no-resume", action="store_true", help="start from step 0 even if a saved state exists")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key; VALUE is parsed as YAML (repeatable)")


def read_config(path: Path) -> dict:
    """The config file as a dict, with relative paths made absolute against its folder."""
    import yaml

    from opens2s_edge.cli import UserError

    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    if not isinstance(d, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    base = path.resolve().parent
    for key in PATH_KEYS:
        if isinstance(d.get(key), str):
            d[key] = str(base / d[key])
    if isinstance(d.get("data"), str):
        d["data"] = [d["data"]]
    if isinstance(d.get("data"), list):
        d["data"] = [str(base / p) for p in d["data"]]
    return d


def main(args: argparse.Namespace) -> int:
    import yaml

    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime.prompt import TokenizerError

    from .checkpoint import CheckpointError
    from .data import DataError
    from .stages import StageError
    from .trainer import ConfigError, TrainConfig, Trainer, cleanup_distributed

    d = read_config(args.config)
    if "stage" in d and str(d["stage"]) != args.stage:
        raise UserError(f"--stage {args.stage} but {args.config} says stage {d['stage']}")
    d["stage"] = args.stage
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        d[key.strip()] = yaml.safe_load(value)
    if args.output_dir is not None:
        d["output_dir"] = str(args.output_dir)
    if args.max_steps is not None:
        d["max_steps"] = args.max_steps
    if args.no_resume:
        d["resume"] = False
    try:
        cfg = TrainConfig.from_dict(d)
        trainer = Trainer(cfg)
        trainer.train()
    except (ConfigError, DataError, CheckpointError, StageError, TokenizerError) as exc:
        raise UserError(str(exc)) from exc
    finally:
        cleanup_distributed()
    return 0
