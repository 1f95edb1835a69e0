"""The Triton decode-step kernels (kernels/) against PyTorch eager and torch.compile at the real decoders' shapes,
as achieved bandwidth against the GPU's own copy bandwidth (a decode step is memory-bound: the floor is the bytes it
must read divided by what the device streams).

    python -m opens2s_edge.benchmarks.kernels [--out kernels.json] [--reps 50] [--no-compile] [--quick]

Per kernel and shape, each implementation is timed as a captured CUDA graph of `--reps` calls, replayed (device
time per call, without Python's launch overhead: what the CUDA-graph decode step pays), and as a plain eager loop
(host time per call, launches included). GB/s counts the bytes the step needs (inputs and outputs once; for attention
only the filled cache rows; for a weight-only matvec the quantized weight and its scales), so an implementation that
reads more (the PyTorch attention reads its whole window) shows as a lower figure. GPU only: elsewhere it says so and
exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

LLM = {"name": "llm (Qwen3-8B)", "hidden": 4096, "intermediate": 12288, "heads": 32, "kv": 8, "head_dim": 128}
TTS = {"name": "tts (1.7B)", "hidden": 2048, "intermediate": 6144, "heads": 16, "kv": 8, "head_dim": 128}
CACHE = 4096  # the CUDA backend's default --max-context
POSITIONS = (255, 1023, 4095)


def _time(fn: Callable[[], object], reps: int) -> dict[str, float]:
    """Per-call microseconds: replayed CUDA graph of `reps` calls (device time), and an eager loop (host time)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out: dict[str, float] = {}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    out["eager_us"] = (time.perf_counter() - t0) / reps * 1e6
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) * 1e3 / reps)
        out["graph_us"] = best
    except RuntimeError as exc:  # an implementation that cannot be captured is reported as such
        out["graph_error"] = str(exc).splitlines()[0][:200]
    return out


def _cases(quick: bool, device: str = "cuda"):
    """(kernel, shape label, bytes the step needs, {impl: callable}, reference function, its arguments) at the real
    shapes, each built on the device when its turn comes."""
    import torch

    from opens2s_edge.kernels import reference
    from opens2s_edge.kernels.ops import triton_kernels
    from opens2s_edge.training.cuda_backend import attention_windows
    from opens2s_edge.training.qwen3 import gqa_attention, rope_tables

    k = triton_kernels()
    dev, bf16 = torch.device(device), torch.bfloat16
    models = (LLM,) if quick else (LLM, TTS)
    for m in models:
        h, kv, d, hidden, inter = m["heads"], m["kv"], m["head_dim"], m["hidden"], m["intermediate"]
        x = torch.randn(1, 1, hidden, device=dev, dtype=bf16)
        w = torch.randn(hidden, device=dev, dtype=bf16)
        yield ("rms_norm", f"{m['name']} hidden {hidden}", 2 * x.nbytes + w.nbytes,
               {"triton": lambda x=x, w=w: k.rms_norm(x, w, 1e-6), "torch": lambda x=x, w=w: reference.rms_norm(
                   x, w, 1e-6)}, reference.rms_norm, (x, w, 1e-6))
        qn = torch.randn(1, 1, h, d, device=dev, dtype=bf16)
        wn = torch.randn(d, device=dev, dtype=bf16)
        yield ("rms_norm", f"{m['name']} q-norm {h}x{d}", 2 * qn.nbytes + wn.nbytes,
               {"triton": lambda x=qn, w=wn: k.rms_norm(x, w, 1e-6),
                "torch": lambda x=qn, w=wn: reference.rms_norm(x, w, 1e-6)}, reference.rms_norm, (qn, wn, 1e-6))
        cos, sin = (t[1000:1001].to(dev, bf16) for t in rope_tables(d, 1001, 1e6))
        q = torch.randn(1, 1, h, d, device=dev, dtype=bf16).transpose(1, 2)
        yield ("rope", f"{m['name']} q {h}x{d}", 2 * q.numel() * 2 + 2 * cos.nbytes,
               {"triton": lambda q=q, c=cos, s=sin: k.rope(q, c, s),
                "torch": lambda q=q, c=cos, s=sin: reference.rope(q, c, s)}, reference.rope, (q, cos, sin))
        gate = torch.randn(1, 1, inter, device=dev, dtype=bf16)
        up = torch.randn(1, 1, inter, device=dev, dtype=bf16)
        yield ("swiglu", f"{m['name']} {inter}", 3 * gate.nbytes,
               {"triton": lambda g=gate, u=up: k.swiglu(g, u), "torch": lambda g=gate, u=up: reference.swiglu(g, u)},
               reference.swiglu, (gate, up))
        kc = torch.randn(1, kv, CACHE, d, device=dev, dtype=bf16)
        vc = torch.randn(1, kv, CACHE, d, device=dev, dtype=bf16)
        qa = torch.randn(1, h, 1, d, device=dev, dtype=bf16)
        for p in POSITIONS[:1] if quick else POSITIONS:
            pos = torch.tensor([p], device=dev)
            window = next(n for n in attention_windows(CACHE) if n > p)  # what the torch backend's graph reads
            mask = pos[:, None] >= torch.arange(window, device=dev)[None, :]
            kw, vw = kc[:, :, :window], vc[:, :, :window]
            useful = 2 * kv * (p + 1) * d * 2 + 2 * qa.nbytes
            yield ("decode_attention", f"{m['name']} {h}/{kv} heads, position {p} (cache {CACHE})", useful,
                   {"triton": lambda q=qa, kc=kc, vc=vc, pos=pos: k.decode_attention(q, kc, vc, pos),
                    f"torch (window {window})": lambda q=qa, kw=kw, vw=vw, mask=mask, pos=pos: gqa_attention(
                        q, kw, vw, mask, pos)}, gqa_attention, (qa, kw, vw, mask, pos))
        for label, n_out, n_in in (("q_proj", h * d, hidden), ("gate_proj", inter, hidden), ("down_proj", hidden,
                                                                                             inter)):
            if quick and label != "gate_proj":
                continue
            weight = torch.randn(n_out, n_in, device=dev, dtype=bf16) * 0.02
            xin = torch.randn(1, n_in, device=dev, dtype=bf16)
            yield ("linear bf16", f"{m['name']} {label} {n_in}->{n_out}", weight.nbytes + xin.nbytes + 2 * n_out,
                   {"torch (cuBLAS)": lambda x=xin, w=weight: torch.nn.functional.linear(x, w)}, None, None)
            for bits in (8, 4):
                qw, sc = reference.quantize_weight(weight, bits)
                need = qw.nbytes + sc.nbytes + xin.nbytes + 2 * n_out
                yield (f"int{bits} weight-only", f"{m['name']} {label} {n_in}->{n_out}", need,
                       {"triton": lambda x=xin, qw=qw, sc=sc, b=bits, n=n_in: k.wo_linear(x, qw, sc, b, 128, n),
                        "torch (dequantize + cuBLAS)": lambda x=xin, qw=qw, sc=sc, b=bits, n=n_in: reference.wo_linear(
                            x, qw, sc, b, 128, n)},
                       reference.wo_linear, (xin, qw, sc, bits, 128, n_in))


