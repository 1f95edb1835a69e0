"""Read and write the OpenS2S Hugging Face folder, exactly as the released checkpoint lays it out.

```
config.json  generation_config.json  model.safetensors | model-0000i-of-0000n.safetensors + index
tokenizer.json  tokenizer_config.json  special_tokens_map.json
tts/   tokenizer files + generation_config.json (speech EOS, speech budget)
audio/ preprocessor_config.json (Whisper feature extractor)
```
Loading is strict: an error names every missing, unexpected and mis-shaped key. Writing goes to a
temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from opens2s_edge.runtime.audio import Frontend, FrontendError
from opens2s_edge.runtime.decoding import GenerationDefaults
from opens2s_edge.runtime.files import atomic_dir, read_json
from opens2s_edge.runtime.prompt import TokenizerError, eos_ids

from .opens2s import OpenS2S, OpenS2SConfig
from .weights import key_mismatches

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ASSET_FILES = (
    *TOKENIZER_FILES,
    "generation_config.json",
    *(f"tts/{name}" for name in (*TOKENIZER_FILES, "generation_config.json")),
    "audio/preprocessor_config.json",
)
# The slow-tokenizer files save_pretrained writes beside tokenizer.json: copied when present, never required.
OPTIONAL_ASSET_FILES = tuple(f"{d}{n}" for d in ("", "tts/") for n in ("vocab.json", "merges.txt", "added_tokens.json"))
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not match the model it describes."""


def _read_json(path: Path) -> dict:
    return read_json(path, CheckpointError, "checkpoint file")


def read_config(folder: Path) -> OpenS2SConfig:
    path = folder / "config.json"
    try:
        return OpenS2SConfig.from_dict(_read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {exc}") from exc


def read_generation_defaults(folder: Path) -> GenerationDefaults:
    """EOS ids (an int or a list in either file) and budgets; a missing budget is the reference's 512."""
    llm_path, tts_path = folder / "generation_config.json", folder / "tts" / "generation_config.json"
    llm, tts = _read_json(llm_path), _read_json(tts_path)
    for path, config in ((llm_path, llm), (tts_path, tts)):
        if "eos_token_id" not in config:
            raise CheckpointError(f"{path} must set eos_token_id")
    try:
        text_eos, speech_eos = eos_ids(llm["eos_token_id"], str(llm_path)), eos_ids(tts["eos_token_id"], str(tts_path))
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc
    return GenerationDefaults(text_eos, int(llm.get("max_new_tokens") or 512), speech_eos,
                              int(tts.get("max_new_tokens") or 512))


def read_frontend(folder: Path, config: OpenS2SConfig | None = None) -> Frontend:
    """The log-mel settings of `audio/preprocessor_config.json`, checked against the audio encoder's input."""
    try:
        frontend = Frontend.from_file(Path(folder) / "audio" / "preprocessor_config.json")
    except FrontendError as exc:
        raise CheckpointError(str(exc)) from exc
    config = config or read_config(Path(folder))
    audio = config.audio
    problems = []
    if frontend.n_mels != audio.num_mel_bins:
        problems.append(f"feature_size {frontend.n_mels} != audio_encoder_config.num_mel_bins {audio.num_mel_bins}")
    if frontend.window_frames != audio.window_frames:
        problems.append(f"a {frontend.window_seconds} s window is {frontend.window_frames} frames; the encoder takes "
                        f"2 x max_source_positions = {audio.window_frames}")
    if problems:
        raise CheckpointError(f"{folder}/audio/preprocessor_config.json does not fit config.json: "
                              + "; ".join(problems))
    return frontend


def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return [folder / f for f in files]
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}")
    return [single]


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    return state


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key (an absent lm_head is tied)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = key_mismatches(expected, state, frozenset(LM_HEAD_KEYS))
    if problems:
        raise CheckpointError(f"weights in {where} do not match config.json: " + " | ".join(problems))


LM_HEAD_KEYS = ("llm_model.lm_head.weight", "tts_lm_model.lm_head.weight")


def _tied_keys(model: torch.nn.Module) -> set[str]:
    """lm_head keys that share storage with an embedding: save_pretrained leaves them out."""
    out = set()
    for prefix, lm in (("llm_model.", getattr(model, "llm_model", None)),
                       ("tts_lm_model.", getattr(model, "tts_lm_model", None))):
        if lm is not None and lm.config.tie_word_embeddings:
            out.add(prefix + "lm_head.weight")
    return out


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> OpenS2S:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    config = read_config(folder)
    state = read_state_dict(folder)
    with torch.device("meta"):
        model = OpenS2S(config)
    check_state_dict(model, state, str(folder))
    model.load_state_dict(state, strict=False, assign=True)
    tie_missing_heads(model, set(state), folder)
    return model.to(device=device, dtype=dtype).eval()


def tie_missing_heads(model: OpenS2S, present: set[str], folder: Path) -> None:
    """Tie each LM's head to its input embeddings when the config says so or the file has no head."""
    for prefix, lm in (("llm_model.", model.llm_model), ("tts_lm_model.", model.tts_lm_model)):
        if prefix + "lm_head.weight" not in present:
            if not lm.config.tie_word_embeddings:
                # save_pretrained drops a tied lm_head and the reference then re-initialises it at random;
                # tying it back is the only reading that keeps the trained weights.
                log.warning("%s: %slm_head.weight is missing though the config is untied: tying it to the "
                            "input embeddings", folder, prefix)
            lm.lm_head.weight = lm.model.embed_tokens.weight


def save_checkpoint(model: OpenS2S, out_dir: str | Path, assets_from: str | Path | None = None,
                    assets: dict[str, bytes] | None = None, max_shard_bytes: int = 5 << 30,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as an OpenS2S folder, its weights stored in `dtype` (default: as the model holds them).
    Tokenizer/generation/feature files come from `assets` (relative path -> bytes) or are copied from the
    checkpoint folder `assets_from`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists (pass overwrite/--force to replace it)")
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.raw, indent=2, sort_keys=True) + "\n")
        _write_weights(model, tmp, max_shard_bytes, dtype)
        files = dict(assets or {})
        if assets_from is not None:
            for rel in OPTIONAL_ASSET_FILES:
                src = Path(assets_from) / rel
                if rel not in files and src.is_file():
                    files[rel] = src.read_bytes()
            for rel in ASSET_FILES:
                src = Path(assets_from) / rel
                if rel not in files:
                    if not src.is_file():
                        raise CheckpointError(f"cannot copy {rel}: {src} is missing")
                    files[rel] = src.read_bytes()
        absent = [rel for rel in ASSET_FILES if rel not in files]
        if absent:
            raise CheckpointError(f"checkpoint assets missing: {', '.join(absent)}")
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
    return out_dir


def _write_weights(model: OpenS2S, folder: Path, max_shard_bytes: int, dtype: torch.dtype | None) -> None:
    tied = _tied_keys(model)
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        if k in tied:
            continue
        # safetensors refuses tensors that share memory (an lm_head tied at load although the config is not).
        shared = v.data_ptr() in seen
        seen.add(v.data_ptr())
        state[k] = v.detach().to(dtype or v.dtype, copy=shared).contiguous().cpu()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata=metadata)
        return
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
