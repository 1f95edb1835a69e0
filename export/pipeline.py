"""Checkpoint + decoder -> verified bundle.

Each graph is exported, checked (onnx full check, TensorRT readiness), run on onnxruntime at several
input sizes against the PyTorch module it came from, and only then recorded. The bundle is assembled
in a temporary folder beside the target and renamed into place once the manifest is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import opens2s_edge
from opens2s_edge.runtime import audio as frontend
from opens2s_edge.runtime.bundle import FORMAT_VERSION, MANIFEST, sha256_file
from opens2s_edge.runtime.prompt import AUDIO_PLACEHOLDER_ID, DEFAULT_SYSTEM_PROMPT, SpeechVocab
from opens2s_edge.training.checkpoint import TOKENIZER_FILES, load_checkpoint, read_generation_defaults
from opens2s_edge.training.token2wav.decoder import load_decoder

from . import lm as lm_forms
from .checks import check_graph
from .graphs import GraphSpec, opens2s_graphs, token2wav_graphs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Largest allowed deviation from PyTorch fp32, relative to each output's scale.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 1e-1}


class ExportError(RuntimeError):
    """Export could not produce a verified bundle; nothing is left at the target."""


def _onnx_dtype_name(elem: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem).name


def _io_spec(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": _onnx_dtype_name(t.elem_type), "shape": shape})
        return out

    return describe(model.graph.input), describe(model.graph.output)


def export_graph(spec: GraphSpec, path: Path) -> int:
    """Write `spec` as ONNX at `path` in its form; returns the graph's opset."""
    lowering = spec.lowering() if spec.lowering is not None else contextlib.nullcontext()
    with torch.no_grad(), warnings.catch_warnings(), lowering:
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module, tuple(spec.inputs.values()), str(path), input_names=list(spec.inputs),
                          output_names=spec.outputs, dynamic_axes=spec.dynamic,
                          opset_version=lm_forms.export_opset(spec.form),
                          custom_opsets=lm_forms.custom_opsets(spec.form),
                          dynamo=False, do_constant_folding=True)
    if spec.form == "modern":
        lm_forms.finish_modern(path)
    if spec.output_shapes:
        _stamp_output_shapes(path, spec.output_shapes)
    return lm_forms.OPSETS[spec.form]


def _stamp_output_shapes(path: Path, shapes: dict[str, list[int | str]]) -> None:
    """The tracer cannot see through `last_only` slicing or the modern ops' outputs and invents symbolic
    dims; the manifest and TensorRT profiles need the real contract."""
    model = onnx.load(str(path), load_external_data=False)
    for out in model.graph.output:
        if out.name not in shapes:
            continue
        dims = out.type.tensor_type.shape.dim
        del dims[:]
        for d in shapes[out.name]:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    onnx.save(model, str(path))


