"""Our runtime on weight-only quantized copies of the benchmarked bundle, and where a decode step's time goes.

- `derive_bundle`: the bench bundle with its LLM and TTS LM graphs quantized by onnxruntime's MatMulNBitsQuantizer
  (export/weight_quant.py, the code `export --weights` runs), everything else shared; cached per bundle and options.
  Same float weights, same form: the `ort-int4` / `ort-int8` peers differ from `ort` only in the weights' precision.
- `decode_profile`: onnxruntime's own per-op profile of decode steps of a bundle's decoder, driven by the runtime's
  decoder binding, with the step's wall time split three ways: kernels (the sum of the profile's node times),
  onnxruntime around them (its `model_run` minus the kernels), and our Python loop and binding (wall minus
  `model_run`): the "Python loop share per token".
- `genai_profile`: the same profile of onnxruntime-genai's own graph (its model.onnx run on a plain onnxruntime session
  with shared past/present buffers), so the two graphs' op mixes can be set side by side.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = {"ort-int4": "int4", "ort-int8": "int8"}


def _options(variant: str, config: dict) -> Any:
    from opens2s_edge.export.weight_quant import WeightOptions

    q = config.get("quantization", {})
    return WeightOptions(VARIANTS[variant], q.get("block_size", 32), q.get("symmetric", True),
                         q.get("accuracy_level", 4))


def derive_bundle(src: Path, dst_root: Path, variant: str, config: dict) -> Path:
    """The bench bundle with its decoders' weights quantized, in `dst_root` (cached: keyed by the source manifest and
    the options). Unchanged files are hard links where the file system allows, copies elsewhere."""
    from opens2s_edge.export.manifest import write_manifest
    from opens2s_edge.export.weight_quant import quantize_graph
    from opens2s_edge.runtime.files import atomic_dir

    options = _options(variant, config)
    manifest = json.loads((src / "manifest.json").read_text())
    key = hashlib.sha256((json.dumps(manifest["files"], sort_keys=True) + repr(options)).encode()).hexdigest()[:16]
    dst = dst_root / f"{variant}-{key}"
    if (dst / "manifest.json").is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantized = {manifest["graphs"][g]["file"] for g in options.graphs if g in manifest["graphs"]}
    with atomic_dir(dst) as tmp:
        for rel in manifest["files"]:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if rel in quantized or rel.removesuffix(".data") in quantized:
                shutil.copyfile(src / rel, target)  # rewritten below: never a link to the source's bytes
                continue
            try:
                os.link(src / rel, target)
            except OSError:
                shutil.copyfile(src / rel, target)
        for name in options.graphs:
            entry = manifest["graphs"].get(name)
            if entry is None:
                continue
            record = quantize_graph(tmp / entry["file"], options)
            entry["weights"] = {**record, "derived_from": str(src),
                                "deviation": "not measured here: benchmarks/accuracy.py measures it"}
            entry["tensorrt_ready"] = False
        manifest["weights"] = options.weights
        manifest.pop("files")
        write_manifest(tmp, manifest)
    return dst


def derive_variants(config: dict) -> dict[str, str]:
    """Run in its own process (imports the export stack): every requested variant's bundle path."""
    root = Path(config["cache_root"]) / "bench" / "variants"
    return {v: str(derive_bundle(Path(config["bundle"]), root, v, config)) for v in config["variants"]}


def graph_bytes(bundle: Path, graph: str) -> int:
    """Bytes of a graph's weights as stored (the .onnx and its external data): what one decode step reads, packed
    int4/int8 blocks, scales and zero points included."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    name = manifest["graphs"][graph]["file"]
    return sum((bundle / f).stat().st_size for f in (name, name + ".data") if (bundle / f).is_file())


# -- profiles -------------------------------------------------------------------------------------------------------
def _aggregate(events: list[dict], runs: int) -> dict[str, Any]:
    """The last `runs` model_run events and their nodes: per-step means, per op."""
    sessions = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if len(sessions) < runs:
        raise RuntimeError(f"the profile holds {len(sessions)} runs, expected at least {runs}")
    window = sessions[-runs:]
    start = window[0]["ts"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
    per_op: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"us_per_step": 0.0, "nodes_per_step": 0.0})
    for e in nodes:
        op = e["args"]["op_name"]
        per_op[op]["us_per_step"] += e["dur"] / runs
        per_op[op]["nodes_per_step"] += 1 / runs
    kernels = sum(v["us_per_step"] for v in per_op.values())
    ops = dict(sorted(per_op.items(), key=lambda kv: -kv[1]["us_per_step"]))
    for v in ops.values():
        v["share"] = v["us_per_step"] / kernels if kernels else None
    return {"model_run_us": float(np.mean([e["dur"] for e in window])), "kernels_us": kernels, "ops": ops}


def _session(path: Path, threads: int, prefix: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def decode_profile(config: dict) -> dict[str, Any]:
    """onnxruntime's profile of `steps` decode steps of the bundle's `graph` after a `prompt_tokens` prefill, through
    the binding the runtime uses for the graph's form."""
    import tempfile

    from opens2s_edge.runtime.bundle import load_bundle
    from opens2s_edge.runtime.onnx_backend import OrtDecoder
    from opens2s_edge.runtime.ort_gqa import GqaDecoder

    bundle = load_bundle(config["bundle"], verify=False)
    graph = config.get("graph", "llm")
    steps, prompt = config.get("steps", 32), config.get("prompt_tokens", 64)
    entry = bundle.graph(graph)
    table = bundle.array("llm_embed" if graph == "llm" else "tts_embed")
    binding = GqaDecoder if entry.get("form") == "gqa" else OrtDecoder
    ids = np.random.default_rng(0).integers(0, table.shape[0], prompt)

    def steps_wall(session: Any) -> float:
        decoder = binding(session, table)
        logits = decoder.run(decoder.embed(ids))["logits"]
        walls = []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = decoder.run(decoder.embed([int(np.argmax(logits))]))["logits"]
            walls.append(time.perf_counter() - t0)
        return float(np.mean(walls)) * 1e6

    with tempfile.TemporaryDirectory() as scratch:
        from opens2s_edge.runtime.onnx_backend import make_session

        # First without profiling (the step as it runs), then profiled (the profiler costs a little per node).
        plain = steps_wall(make_session(bundle.graph_path(graph), ["CPUExecutionProvider"], config.get("threads", 1)))
        session = _session(bundle.graph_path(graph), config.get("threads", 1), Path(scratch) / "profile")
        wall = steps_wall(session)
        events = json.loads(Path(session.end_profiling()).read_text())
    profile = _aggregate(events, steps)
    return {"graph": graph, "form": entry.get("form"), "weights": entry.get("weights", {}).get("weights", "float"),
            "steps": steps, "context": prompt + steps / 2, "wall_unprofiled_us": plain, "wall_us": wall, **profile,
            "onnxruntime_overhead_us": profile["model_run_us"] - profile["kernels_us"],
            "python_us": wall - profile["model_run_us"],
            "note": "wall_us, model_run and kernels are from the profiled run (the profiler adds to each node); "
                    "python_us (wall - model_run) is our loop and binding, which profiling does not touch"}


