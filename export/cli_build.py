"""`opens2s-edge build`: a bundle's ONNX graphs -> TensorRT engines for this GPU, recorded in the bundle.

The bundle is checked, the profiles derived and the TensorRT readiness of every graph reported before TensorRT is
imported, so `--dry-run` works on any machine and a machine without TensorRT learns what is wrong with the bundle
before it learns how to install TensorRT.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .trt_build import PRECISIONS, TARGETS

    p.add_argument("bundle", type=Path, help="bundle folder written by `opens2s-edge export`")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32/fp16/bf16: the bundle's own dtype (export it with that --dtype); fp8/int8/int4-weight: "
                        "the LLM, TTS LM (and audio encoder for fp8/int8) quantized with NVIDIA ModelOpt, the rest "
                        "at the bundle's dtype (default: the bundle's dtype)")
    p.add_argument("--target", choices=TARGETS, default="auto",
                   help="orin (Jetson; JetPack 6.2's TensorRT 10.3 needs the classic form), rtx (desktop), or auto "
                        "(read the GPU and TensorRT version); default auto")
    p.add_argument("--workspace", type=float, metavar="GB", default=None,
                   help="TensorRT builder workspace limit in GB (default: TensorRT's, the GPU's memory)")
    p.add_argument("--timing-cache", type=Path, metavar="FILE", default=None,
                   help="persistent TensorRT timing cache (loaded if present, saved after each engine); default "
                        "~/.cache/opens2s-edge/tensorrt/<gpu>-trt<version>.timing-cache")
    p.add_argument("--graphs", default=None, metavar="A,B",
                   help="build only these graphs (comma-separated); the set's other engines are kept")
    p.add_argument("--calibration-audio", type=Path, action="append", default=None, metavar="WAV",
                   help="fp8/int8/int4-weight: an utterance to calibrate on (repeatable; default the bundled "
                        "hello.wav). Real speech like the deployment's gives better scales")
    p.add_argument("--weakly-typed", action="store_true",
                   help="int8/fp8 on TensorRT 10 only: build the Q/DQ graph weakly typed with INT8/FP8 + FP16 flags "
                        "instead of strongly typed (for a 10.x release that refuses the strongly typed build); "
                        "TensorRT 11 removed weak typing and refuses it")
    p.add_argument("--tensorrt-version", metavar="X.Y", default=None,
                   help="check against this TensorRT's ONNX support list instead of the installed one (10.3 for "
                        "JetPack 6, 10.15/10.16, 11.x): for a --dry-run on a machine without that TensorRT")
    p.add_argument("--dry-run", action="store_true",
                   help="check the bundle, print the profiles and the TensorRT readiness, build nothing "
                        "(needs no TensorRT and no GPU)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 pass over the bundle's files")
    p.add_argument("--force", action="store_true", help="rebuild engines the set already has")


def _local_tensorrt() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime.bundle import BundleError
    from opens2s_edge.runtime.engines import detect_gpu

    from .checks import UnsupportedTensorRT, parse_version
    from .quantize import QuantizeError
    from .trt_build import (
        BuildError,
        build_engines,
        gpu_or_error,
        import_tensorrt,
        network_typing,
        plan_build,
        require_ready,
    )
    from .trt_profiles import ProfileError

    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    if args.workspace is not None and args.workspace <= 0:
        raise UserError(f"--workspace must be positive, got {args.workspace}")
    try:
        # What this machine has is used for the checks when present; its absence only matters for a real build.
        trt_version = _local_tensorrt()
        found = (f"TensorRT {trt_version}" if trt_version else "no TensorRT")
        if args.tensorrt_version is not None:
            asked = parse_version(args.tensorrt_version)[:2]
            if trt_version is not None and parse_version(trt_version)[:2] != asked:
                raise BuildError(f"--tensorrt-version {args.tensorrt_version}, but TensorRT {trt_version} is "
                                 "installed: engines are built with the installed TensorRT (drop --tensorrt-version, "
                                 "or check with --dry-run on a machine without TensorRT)")
            if trt_version is None and not args.dry_run:
                raise BuildError(f"--tensorrt-version {args.tensorrt_version} only checks (--dry-run): building "
                                 "needs that TensorRT installed")
            trt_version = args.tensorrt_version
        gpu = detect_gpu()
        plan = plan_build(args.bundle, args.precision, args.target, graphs, gpu=gpu, trt_version=trt_version,
                          verify=not args.no_verify)
        # What TensorRT 11 removed is refused before anything is quantized or imported.
        network_typing(plan.precision, args.weakly_typed, plan.bundle.manifest.get("dtype", "fp16"), plan.tensorrt)
        found += f", {gpu.name} (compute capability {gpu.compute_capability})" if gpu else ""
        print(f"[build] {found}")
        for line in plan.lines():
            print(f"[build] {line}", flush=True)
        require_ready(plan)
        if args.dry_run:
            print("[build] dry run: nothing built")
            return 0
        trt = import_tensorrt()
        gpu = gpu or gpu_or_error()
        build_engines(plan, trt, gpu, workspace_gb=args.workspace, timing_cache=args.timing_cache, force=args.force,
                      weakly_typed=args.weakly_typed, calibration_wavs=args.calibration_audio,
                      progress=lambda line: print(line, flush=True))
    except (BuildError, BundleError, ProfileError, QuantizeError, UnsupportedTensorRT) as exc:
        raise UserError(str(exc)) from exc
    return 0
