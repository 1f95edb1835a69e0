"""Decode-step cost against the filled length of the cache, per bundle: the fixed-shape forms read all max_context rows
whatever the position; the gqa form's GroupQueryAttention reads the filled ones only.

```
python -m opens2s_edge.benchmarks.context_cost BUNDLE [BUNDLE ...] [--graph llm] [--positions 64,512,1024,2000]
       [--steps 32] [--threads 1] [--out context_cost.json]
```
For each position p the decoder is put at p (the cache rows below p hold whatever the buffer holds: the cost of a step
does not depend on their values) and `steps` single-token steps are timed; the median step is reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def measure(bundle: Path, graph: str, positions: list[int], steps: int, threads: int) -> dict[str, Any]:
    from opens2s_edge.runtime.bundle import load_bundle
    from opens2s_edge.runtime.onnx_backend import OnnxRuntimeBackend

    b = load_bundle(bundle, verify=False)
    backend = OnnxRuntimeBackend(b, ("cpu",), threads)
    decoder = backend.decoder(graph, b.array("llm_embed" if graph == "llm" else "tts_embed"))
    row = decoder.embed([1])
    rows = []
    for pos in positions:
        if pos + steps + 2 > decoder.max_len:
            raise ValueError(f"position {pos} + {steps} + 2 steps pass the cache of {decoder.max_len}")
        times = []
        for i in range(steps + 2):  # two untimed steps first
            decoder.pos = pos + i  # the step at this position; the rows below hold whatever they hold
            t0 = time.perf_counter()
            decoder.run(row)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        rows.append({"position": pos, "step_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(min(times))})
    entry = b.graph(graph)
    weights = entry.get("weights", {}).get("weights", "float")
    return {"bundle": str(bundle), "form": entry.get("form"), "weights": weights,
            "max_context": decoder.max_len, "graph": graph, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m opens2s_edge.benchmarks.context_cost",
                                description=__doc__.split("\n")[0])
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--graph", choices=["llm", "tts_lm"], default="llm")
    p.add_argument("--positions", default="64,512,1024,2000")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        positions = [int(x) for x in args.positions.split(",") if x.strip()]
    except ValueError:
        p.error(f"--positions: expected comma-separated integers, got {args.positions!r}")
    if not positions or min(positions) < 0 or args.steps < 1:
        p.error("--positions must be >= 0 and --steps >= 1")
    results = [measure(b, args.graph, positions, args.steps, args.threads) for b in args.bundles]
    print("| bundle | form | weights | " + " | ".join(f"pos {x} ms" for x in positions) + " |")
    print("|---|---|---|" + "---|" * len(positions))
    for r in results:
        print(f"| {Path(r['bundle']).name} | {r['form']} | {r['weights']} | "
              + " | ".join(f"{row['step_ms']:.2f}" for row in r["rows"]) + " |")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
