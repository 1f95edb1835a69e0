"""`opens2s-edge bench`: latency of a bundle, side by side with its peers, against the memory-bandwidth floor.

Writes OUT/bench.json (every figure + the machine description), OUT/bench.png and prints the table. If BUNDLE
does not exist, the preset's checkpoint and decoder are written next to it (BUNDLE.source/) and exported into it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import opens2s_edge

DEFAULT_AUDIO = Path(opens2s_edge.__file__).parent / "assets" / "hello.wav"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle folder (written from --preset when it does not exist)")
    p.add_argument("--preset", choices=["tiny", "small", "full"], default="small",
                   help="model to build when BUNDLE is absent, and the workload size: tiny (seconds), small "
                        "(the CPU default), full (released sizes; GPU machines only)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per peer (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs per peer (default: the preset's)")
    p.add_argument("--peers", default="reference,torch,ort,trt,genai,optimum",
                   help="comma-separated: reference, torch, ort, ort-int4, ort-int8 (the bundle quantized), trt "
                        "(TensorRT engines; skipped without them), genai, optimum")
    p.add_argument("--out", type=Path, required=True, help="folder for bench.json and bench.png")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="OpenS2S checkpoint the bundle came from (default: the manifest's source)")
    p.add_argument("--decoder", type=Path, default=None,
                   help="GLM-4-Voice decoder the bundle came from (default: the manifest's source)")
    p.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help="16 kHz utterance (default: packaged sample)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every peer (default: the cores this process may use)")
    p.add_argument("--providers", default="cpu", help="onnxruntime providers for the ort peer: cpu, cuda, tensorrt")
    p.add_argument("--cache", type=Path, default=None,
                   help="where peer builds and side environments are kept (default ~/.cache/opens2s-edge)")


def _has_gpu(providers: list[str]) -> bool:
    import onnxruntime as ort

    from .harness import machine_description

    gpu_providers = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers())
    wanted = {"cuda", "tensorrt"} & set(providers)
    return bool(machine_description()["gpu"]) and bool(gpu_providers) and bool(wanted)


def _prepare_bundle(args: argparse.Namespace, progress) -> tuple[Path | None, Path | None]:  # noqa: ANN001
    """Make sure BUNDLE exists; return the checkpoint and decoder folders to use for the PyTorch peers."""
    from opens2s_edge.cli import UserError

    if (args.bundle / "manifest.json").is_file():
        return args.checkpoint, args.decoder
    if args.bundle.exists():
        raise UserError(f"{args.bundle} exists but is not a bundle (no manifest.json)")
    if args.preset == "full":
        raise UserError(f"bundle {args.bundle} does not exist; for the full preset export your checkpoint first: "
                        "opens2s-edge export --checkpoint CKPT --decoder DEC --out BUNDLE")
    from opens2s_edge.export.pipeline import export_bundle
    from opens2s_edge.training.presets import write_preset
    from opens2s_edge.training.token2wav.init import write_random_decoder

    checkpoint, decoder = args.checkpoint, args.decoder
    source = args.bundle.with_name(args.bundle.name + ".source")
    if checkpoint is None:
        checkpoint = source / "checkpoint"
        if not checkpoint.is_dir():
            progress(f"[bench] writing the {args.preset} preset checkpoint to {checkpoint}")
            write_preset(args.preset, checkpoint)
    if decoder is None:
        decoder = source / "decoder"
        if not (decoder / "config.yaml").is_file():
            progress(f"[bench] writing the {args.preset} preset decoder to {decoder}")
            write_random_decoder(decoder, args.preset)
    export_bundle(checkpoint, decoder, args.bundle, progress=progress)
    return checkpoint, decoder


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime.bundle import BundleError, load_bundle
    from opens2s_edge.runtime.files import atomic_file, write_text_atomic

    from .bench import ALL_PEERS, BenchConfig, run_bench
    from .llm_peers import default_cache
    from .report import format_report, plot

    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown or not peers:
        raise UserError(f"--peers: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL_PEERS)}")
    for name in ("runs", "warmup", "threads"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "runs" else 0):
            raise UserError(f"--{name} must be at least {1 if name == 'runs' else 0}, got {value}")
    providers = [p.strip().lower() for p in args.providers.split(",") if p.strip()]
    if args.preset == "full" and not _has_gpu(providers):
        raise UserError("the full preset (Qwen3-8B LLM + 1.7B TTS LM at the released sizes) is for GPU machines: "
                        "no NVIDIA GPU with an onnxruntime CUDA/TensorRT provider is available here (or --providers "
                        "does not ask for one). Use --preset small on a CPU.")
    if not args.audio.is_file():
        raise UserError(f"--audio {args.audio} does not exist")
    for name in ("checkpoint", "decoder"):
        path = getattr(args, name)
        if path is not None and not path.is_dir():
            raise UserError(f"--{name} {path} is not a folder")

    def progress(line: str) -> None:
        print(line, flush=True)

    checkpoint, decoder = _prepare_bundle(args, progress)
    try:
        manifest = load_bundle(args.bundle, verify=False).manifest
    except BundleError as exc:
        raise UserError(str(exc)) from exc
    # The PyTorch peers need the weights the bundle was exported from: the manifest says where they were.
    source = manifest.get("source", {})
    if checkpoint is None and source.get("checkpoint") and Path(source["checkpoint"]).is_dir():
        checkpoint = Path(source["checkpoint"])
    if decoder is None and source.get("decoder") and Path(source["decoder"]).is_dir():
        decoder = Path(source["decoder"])
    threads = args.threads if args.threads is not None else len(os.sched_getaffinity(0))
    config = BenchConfig(bundle=args.bundle, checkpoint=checkpoint, decoder=decoder, audio=args.audio, out=args.out,
                         preset=args.preset, peers=peers, runs=args.runs, warmup=args.warmup, threads=threads,
                         providers=tuple(providers), cache_root=args.cache or default_cache())
    try:
        result = run_bench(config, progress)
    except BundleError as exc:
        raise UserError(str(exc)) from exc
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "bench.json", json.dumps(result, indent=1) + "\n")
    with atomic_file(args.out / "bench.png") as tmp:
        plot(result, tmp)
    print()
    print(format_report(result))
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0
