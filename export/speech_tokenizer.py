"""GLM-4-Voice's speech tokenizer -> one verified ONNX graph, standalone or inside another bundle.

The graph is the PyTorch definition (training/speech_tokenizer.py) traced the way every bundle graph is traced
(export/pipeline.py `export_graph`: TorchScript at the classic opset, weights as 64-byte aligned external data):

| name | shape | dtype | meaning |
|---|---|---|---|
| `input_features` | (B, n_mels, T) | float32 | log-mel of B segments padded alike, T a multiple of 2 x pooling kernel |
| `feature_length` | (B,) | int64 | valid mel frames per segment |
| `tokens` | (B, T / (2 k)) | int64 | nearest code per 12.5 Hz position (rows past `token_length` are padding) |
| `token_length` | (B,) | int64 | valid tokens per segment, ceil(feature_length / (2 k)) |
| `distance` | (B, T / (2 k)) | float32 | squared distance to the chosen code (the quantization error) |

The graph is fp32 only: a token is a nearest-neighbour choice among 16384 codes, and fp16 rounding of the
distances would change choices that the reference makes in fp32.

Checks, as for every bundle graph: `onnx.checker` (full), TensorRT readiness against the parser's support list,
then onnxruntime CPU against the PyTorch module at several batch sizes and lengths (one full 30 s segment among
them): `token_length` exactly, `distance` within 1e-4 relative, and every token exactly where the reference's best
code leads the runner-up by more than that tolerance (closer calls may go either way in float32; the chosen code's
distance must then be within the tolerance of the best). `export_speech_tokenizer` writes a standalone bundle folder
(manifest + sha256 of every file, renamed into place when complete) that `runtime/speech_tokenizer.py` runs without
torch; `write_tokenizer_graph` writes just the graph and returns its manifest entries, for a bundle assembled
elsewhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

import opens2s_edge
from opens2s_edge.runtime import speech_tokenizer as procedure
from opens2s_edge.runtime.audio import Frontend
from opens2s_edge.runtime.bundle import FORMAT_VERSION, MANIFEST, sha256_file
from opens2s_edge.runtime.files import atomic_dir
from opens2s_edge.training.speech_tokenizer import WhisperVQEncoder, load_encoder

from .checks import check_graph
from .graphs import GraphSpec
from .pipeline import ExportError, export_graph

TOLERANCE = 1e-4
DEVIATION_REFERENCE = ("PyTorch fp32 model: distance max |onnxruntime - reference| / max(1, max |reference|); "
                       "tokens equal wherever the best code leads by more than the tolerance")


class TokenizerGraph(nn.Module):
    """The exported function: tokens, valid lengths and each token's squared distance."""

    def __init__(self, encoder: WhisperVQEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: Tensor, feature_length: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        states, length = self.encoder.quantize_input(input_features, feature_length)
        distances = self.encoder.distances(states)
        best = torch.argmin(distances, dim=-1)
        return best, length, torch.gather(distances, 2, best.unsqueeze(-1)).squeeze(-1)


def _probe_batches(encoder: WhisperVQEncoder, features: Frontend) -> list[dict[str, Tensor]]:
    """Feeds from speech-like audio through the real procedure: several segments padded alike (lengths that do
    and do not fill the stride, one of a single frame), one lone segment, and a whole 30 s segment."""
    s = encoder.structure
    rng = np.random.default_rng(7)
    t = np.arange(procedure.SEGMENT_SAMPLES) / procedure.SAMPLE_RATE
    voiced = sum(np.sin(2 * np.pi * (110 + 30 * np.sin(2 * np.pi * 0.5 * t)) * h * t) / h for h in range(1, 9))
    wav = (0.1 * (0.5 + 0.5 * np.sin(2 * np.pi * 2.7 * t) ** 2) * voiced
           + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    groups = [[wav[: 3 * 16000 + 77], wav[5000: 5000 + 16000 + 1280 * 3], wav[:100]],
              [wav[20000: 20000 + 38000]],
              [wav]]
    feeds = []
    for group in groups:
        batch = procedure.segment_batch(group, list(range(len(group))), features,
                                        procedure.padded_length([g.size for g in group], s, features))
        feeds.append({"input_features": torch.from_numpy(batch.features),
                      "feature_length": torch.from_numpy(batch.frame_lengths)})
    return feeds


def tokenizer_spec(encoder: WhisperVQEncoder, features: Frontend,
                   name: str = procedure.GRAPH) -> GraphSpec:
    feeds = _probe_batches(encoder, features)
    s = encoder.structure
    return GraphSpec(
        name=name, module=TokenizerGraph(encoder), inputs=feeds[0], probes=feeds[1:],
        outputs=["tokens", "token_length", "distance"],
        dynamic={"input_features": {0: "batch", 2: "frames"}, "feature_length": {0: "batch"},
                 "tokens": {0: "batch", 1: "positions"}, "token_length": {0: "batch"},
                 "distance": {0: "batch", 1: "positions"}},
        limits={"max_frames": procedure.SEGMENT_SAMPLES // features.hop, "frames_multiple": s.frames_per_token},
        output_shapes={"tokens": ["batch", "positions"], "token_length": ["batch"],
                       "distance": ["batch", "positions"]})


def verify_tokenizer_graph(spec: GraphSpec, path: Path, tolerance: float = TOLERANCE) -> dict[str, float]:
    """onnxruntime against the PyTorch module on every feed; raises ExportError on any disagreement (above).
    Returns the deviation per output and how many near-ties went the other way (`ties`)."""
    encoder: WhisperVQEncoder = spec.module.encoder
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = {"tokens": 0.0, "token_length": 0.0, "distance": 0.0, "ties": 0.0}
    for feeds in [spec.inputs, *spec.probes]:
        with torch.no_grad():
            states, length = encoder.quantize_input(feeds["input_features"], feeds["feature_length"])
            dist = encoder.distances(states).numpy()
        tokens, token_length, distance = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        if not np.isfinite(distance).all():
            raise ExportError(f"{spec.name}: distance has NaN or Inf on onnxruntime")
        if tokens.shape != dist.shape[:2] or not np.array_equal(token_length, length.numpy()):
            raise ExportError(f"{spec.name}: onnxruntime gives tokens {tokens.shape} / lengths "
                              f"{token_length.tolist()}, PyTorch {dist.shape[:2]} / {length.tolist()}")
        best = dist.min(axis=-1)
        scale = max(1.0, float(np.abs(best).max()))
        worst["distance"] = max(worst["distance"], float(np.abs(distance - best).max()) / scale)
        ordered = np.sort(dist, axis=-1)
        lead = (ordered[..., 1] - ordered[..., 0]) / scale
        chosen = np.take_along_axis(dist, tokens[..., None], axis=-1)[..., 0]
        differ = tokens != dist.argmin(axis=-1)
        clear = differ & (lead > tolerance)
        if clear.any() or ((chosen - best)[differ] / scale > tolerance).any():
            raise ExportError(f"{spec.name}: onnxruntime chose other codes than PyTorch at {int(differ.sum())} "
                              f"positions ({int(clear.sum())} of them clear choices)")
        worst["ties"] += float(differ.sum())
    if worst["distance"] > tolerance:
        raise ExportError(f"{spec.name}: onnxruntime's distances deviate from PyTorch fp32 by "
                          f"{worst['distance']:.2e} (allowed {tolerance:.0e})")
    return worst


def _io(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    def describe(values) -> list[dict]:
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return describe(model.graph.input), describe(model.graph.output)


def write_tokenizer_graph(tokenizer: Path, dest: Path, name: str = procedure.GRAPH,
                          progress: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Export, check and verify the tokenizer of the released folder `tokenizer` as `dest/<name>.onnx`
    (+ `.onnx.data`). Returns (the graph's manifest entry, the manifest's `speech_tokenizer` section)."""
    t0 = time.perf_counter()
    progress(f"[export-tokenizer] loading {tokenizer}")
    encoder, features = load_encoder(tokenizer)
    spec = tokenizer_spec(encoder, features, name)
    path = dest / f"{name}.onnx"
    progress(f"[export-tokenizer] {name}: exporting")
    state = spec.module.state_dict()
    opset = export_graph(spec, path, torch.float32, state.__getitem__)
    check_graph(path)
    deviation = verify_tokenizer_graph(spec, path)
    inputs, outputs = _io(onnx.load(str(path), load_external_data=False))
    entry = {"file": path.name, "inputs": inputs, "outputs": outputs, "dtype": "fp32", "form": spec.form,
             "opset": opset, "limits": spec.limits, "aliases": {}, "max_deviation": deviation["distance"],
             "tolerance": TOLERANCE, "deviation": deviation, "deviation_reference": DEVIATION_REFERENCE}
    section = {"graph": name, "structure": encoder.structure.to_dict(), "features": features.to_json(),
               "segment_seconds": procedure.SEGMENT_SECONDS, "batch_segments": procedure.BATCH_SEGMENTS,
               "rate_hz": features.sample_rate / encoder.structure.stride_samples(features.hop)}
    progress(f"[export-tokenizer] {name}: checked, TensorRT-ready, distance deviation {deviation['distance']:.1e}, "
             f"{int(deviation['ties'])} near-ties ({time.perf_counter() - t0:.1f} s)")
    return entry, section


def export_speech_tokenizer(tokenizer: str | Path, out: str | Path, force: bool = False,
                            progress: Callable[[str], None] = print) -> Path:
    """A standalone tokenizer bundle at `out`: the verified graph and a manifest hashing every file, written in a
    temporary folder beside `out` and renamed into place (nothing is left behind on an error)."""
    tokenizer, out = Path(tokenizer), Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    with atomic_dir(out) as tmp:
        entry, section = write_tokenizer_graph(tokenizer, tmp, progress=progress)
        manifest = {
            "format_version": FORMAT_VERSION, "kind": procedure.KIND, "dtype": "fp32",
            "source": {"tokenizer": str(tokenizer.resolve())},
            "versions": {"opens2s_edge": opens2s_edge.__version__, "torch": torch.__version__,
                         "onnx": onnx.__version__, "onnxruntime": ort.__version__, "opset": entry["opset"]},
            procedure.KIND: section, "graphs": {section["graph"]: entry}, "arrays": {},
        }
        manifest["files"] = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "size": p.stat().st_size}
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    progress(f"[export-tokenizer] tokenizer bundle written to {out}")
    return out