def genai_profile(config: dict) -> dict[str, Any]:
    """The same profile of onnxruntime-genai's graph (`config["model_dir"]`): its inputs fed as its runtime feeds them
    (input_ids, attention_mask), past/present bound to one buffer per layer, as its `past_present_share_buffer`."""
    import tempfile

    import onnxruntime as ort

    model_dir = Path(config["model_dir"])
    model = json.loads((model_dir / "genai_config.json").read_text())["model"]
    genai = model["decoder"]
    steps, prompt = config.get("steps", 32), config.get("prompt_tokens", 64)
    max_len = prompt + steps + 1
    ids = np.random.default_rng(0).integers(0, model["vocab_size"], prompt).tolist()

    def steps_wall(session: Any) -> float:
        binding = session.io_binding()
        binding.bind_output("logits", "cpu")  # first: get_outputs() returns the bound outputs in binding order
        buffers = []
        for spec in session.get_inputs():
            if not spec.name.startswith("past_key_values"):
                continue
            dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
            buffers.append(np.zeros((1, genai["num_key_value_heads"], max_len, genai["head_size"]), dtype))
            value = ort.OrtValue.ortvalue_from_numpy(buffers[-1])
            binding.bind_ortvalue_input(spec.name, value)
            binding.bind_ortvalue_output(spec.name.replace("past_key_values", "present"), value)

        def step(tokens: list[int], pos: int) -> np.ndarray:
            binding.bind_cpu_input("input_ids", np.asarray([tokens], np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((1, pos + len(tokens)), np.int64))
            binding.bind_output("logits", "cpu")  # rebound: its logits cover every input row, the shape changes
            session.run_with_iobinding(binding)
            return binding.get_outputs()[0].numpy()[0, -1]

        logits = step(ids, 0)
        walls = []
        for i in range(steps):
            t0 = time.perf_counter()
            logits = step([int(np.argmax(logits))], prompt + i)
            walls.append(time.perf_counter() - t0)
        return float(np.mean(walls)) * 1e6

    path = model_dir / genai["filename"]
    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if config.get("threads"):
            options.intra_op_num_threads = config["threads"]
        plain = steps_wall(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
        session = _session(path, config.get("threads", 1), Path(scratch) / "profile")
        wall = steps_wall(session)
        events = json.loads(Path(session.end_profiling()).read_text())
    profile = _aggregate(events, steps)
    return {"graph": str(model_dir), "steps": steps, "context": prompt + steps / 2, "wall_unprofiled_us": plain,
            "wall_us": wall, **profile, "onnxruntime_overhead_us": profile["model_run_us"] - profile["kernels_us"],
            "note": "its graph on a plain onnxruntime session driven from Python (not genai's own C++ loop): "
                    "the kernels and onnxruntime's share are genai's; its loop's cost is 1/tok/s minus this step"}


# -- the peers ------------------------------------------------------------------------------------------------------
def variant_llm(config: dict) -> dict[str, Any]:
    """LLM decode alone on a derived bundle (`config["bundle"]` already points at it)."""
    from .llm_peers import runtime_llm

    result = runtime_llm(config, "onnxruntime")
    result["precision"] = config["variant_weights"]
    result["bundle"] = config["bundle"]
    return result


def variant_turns(config: dict) -> dict[str, Any]:
    """Whole turns on a derived bundle: the `ort` peer's code on the quantized copy."""
    from .peers import TURN_PEERS

    return {**TURN_PEERS["ort"](config), "bundle": config["bundle"], "precision": config["variant_weights"]}