def run(reps: int = 50, compile_refs: bool = True, quick: bool = False) -> dict:
    import torch

    from opens2s_edge.benchmarks.roofline import device_bandwidth

    torch.backends.cuda.matmul.allow_tf32 = False
    copy = device_bandwidth({"megabytes": 1024, "repeats": 10})
    rows = []
    for kernel, shape, need, impls, reference_fn, args in _cases(quick):
        if compile_refs and reference_fn is not None:
            compiled = torch.compile(reference_fn, dynamic=False)
            impls = {**impls, "torch.compile": lambda f=compiled, a=args: f(*a)}
        for impl, fn in impls.items():
            t0 = time.perf_counter()
            try:
                timing = _time(fn, reps)
            except Exception as exc:  # one failing implementation is reported, the others still run
                timing = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            us = timing.get("graph_us", timing.get("eager_us"))
            row = {"kernel": kernel, "shape": shape, "impl": impl, "bytes": need, **timing,
                   "setup_s": time.perf_counter() - t0}
            if us:
                row["gb_per_s"] = need / (us * 1e-6) / 1e9
                row["of_copy_bandwidth"] = row["gb_per_s"] * 1e9 / copy["bytes_per_s"]
            rows.append(row)
            print(_line(row), flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth": copy,
            "reps": reps, "rows": rows}


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['kernel']:<20} {row['shape']:<52} {row['impl']:<28} error: {row['error']}"
    graph = f"{row['graph_us']:8.1f} us" if "graph_us" in row else "   (no graph)"
    return (f"{row['kernel']:<20} {row['shape']:<52} {row['impl']:<28} {graph}  eager {row['eager_us']:8.1f} us  "
            f"{row.get('gb_per_s', 0):7.1f} GB/s  {100 * row.get('of_copy_bandwidth', 0):5.1f}% of copy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    parser.add_argument("--reps", type=int, default=50, help="calls per timed CUDA graph (default 50)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (compiles take time)")
    parser.add_argument("--quick", action="store_true", help="the LLM's shapes only, one position, one projection")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("benchmarks/kernels.py needs PyTorch with a CUDA GPU; torch is not installed here: nothing measured")
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (the kernels are timed on the device against its copy "
              f"bandwidth); torch {torch.__version__} sees none here: nothing measured")
        return 0
    from opens2s_edge.kernels.ops import TRITON_INSTALLED

    if not TRITON_INSTALLED:
        print("benchmarks/kernels.py needs Triton (`pip install triton`; CUDA builds of torch ship it): nothing "
              "measured")
        return 0
    result = run(args.reps, not args.no_compile, args.quick)
    copy = result["copy_bandwidth"]["bytes_per_s"] / 1e9
    print(f"device {result['device']}: copy bandwidth {copy:.0f} GB/s (read + write, best of 10 copies of 1 GiB)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
