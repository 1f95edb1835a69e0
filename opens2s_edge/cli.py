"""The `opens2s-edge` command: one subcommand per job, each owned by the folder that does the work.

Every command module exposes `add_arguments(parser)` and `main(args) -> int` and keeps heavy imports
(torch, onnx) inside `main`, so that `opens2s-edge --help` and the torch-free `run` stay light.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("opens2s_edge.training.cli_init", "write a deterministic random-init checkpoint + decoder"),
    "generate": ("opens2s_edge.training.cli_generate", "PyTorch speech-to-text+speech-units generation"),
    "token2wav": ("opens2s_edge.training.token2wav.cli", "speech tokens -> waveform (GLM-4-Voice decoder)"),
    "train": ("opens2s_edge.training.cli_train", "train stage 1, 2a, 2b or 3"),
    "tokenize": ("opens2s_edge.training.cli_tokenize", "speech -> GLM-4-Voice 12.5 Hz units (speech tokenizer)"),
    "export": ("opens2s_edge.export.cli_export", "checkpoint + decoder -> verified ONNX bundle"),
    "export-tokenizer": ("opens2s_edge.export.cli_export_tokenizer",
                         "GLM-4-Voice speech tokenizer -> verified ONNX tokenizer bundle"),
    "inspect": ("opens2s_edge.export.cli_inspect", "print a bundle's manifest"),
    "build": ("opens2s_edge.export.cli_build", "bundle ONNX graphs -> TensorRT engines"),
    "run": ("opens2s_edge.runtime.cli_run", "run one voice turn on a bundle (torch-free)"),
    "chat": ("opens2s_edge.runtime.cli_chat", "a spoken conversation on a bundle (torch-free)"),
    "serve": ("opens2s_edge.runtime.cli_serve", "OpenAI Realtime WebSocket server + browser page on a bundle"),
    "bench": ("opens2s_edge.benchmarks.cli_bench", "latency benchmark with peers and the roofline"),
}


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def _available() -> dict[str, object]:
    modules = {}
    for name, (module_name, _) in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opens2s-edge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _available().items():
        p = sub.add_parser(name, help=COMMANDS[name][1], description=COMMANDS[name][1])
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        # Ctrl-C while the subcommands' modules import is still an interrupt, not an ImportError traceback.
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    try:
        return int(args._module.main(args) or 0)
    except UserError as exc:
        print(f"opens2s-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
