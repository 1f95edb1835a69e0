#!/usr/bin/env bash
# One prepared GPU check: every GPU test (kernels, the PyTorch CUDA backend and its CUDA graphs, onnxruntime's CUDA
# EP where installed) and the GPU benchmarks (the kernels against PyTorch, and decode turns of the tiny and small
# presets on each kernel set), with every log and figure written into one folder.
#
#   benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR: default $OUT, else ./gpu-check-<date>
#
# Made for a bare GPU machine with a copy of the working tree: the repo's .venv if it works there, else $PYTHON, else
# python3; nothing is installed and nothing is downloaded. What is importable decides what runs: a step whose
# modules are missing is listed as SKIP with the reason. Without a CUDA GPU it says so and exits 0. Steps start only
# while the time budget lasts (GPU_CHECK_BUDGET_S, default 570 s, so the whole check fits 10 minutes); each is
# capped to what is left. OUT_DIR/summary.txt lists every step; the exit status is 1 when a step that ran failed.
# GPU_CHECK_ALLOW_CPU=1 runs the steps on a machine without a GPU (to check the script itself).
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-${OUT:-$REPO/gpu-check-$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-570}
START=$(date +%s)
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }

# -- python and the package ------------------------------------------------------------------------------------------
pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    # A copied venv from another machine may not run here: use it only if it imports torch.
    if [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c "import torch" >/dev/null 2>&1; then
        echo "$REPO/.venv/bin/python"; return
    fi
    command -v python3 || command -v python
}
PY=$(pick_python)
if [ -z "$PY" ]; then
    note "no python found: nothing to check"
    exit 0
fi

