"""Checkpoint + decoder -> verified bundle, in one straight pass:

```
check options -> open sources (model on meta, weights per tensor, decoder)
  -> for each graph: fp32 reference -> trace + stream weights -> checks -> verify vs PyTorch -> [quantize + measure]
  -> embedding tables, tokenizer files -> manifest (hashes every file) -> rename into place
```
The pieces: `weights.py` (streaming), `onnx_graph.py` (trace, ONNX surgery, external data), `checks.py`, `verify.py`,
`weight_quant.py` (MatMulNBits), `manifest.py`. The bundle is assembled in a temporary folder beside the target and
renamed into place once the manifest is written; an error or an interrupt leaves nothing at the target.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from opens2s_edge.runtime.audio import Frontend
from opens2s_edge.runtime.bundle import MANIFEST
from opens2s_edge.runtime.files import atomic_dir, holds, replace_refusal
from opens2s_edge.training.checkpoint import CheckpointError, read_frontend
from opens2s_edge.training.opens2s import OpenS2S
from opens2s_edge.training.qwen3 import TORCH_DTYPES
from opens2s_edge.training.token2wav.decoder import Token2Wav, load_decoder

from . import lm as lm_forms
from .checks import onnx_check, tensorrt_readiness
from .errors import ExportError
from .graphs import GraphSpec, fp32_islands, opens2s_graphs, to_export_dtype, token2wav_graphs
from .manifest import build_manifest, copy_tokenizers, write_arrays, write_manifest
from .onnx_graph import export_graph, io_spec
from .verify import DEVIATION_REFERENCE, TOLERANCE, as_float32, reference_outputs, verify_graph
from .weight_quant import WeightOptions, quantize_graph
from .weights import CheckpointWeights, checkpoint_keys, open_model, placeholders, release, streamed

DTYPES = TORCH_DTYPES  # the bundle dtypes export writes: every one the runtime knows
# What the old single module exported, for its callers (tests, the speech tokenizer, the TensorRT tests).
_io_spec = io_spec
MAX_FLOW_STEPS = 50

__all__ = ["DEVIATION_REFERENCE", "DTYPES", "TOLERANCE", "ExportError", "ExportOptions", "export_bundle",
           "export_graph", "verify_graph"]


# What an export writes into a bundle (and `build`: engines/), by name: how an older bundle, or one whose manifest was
# damaged, is still known for ours.
BUNDLE_ENTRIES = ("*.onnx", "*.onnx.data", "*.npy", "*.json", "merges.txt", "vocab.json", "tts", "engines")


def not_a_bundle(folder: Path) -> str | None:
    """None when `folder` is a bundle an export wrote (which `--force` may replace), else why it is not one: its
    manifest.json is a JSON object with a format_version and the folder holds nothing the manifest does not list
    (but engines/, which `build` adds); or, its manifest unreadable, every entry is one a bundle has and a graph is
    among them."""
    names = {p.name for p in folder.iterdir()}
    if MANIFEST not in names:
        return f"it has no {MANIFEST}"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if isinstance(manifest, dict) and "format_version" in manifest and isinstance(manifest.get("files"), dict):
        listed = {MANIFEST, "engines", *(str(rel).split("/")[0] for rel in manifest["files"])}
        foreign = sorted(names - listed)
        return f"its manifest does not list {holds(folder, foreign)}" if foreign else None
    foreign = sorted(n for n in names if not any(fnmatch.fnmatchcase(n, pattern) for pattern in BUNDLE_ENTRIES))
    if foreign:
        return f"its {MANIFEST} is not a bundle manifest, and no bundle holds {holds(folder, foreign)}"
    if not any(n.endswith(".onnx") for n in names):
        return f"its {MANIFEST} is not a bundle manifest, and it holds no graph"
    return None


@dataclass(frozen=True)
class ExportOptions:
    """Everything `export` is asked for, checked at once before any work (each failure named)."""

    dtype: str = "fp32"
    form: str = "classic"
    max_context: int = 2048
    max_audio_seconds: int = 30
    weights: WeightOptions | None = None
    flow_steps: int | None = None

    def check(self, out: Path, force: bool) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.form not in lm_forms.FORMS:
            raise ExportError(f"--form must be one of {', '.join(lm_forms.FORMS)}, got {self.form!r}")
        if out.exists() or out.is_symlink():
            refusal = replace_refusal(out, not_a_bundle, "bundle written by opens2s-edge export", "--out")
            if refusal is not None:
                raise ExportError(refusal)
            if not force:
                raise ExportError(f"{out} already exists; pass --force to replace it")
        if self.max_context < 16:
            raise ExportError(f"--max-context must be at least 16, got {self.max_context}")
        if self.max_audio_seconds < 1:
            raise ExportError(f"--max-audio-seconds must be at least 1, got {self.max_audio_seconds}")
        if self.flow_steps is not None and not 1 <= self.flow_steps <= MAX_FLOW_STEPS:
            raise ExportError(f"--flow-steps must be between 1 and {MAX_FLOW_STEPS}, got {self.flow_steps}")
        if self.weights is not None:
            self.weights.check(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class Sources:
    """The export's inputs, opened once: the OpenS2S model on the meta device with its per-tensor weight reader,
    the audio frontend, the GLM-4-Voice decoder (small: loaded whole)."""

    checkpoint: Path
    decoder: Path
    model: OpenS2S
    weights: CheckpointWeights
    frontend: Frontend
    token2wav: Token2Wav

    @classmethod
    def open(cls, checkpoint: Path, decoder: Path, max_context: int, progress: Callable[[str], None]) -> Sources:
        progress(f"[export] opening checkpoint {checkpoint} (weights streamed per tensor)")
        model, weights = open_model(checkpoint, max_context)
        try:
            frontend = read_frontend(checkpoint, model.config)
        except CheckpointError as exc:
            raise ExportError(str(exc)) from exc
        progress(f"[export] loading decoder {decoder}")
        return cls(checkpoint, decoder, model, weights, frontend, load_decoder(decoder))

    def graph_specs(self, options: ExportOptions) -> tuple[list[GraphSpec], set[str]]:
        """Every graph in export order, and the names of those whose weights stream from the checkpoint."""
        windows = -(-options.max_audio_seconds // self.frontend.window_seconds)
        streamed_specs = opens2s_graphs(self.model, options.max_context, windows, options.torch_dtype, options.form)
        in_memory = token2wav_graphs(self.token2wav, options.torch_dtype)
        return [*streamed_specs, *in_memory], {s.name for s in streamed_specs}


def _trace_streamed(spec: GraphSpec, sources: Sources, path: Path, dtype: torch.dtype,
                    before_export: Callable[[GraphSpec, OpenS2S], None] | None) -> tuple[list, int]:
    """A checkpoint graph: its fp32 reference with one layer's weights in memory at a time, then traced on
    weightless placeholders with the weights streamed into external data one tensor at a time."""
    keys = checkpoint_keys(sources.model, spec.module, set(sources.weights.where))
    with streamed(spec.module, keys, sources.weights):
        refs = reference_outputs(spec)
    placeholders(spec.module, keys, dtype, spec.keep_fp32)
    islands = fp32_islands(spec.module, spec.keep_fp32) if dtype != torch.float32 else []
    if before_export is not None:
        before_export(spec, sources.model)
    try:
        opset = export_graph(spec, path, dtype, lambda n: sources.weights.get(keys[n]))
    finally:
        release(spec.module, keys)
        for m in islands:
            del m.forward
    return refs, opset


def _trace_in_memory(spec: GraphSpec, sources: Sources, path: Path, dtype: torch.dtype,
                     before_export: Callable[[GraphSpec, OpenS2S], None] | None) -> tuple[list, int]:
    """A token2wav graph: small, so a cast copy is traced (the modules nest, the flow holds the estimator, and each
    graph's fp32 reference must see fp32 weights)."""
    refs = reference_outputs(spec)
    spec = dataclasses.replace(spec, module=copy.deepcopy(spec.module))
    to_export_dtype(spec.module, dtype, spec.keep_fp32, spec.fp32_entry, spec.fp32_entry_names)
    state = spec.module.state_dict()
    if before_export is not None:
        before_export(spec, sources.model)
    return refs, export_graph(spec, path, dtype, state.__getitem__)


def export_one(spec: GraphSpec, sources: Sources, from_checkpoint: bool, folder: Path, options: ExportOptions,
               before_export: Callable[[GraphSpec, OpenS2S], None] | None = None,
               progress: Callable[[str], None] = print) -> dict:
    """One graph written into `folder`, checked, verified (and quantized when asked); its manifest entry."""
    path = folder / f"{spec.name}.onnx"
    dtype = options.torch_dtype
    if spec.fp32_in_bf16 and dtype == torch.bfloat16:
        dtype = torch.float32
        spec = dataclasses.replace(spec, inputs=as_float32(spec.inputs), probes=[as_float32(p) for p in spec.probes])
    trace = _trace_streamed if from_checkpoint else _trace_in_memory
    refs, opset = trace(spec, sources, path, dtype, before_export)
    onnx_check(path)
    tolerance = max(TOLERANCE[options.dtype], spec.min_tolerance)
    deviation = verify_graph(spec, path, refs, tolerance, dtype)
    entry = {"dtype": {v: k for k, v in DTYPES.items()}[dtype], "form": spec.form, "opset": opset,
             "limits": spec.limits, "aliases": spec.aliases, "max_deviation": max(deviation.values()),
             "tolerance": tolerance, "deviation": deviation, "deviation_reference": DEVIATION_REFERENCE}
    w = options.weights
    if w is not None and spec.name in w.graphs:
        # `deviation` stays the float graph's, verified against the tolerance above; the quantized graph's is
        # measured on the same inputs and recorded beside it, not gated: int4 moves logits by design (how far over
        # a whole reply: benchmarks/accuracy.py).
        record = quantize_graph(path, w)
        onnx_check(path)
        quantized = verify_graph(spec, path, refs, None, dtype)
        entry["weights"] = {**record, "deviation": quantized, "max_deviation": max(quantized.values())}
        progress(f"[export] {spec.name}: {w.weights} weights (MatMulNBits, block {w.block_size}, "
                 f"{'symmetric' if w.symmetric else 'asymmetric'}, accuracy level {w.accuracy_level}): "
                 f"{record['matmuls_quantized']} matmuls, {record['bytes_before'] / 2**20:.1f} -> "
                 f"{record['bytes_after'] / 2**20:.1f} MiB, deviation from fp32 {max(quantized.values()):.2e} "
                 "(measured, not gated)")
    # TensorRT parses the classic and modern forms only; gqa graphs and MatMulNBits are onnxruntime's own ops.
    problems = tensorrt_readiness(path)
    entry["tensorrt_ready"] = not problems
    if problems:
        if spec.form in lm_forms.TENSORRT_FORMS and "weights" not in entry:
            raise ExportError(f"{path.name} is not TensorRT-ready:\n  " + "\n  ".join(problems))
        entry["tensorrt_problems"] = problems[:3] + ([f"... {len(problems) - 3} more"] if len(problems) > 3 else [])
    inputs, outputs = io_spec(onnx.load(str(path), load_external_data=False))
    return {"file": path.name, "inputs": inputs, "outputs": outputs, **entry}


def export_bundle(checkpoint: Path, decoder: Path, out: Path, dtype: str = "fp32", max_context: int = 2048,
                  max_audio_seconds: int = 30, force: bool = False,
                  progress: Callable[[str], None] = print, form: str = "classic",
                  before_export: Callable[[GraphSpec, OpenS2S], None] | None = None, *,
                  weights: WeightOptions | None = None, flow_steps: int | None = None) -> Path:
    """Write a verified bundle. Graph by graph: the fp32 reference runs with one layer's weights in memory
    at a time, the graph is traced on weightless placeholders, its weights are streamed from the
    safetensors files into external data one tensor at a time, and onnxruntime checks it; all other
    components stay on the meta device. `weights`: weight-only int4/int8 for the graphs it names;
    `flow_steps`: token2wav's Euler steps (recorded in the manifest). `before_export(spec, model)` is called just
    before each trace."""
    options = ExportOptions(dtype, form, max_context, max_audio_seconds, weights, flow_steps)
    options.check(out, force)
    sources = Sources.open(checkpoint, decoder, max_context, progress)
    specs, from_checkpoint = sources.graph_specs(options)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        graphs = {}
        for i, spec in enumerate(specs, 1):
            t0 = time.perf_counter()
            progress(f"[export] {i}/{len(specs)} {spec.name}: exporting")
            entry = export_one(spec, sources, spec.name in from_checkpoint, tmp, options, before_export, progress)
            graphs[spec.name] = entry
            ready = "TensorRT-ready" if entry["tensorrt_ready"] else "onnxruntime only"
            progress(f"[export] {i}/{len(specs)} {spec.name}: checked, {ready}, {spec.form}, max deviation from "
                     f"fp32 {entry['max_deviation']:.1e} ({time.perf_counter() - t0:.1f} s)")
        arrays = write_arrays(sources.weights, tmp, dtype)
        copy_tokenizers(checkpoint, tmp)
        write_manifest(tmp, build_manifest(sources.model, sources.token2wav, checkpoint, decoder, dtype, form,
                                           max_context, sources.frontend, max_audio_seconds, graphs, arrays,
                                           None if weights is None else weights.record(), flow_steps))
    progress(f"[export] bundle written to {out}")
    return out
