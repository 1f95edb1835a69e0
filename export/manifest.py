"""What the bundle's manifest.json says (the schema is export/README.md's "Manifest"), and the non-graph files beside
the graphs: the embedding tables and the tokenizer files. Every file is hashed last, once everything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

import opens2s_edge
from opens2s_edge.runtime.audio import Frontend
from opens2s_edge.runtime.bundle import FORMAT_VERSION, MANIFEST, sha256_file
from opens2s_edge.runtime.manifest import Manifest, ManifestError
from opens2s_edge.runtime.prompt import AUDIO_PLACEHOLDER_ID, DEFAULT_SYSTEM_PROMPT, SpeechVocab
from opens2s_edge.training.checkpoint import TOKENIZER_FILES, read_generation_defaults

from .errors import ExportError
from .weights import CheckpointWeights

EMBEDDINGS = (("llm_embed", "llm_model."), ("tts_embed", "tts_lm_model."))


def embedding_table(weights: CheckpointWeights, key: str, dtype: str) -> tuple[np.ndarray, dict]:
    table = weights.get(key)
    if dtype == "bf16":
        # numpy has no bfloat16: the bit patterns are stored as uint16 (view them as bfloat16 to use them).
        bits = table.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        return bits, {"dtype": "bfloat16", "storage": "uint16"}
    array = table.to(torch.float16 if dtype == "fp16" else torch.float32).numpy()
    return array, {"dtype": array.dtype.name}


def write_arrays(weights: CheckpointWeights, dst: Path, dtype: str) -> dict[str, dict]:
    """The embedding tables as .npy files (the runtime memory-maps them); their manifest entries."""
    arrays = {}
    for name, prefix in EMBEDDINGS:
        table, info = embedding_table(weights, prefix + "model.embed_tokens.weight", dtype)
        np.save(dst / f"{name}.npy", table)
        arrays[name] = {"file": f"{name}.npy", **info, "shape": list(table.shape)}
    return arrays


def copy_tokenizers(checkpoint: Path, dst: Path) -> None:
    for rel in (*TOKENIZER_FILES, *(f"tts/{n}" for n in TOKENIZER_FILES)):
        src = checkpoint / rel
        if not src.is_file():
            raise ExportError(f"checkpoint {checkpoint} is missing {rel}")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst / rel)


def build_manifest(model, token2wav, checkpoint: Path, decoder: Path, dtype: str, form: str, max_context: int,
                   audio_frontend: Frontend, max_audio_seconds: int, graphs: dict, arrays: dict,
                   weights: dict | None = None, flow_steps: int | None = None) -> dict[str, Any]:
    """The manifest without its `files` section. `weights`: the weight-only quantization record (None: float);
    `flow_steps`: the Euler steps token2wav takes (None: the decoder's own)."""
    defaults = read_generation_defaults(checkpoint)
    vocab = SpeechVocab.from_folder(checkpoint / "tts")
    spec = token2wav.spec
    c = model.config

    def lm(cfg) -> dict:
        return {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "layers": cfg.num_hidden_layers,
                "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "max_context": max_context,
                "tied_embeddings": cfg.tie_word_embeddings}

    token2wav_spec = {k: getattr(spec, k) for k in spec.__dataclass_fields__}
    extra: dict[str, Any] = {}
    if flow_steps is not None:
        # The runtime reads the steps from the spec; the decoder's own number stays on record beside it.
        token2wav_spec["n_timesteps"] = flow_steps
        extra["flow_steps"] = {"steps": flow_steps, "decoder_steps": spec.n_timesteps}
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "form": form,
        "weights": "float" if weights is None else weights["weights"],
        "source": {"checkpoint": str(checkpoint.resolve()), "decoder": str(decoder.resolve())},
        "versions": {"opens2s_edge": opens2s_edge.__version__, "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "opset": max(g["opset"] for g in graphs.values())},
        "interleave_strategy": c.interleave_strategy,
        "generation": {"text_eos_ids": list(defaults.text_eos_ids), "max_text_tokens": defaults.max_text_tokens,
                       "speech_eos_ids": list(defaults.speech_eos_ids),
                       "max_speech_tokens": defaults.max_speech_tokens},
        "speech_tokens": {"offset": vocab.offset, "count": vocab.count, "eos_ids": list(vocab.eos_ids)},
        "prompt": {"audio_placeholder_id": AUDIO_PLACEHOLDER_ID, "system_prompt": DEFAULT_SYSTEM_PROMPT},
        "audio": {**audio_frontend.to_json(), "max_seconds": max_audio_seconds},
        "llm": lm(c.llm),
        "tts": {**lm(c.tts), "speaker_dim": model.tts_lm_model.spk2tts.in_features},
        "token2wav": {"spec": token2wav_spec},
        "graphs": graphs,
        "arrays": arrays,
        **extra,
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    """Hash every file in `folder` into the manifest, then write it (last: a bundle without it is no bundle). It is
    written through the one schema (runtime/manifest.py), so export cannot write what the runtime would refuse."""
    manifest["files"] = {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*")) if p.is_file()}
    try:
        checked = Manifest.from_json(manifest, str(folder / MANIFEST)).to_json()
    except ManifestError as exc:
        raise ExportError(f"the manifest export built does not fit the bundle schema: {exc}") from exc
    (folder / MANIFEST).write_text(json.dumps(checked, indent=2) + "\n")
