"""Runs inside the Optimum virtual environment (see llm_peers.optimum_python): export the HF Qwen3 folder with
ORTModelForCausalLM once, then time T(1) and T(N) greedy generations on the fixed prompt.

Standalone on purpose: it imports neither opens2s_edge nor anything the project pins, only what the venv holds.
Input: one JSON argument. Output: one JSON line on stdout.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _peak_rss() -> int:
    """VmHWM: this process's own peak (ru_maxrss would include the launching process's peak, carried over exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    request = json.loads(sys.argv[1])
    import onnxruntime as ort
    import optimum
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    transformers.logging.set_verbosity_error()
    threads = request["threads"]
    if threads:
        torch.set_num_threads(threads)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    onnx_dir = Path(request["onnx_dir"])
    t0 = time.perf_counter()
    if not (onnx_dir / "config.json").is_file():
        model = ORTModelForCausalLM.from_pretrained(request["hf_dir"], export=True, use_cache=True)
        model.save_pretrained(onnx_dir)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(onnx_dir, use_cache=True, session_options=options,
                                                provider="CPUExecutionProvider")
    load_s = time.perf_counter() - t0
    ids = torch.tensor([request["prompt_ids"]])
    n_new = request["new_tokens"]

    def generate(n: int) -> int:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out.shape[1] - ids.shape[1]

    for _ in range(request["warmup"]):
        generate(1)
        generate(n_new)
    one, full, produced = [], [], []
    for _ in range(request["runs"]):
        t0 = time.perf_counter()
        generate(1)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        produced.append(generate(n_new))
        full.append(time.perf_counter() - t0)
    peak = _peak_rss()
    print(json.dumps({"export_s": export_s, "load_s": load_s, "precision": "fp32", "one": one, "full": full,
                      "tokens_produced": produced, "peak_rss_bytes": peak,
                      "optimum": getattr(optimum, "__version__", None), "transformers": transformers.__version__,
                      "onnxruntime": ort.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