# The package maps its top-level folders to opens2s_edge.* (pyproject's package-dir). Without an install of this very
# tree, a folder of symlinks gives the same layout, first on PYTHONPATH.
where=$("$PY" -c "import os, opens2s_edge; print(os.path.realpath(opens2s_edge.__file__))" 2>/dev/null || true)
if [ "${where#"$REPO"/}" = "$where" ] || ! "$PY" -c "import opens2s_edge.training, opens2s_edge.kernels" 2>/dev/null
then
    SHIM=$(mktemp -d)
    mkdir -p "$SHIM/opens2s_edge"
    for f in "$REPO"/opens2s_edge/*; do ln -s "$f" "$SHIM/opens2s_edge/"; done
    for sub in training export runtime kernels benchmarks; do ln -s "$REPO/$sub" "$SHIM/opens2s_edge/$sub"; done
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    trap 'rm -rf "$SHIM"' EXIT
fi

# Golden data written by the reference: the golden-id tests need it; they skip (with the reason) without it.
for d in "${OPENS2S_GOLDEN:-}" "$REPO/../shared/golden" "$REPO/shared/golden"; do
    if [ -n "$d" ] && [ -d "$d/opens2s_tiny" ]; then export OPENS2S_GOLDEN=$(cd "$d" && pwd); break; fi
done

# -- what this machine has -------------------------------------------------------------------------------------------
"$PY" - "$OUT_DIR/environment.json" <<'EOF'
import importlib, json, platform, sys
env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(), "modules": {}}
for name in ("torch", "triton", "cupy", "numpy", "pytest", "onnx", "onnxscript", "onnxruntime", "tokenizers",
             "safetensors", "soundfile", "yaml", "jinja2", "transformers", "tensorrt", "matplotlib", "psutil"):
    try:
        module = importlib.import_module(name)
        env["modules"][name] = str(getattr(module, "__version__", "present"))
    except Exception as exc:  # missing, or broken on this machine: either way not usable
        env["modules"][name] = None
        env.setdefault("import_errors", {})[name] = f"{type(exc).__name__}: {exc}"[:300]
try:
    import torch
    env["cuda"] = bool(torch.cuda.is_available())
    env["torch_cuda"] = torch.version.cuda
    if env["cuda"]:
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                      "count": torch.cuda.device_count()}
except Exception as exc:
    env["cuda"] = False
    env["torch_error"] = str(exc)[:300]
try:
    import onnxruntime
    env["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception:
    env["onnxruntime_providers"] = []
json.dump(env, open(sys.argv[1], "w"), indent=1)
EOF
env_has() {  # env_has MODULE...: all importable
    "$PY" - "$OUT_DIR/environment.json" "$@" <<'EOF'
import json, sys
env = json.load(open(sys.argv[1]))
sys.exit(0 if all(env["modules"].get(m) for m in sys.argv[2:]) else 1)
EOF
}
missing() {  # the modules of the list that are not importable, comma-separated
    "$PY" - "$OUT_DIR/environment.json" "$@" <<'EOF'
import json, sys
env = json.load(open(sys.argv[1]))
print(", ".join(m for m in sys.argv[2:] if not env["modules"].get(m)))
EOF
}
json_get() {
    "$PY" -c "import json, sys; v = json.load(open(sys.argv[1])).get(sys.argv[2]); print('' if v is None else v)" \
        "$OUT_DIR/environment.json" "$1"
}

note "gpu_check: $PY (python $(json_get python)), results in $OUT_DIR"
if ! env_has torch; then
    note "torch is not importable with $PY: no GPU check possible (set PYTHON=/path/to/python with CUDA PyTorch)"
    exit 0
fi
if [ "$(json_get cuda)" != "True" ]; then
    if [ -z "${GPU_CHECK_ALLOW_CPU:-}" ]; then
        note "no CUDA GPU visible to torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null): nothing to check"
        exit 0
    fi
    # To check this script itself on a machine without a GPU: every step runs, their GPU cases skip.
    note "no CUDA GPU, GPU_CHECK_ALLOW_CPU set: running the steps anyway (their GPU cases skip)"
fi
note "GPU: $(json_get gpu)"
note "golden data: ${OPENS2S_GOLDEN:-absent (golden-id tests skip; the tiny-preset GPU tests still compare with the CPU)}"

# -- the steps -------------------------------------------------------------------------------------------------------
# step NAME LIMIT_S "REQUIRED MODULES" COMMAND...: runs COMMAND (in the repo) with its output in OUT_DIR/NAME.log,
# capped to LIMIT_S and to what is left of the budget.
step() {
    local name=$1 limit=$2 needs=$3
    shift 3
    local left=$(( BUDGET - $(elapsed) ))
    if [ "$left" -lt 30 ]; then note "SKIP $name: time budget of ${BUDGET} s spent"; return; fi
    if [ -n "$needs" ] && ! env_has $needs; then note "SKIP $name: not importable here: $(missing $needs)"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0 rc tail_line
    t0=$(date +%s)
    (cd "$REPO" && timeout --signal=INT --kill-after=15 "$limit" "$@") > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    tail_line=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT_DIR/$name.log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        note "PASS $name ($(( $(date +%s) - t0 )) s) ${tail_line}"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        note "FAIL $name: stopped after ${limit} s (time limit) ${tail_line}"; FAILED=1
    else
        note "FAIL $name (exit $rc, $(( $(date +%s) - t0 )) s) ${tail_line}: see $name.log"; FAILED=1
    fi
}
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)
TEST_NEEDS="pytest numpy soundfile tokenizers safetensors yaml jinja2"

step tests-kernels 240 "pytest numpy triton" \
    "${PYTEST[@]}" tests/test_kernels.py --junitxml="$OUT_DIR/tests-kernels.xml"
step tests-cuda-backend 300 "$TEST_NEEDS" \
    "${PYTEST[@]}" tests/test_cuda_backend.py --junitxml="$OUT_DIR/tests-cuda-backend.xml"
if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
        2>/dev/null; then
    step tests-onnxruntime-cuda-ep 180 "$TEST_NEEDS onnx onnxscript onnxruntime" \
        "${PYTEST[@]}" tests/test_trt_backend.py --junitxml="$OUT_DIR/tests-onnxruntime-cuda-ep.xml"
else
    note "SKIP tests-onnxruntime-cuda-ep: onnxruntime with the CUDAExecutionProvider (onnxruntime-gpu) is not installed"
fi

step bench-kernels 150 "triton" "$PY" -m opens2s_edge.benchmarks.kernels --out "$OUT_DIR/kernels.json"

# Decode turns on the GPU, each kernel set (bf16, CUDA graphs, graphs captured before timing): per-step medians and
# tokens/s, and whether the ids match the torch kernels' ids.
mkdir -p "$OUT_DIR/work"
DECODE_BENCH="$OUT_DIR/work/decode_bench.py"
cat > "$DECODE_BENCH" <<'EOF'
"""Decode turns of one preset on the GPU with each kernel set; written by benchmarks/gpu_check.sh."""
import gc, json, sys, time
from pathlib import Path
import torch
from opens2s_edge.runtime.audio import load_wav
from opens2s_edge.training.cuda_backend import use_kernels
from opens2s_edge.training.generate import GenerationOptions, Generator
from opens2s_edge.training.presets import write_preset
import opens2s_edge

preset, work, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
checkpoint = work / "checkpoint"
if not (checkpoint / "config.json").is_file():
    write_preset(preset, checkpoint)
budget = {"tiny": (16, 64), "small": (64, 256)}[preset]
options = GenerationOptions(greedy=True, max_text_tokens=budget[0], max_speech_tokens=budget[1])
wav = load_wav(Path(opens2s_edge.__file__).resolve().parent / "assets" / "hello.wav")
rows, reference_ids = [], None
for kernels, weights in (("torch", None), ("triton", None), ("triton", "int8"), ("triton", "int4")):
    gen = Generator(checkpoint, "bf16", 2048, device="cuda")
    if kernels != "torch" or weights:
        use_kernels(gen, kernels, weights)
    t0 = time.perf_counter()
    graphs = gen.warmup()
    capture_s = time.perf_counter() - t0
    gen(wav, options)  # untimed: the first turn's lazy initialisation
    turns = [gen(wav, options) for _ in range(3)]
    ids = turns[0].to_json()
    if reference_ids is None:
        reference_ids = ids
    summary = turns[-1].timing_summary()
    row = {"kernels": kernels, "weights": weights or "bf16", "graphs": graphs, "capture_s": capture_s,
           "total_s": [t.total_s for t in turns], "same_ids_as_torch": ids == reference_ids,
           "text_tokens": len(ids["text_ids"]), "speech_tokens": len(ids["speech_ids"]),
           **{k: summary[k] for k in ("llm_step", "tts_step", "llm_prefill") if k in summary},
           "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    rows.append(row)
    print(f"{preset:5s} kernels {kernels:6s} weights {row['weights']:4s}: "
          + "  ".join(f"{k} {summary[k]['median_ms']:.2f} ms ({summary[k].get('tokens_per_s', 0):.0f} tok/s)"
                      for k in ("llm_step", "tts_step") if k in summary)
          + f"  turn {min(row['total_s']):.2f} s  same ids as torch: {row['same_ids_as_torch']}", flush=True)
    del gen, turns
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
out.write_text(json.dumps({"preset": preset, "device": torch.cuda.get_device_name(), "rows": rows}, indent=1) + "\n")
EOF
for preset in tiny small; do
    step "bench-decode-$preset" 150 "triton $TEST_NEEDS" \
        "$PY" "$DECODE_BENCH" "$preset" "$OUT_DIR/work/$preset" "$OUT_DIR/decode-$preset.json"
done

# The whole-turn benchmark with its peers (torch on CUDA, our runtime on onnxruntime's CUDA EP): needs the export
# stack and onnxruntime-gpu.
if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
        2>/dev/null; then
    for preset in tiny small; do
        step "bench-$preset" 150 "onnx onnxscript onnxruntime matplotlib psutil $TEST_NEEDS" \
            "$PY" -m opens2s_edge bench "$OUT_DIR/work/bench-$preset" --preset "$preset" --providers cuda \
            --peers torch,ort --out "$OUT_DIR/bench-$preset"
    done
else
    note "SKIP bench-tiny, bench-small (opens2s-edge bench --providers cuda): onnxruntime-gpu is not installed"
fi

note "done in $(elapsed) s: $([ "$FAILED" -eq 0 ] && echo "nothing failed" || echo "FAILURES above")"
exit "$FAILED"