def verify_graph(spec: GraphSpec, path: Path, tolerance: float) -> float:
    """Largest relative deviation of onnxruntime from PyTorch over the example and probe inputs."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for feeds in [spec.inputs, *spec.probes]:
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        with torch.no_grad():
            want = spec.module(*feeds.values())
        want = want if isinstance(want, tuple) else (want,)
        for name, g, w in zip(spec.outputs, got, want, strict=True):
            w = w.float().numpy()
            g = g.astype(np.float32)
            if g.shape != w.shape:
                raise ExportError(f"{spec.name}: output {name} has shape {g.shape} in ONNX, {w.shape} in PyTorch")
            if not np.isfinite(g).all():
                raise ExportError(f"{spec.name}: output {name} has NaN or Inf on onnxruntime")
            err = float(np.abs(g - w).max()) / max(1.0, float(np.abs(w).max()))
            worst = max(worst, err)
    if worst > tolerance:
        raise ExportError(f"{spec.name}: onnxruntime deviates from PyTorch by {worst:.2e} (allowed {tolerance:.0e})")
    return worst


def export_bundle(checkpoint: Path, decoder: Path, out: Path, dtype: str = "fp32", max_context: int = 2048,
                  max_audio_seconds: int = 30, force: bool = False,
                  progress: Callable[[str], None] = print, form: str = "classic") -> Path:
    """`form` picks the decoder graphs' ops: "classic" (TensorRT 10.3 / JetPack 6) or "modern" (opset 24
    TensorScatter + Attention + RMSNormalization + RotaryEmbedding: TensorRT 10.15); see export/lm.py."""
    if form not in lm_forms.FORMS:
        raise ExportError(f"--form must be one of {', '.join(lm_forms.FORMS)}, got {form!r}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if max_context < 16:
        raise ExportError(f"--max-context must be at least 16, got {max_context}")
    torch_dtype = DTYPES[dtype]
    progress(f"[export] loading checkpoint {checkpoint}")
    model = load_checkpoint(checkpoint)
    for lm in (model.llm_model, model.tts_lm_model):
        lm._ensure_rope(max_context)  # a constant table in the graph, not computed per call
    progress(f"[export] loading decoder {decoder}")
    token2wav = load_decoder(decoder)
    if torch_dtype != torch.float32:
        model.to(torch_dtype)
        token2wav.flow.to(torch_dtype)
        token2wav.hift.to(torch_dtype)
    specs = opens2s_graphs(model, max_context, max_audio_seconds, torch_dtype, form)
    specs += token2wav_graphs(token2wav, torch_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial.", dir=out.parent))
    try:
        graphs = {}
        for i, spec in enumerate(specs, 1):
            t0 = time.perf_counter()
            progress(f"[export] {i}/{len(specs)} {spec.name}: exporting")
            path = tmp / f"{spec.name}.onnx"
            opset = export_graph(spec, path)
            check_graph(path)
            deviation = verify_graph(spec, path, TOLERANCE[dtype])
            model_proto = onnx.load(str(path), load_external_data=False)
            inputs, outputs = _io_spec(model_proto)
            graphs[spec.name] = {"file": path.name, "inputs": inputs, "outputs": outputs, "form": spec.form,
                                 "opset": opset, "limits": spec.limits, "aliases": spec.aliases,
                                 "max_deviation": deviation}
            progress(f"[export] {i}/{len(specs)} {spec.name}: checked, TensorRT-ready, max deviation "
                     f"{deviation:.1e} ({time.perf_counter() - t0:.1f} s)")
        arrays = {}
        for name, lm in (("llm_embed", model.llm_model), ("tts_embed", model.tts_lm_model)):
            table = lm.model.embed_tokens.weight.detach().float().numpy().astype(
                np.float16 if dtype == "fp16" else np.float32)
            np.save(tmp / f"{name}.npy", table)
            arrays[name] = {"file": f"{name}.npy", "dtype": table.dtype.name, "shape": list(table.shape)}
        _copy_tokenizers(checkpoint, tmp)
        manifest = _manifest(model, token2wav, checkpoint, decoder, dtype, max_context, max_audio_seconds,
                             graphs, arrays)
        manifest["form"] = form  # the decoders'; every graph also records its own form and opset
        manifest["files"] = {
            str(p.relative_to(tmp)): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"[export] bundle written to {out}")
    return out


def _copy_tokenizers(checkpoint: Path, dst: Path) -> None:
    for rel in (*TOKENIZER_FILES, *(f"tts/{n}" for n in TOKENIZER_FILES)):
        src = checkpoint / rel
        if not src.is_file():
            raise ExportError(f"checkpoint {checkpoint} is missing {rel}")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst / rel)


def _manifest(model, token2wav, checkpoint: Path, decoder: Path, dtype: str, max_context: int,
              max_audio_seconds: int, graphs: dict, arrays: dict) -> dict:
    defaults = read_generation_defaults(checkpoint)
    vocab = SpeechVocab.from_folder(checkpoint / "tts")
    spec = token2wav.spec
    c = model.config

    def lm(cfg) -> dict:
        return {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "layers": cfg.num_hidden_layers,
                "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "max_context": max_context,
                "tied_embeddings": cfg.tie_word_embeddings}

    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "source": {"checkpoint": str(checkpoint.resolve()), "decoder": str(decoder.resolve())},
        "versions": {"opens2s_edge": opens2s_edge.__version__, "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "opset": max(g["opset"] for g in graphs.values())},
        "interleave_strategy": c.interleave_strategy,
        "generation": {"text_eos_ids": list(defaults.text_eos_ids), "max_text_tokens": defaults.max_text_tokens,
                       "speech_eos_id": defaults.speech_eos_id, "max_speech_tokens": defaults.max_speech_tokens},
        "speech_tokens": {"offset": vocab.offset, "count": vocab.count, "eos_id": vocab.eos_id},
        "prompt": {"audio_placeholder_id": AUDIO_PLACEHOLDER_ID, "system_prompt": DEFAULT_SYSTEM_PROMPT},
        "audio": {**frontend.FRONTEND, "max_seconds": max_audio_seconds},
        "llm": lm(c.llm),
        "tts": {**lm(c.tts), "speaker_dim": model.tts_lm_model.spk2tts.in_features},
        "token2wav": {"spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__}},
        "graphs": graphs,
        "arrays": arrays,
    }
