"""GLM-4-Voice's speech tokenizer in PyTorch: the WhisperVQ encoder up to its codebook, loaded from the released folder.

The released tokenizer (THUDM/glm-4-voice-tokenizer) is a `WhisperVQForConditionalGeneration` written by
`save_pretrained`: the Whisper decoder's weights are in `model.safetensors` too, but tokens come from the encoder
alone, and only from its layers below `quantize_position` (the final `layer_norm` and the layers above never run).
So this module holds, under the released names without the `model.encoder.` prefix:

```
conv1, conv2          Conv1d k3 (stride 1, 2); causal (2 frames of left padding) when encoder_causal_convolution
embed_positions       (max_source_positions, d) added after conv2 (50 Hz)
layers.0..q-1         pre-norm Whisper layers; attention mask per config (below)
pooling               avg or max over pooling_kernel_size frames after layer pooling_position (right-padded with 0)
codebook              (quantize_vocab_size, d): nearest code (squared distance) after layer quantize_position
embed_positions2      loaded because the reference's strict load needs it; tokens do not depend on it
```
Attention mask: `encoder_causal_attention` (or `quantize_causal_encoder`): plain causal, padding not masked (the
reference hands SDPA `is_causal` and no mask); else with `quantize_causal_block_size` B: a frame sees every valid
frame of its own B-frame block and before (B // kernel after pooling); else every valid frame.

The procedure around it (30 s segments, log-mel, padding, valid frames, batching) is `runtime/speech_tokenizer.py`,
shared with the torch-free ONNX path. `write_random_tokenizer` writes an `init`-style random tokenizer in the
released layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from opens2s_edge.runtime import speech_tokenizer as procedure
from opens2s_edge.runtime.audio import Frontend
from opens2s_edge.runtime.files import atomic_dir
from opens2s_edge.runtime.speech_tokenizer import (
    BATCH_SEGMENTS,
    DEFAULT_CHUNK,
    SpeechTokenizerError,
    TokenizerStructure,
    read_tokenizer_configs,
    tokenizer_frontend,
)

from .audio_encoder import EncoderLayer
from .weights import key_mismatches

PREFIX = "model.encoder."
NAME = "glm4voice-tokenizer"


# -- the model ---------------------------------------------------------------------------------------------------

class CausalConv1d(nn.Conv1d):
    """A Conv1d that sees only the current and earlier frames: (kernel - 1) frames of zeros on the left."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


def attention_allowed(valid_length: Tensor, frames: int | Tensor, block: int | None, causal: bool) -> Tensor:
    """(B or 1, 1, T, T) bool: which key each query may attend to (see the module docstring)."""
    pos = torch.arange(frames, device=valid_length.device)
    if causal:
        return (pos[None, :] <= pos[:, None])[None, None]
    key_valid = (pos[None, :] < valid_length[:, None])[:, None, None, :]
    if block is None:
        return key_valid
    blocks = torch.div(pos, block, rounding_mode="floor")
    # causal | block_diag == "the key's block is not after the query's block"
    return (blocks[None, :] <= blocks[:, None])[None, None] & key_valid


class WhisperVQEncoder(nn.Module):
    """input_features (B, n_mels, T), feature_length (B,) valid mel frames -> tokens (B, T / (2 k)),
    token_length (B,). T must be a multiple of 2 k (the procedure pads to it)."""

    def __init__(self, s: TokenizerStructure):
        super().__init__()
        self.structure = s
        conv = CausalConv1d if s.causal_convolution else nn.Conv1d
        pad = {} if s.causal_convolution else {"padding": 1}
        self.conv1 = conv(s.n_mels, s.d_model, kernel_size=3, **pad)
        self.conv2 = conv(s.d_model, s.d_model, kernel_size=3, stride=2, **pad)
        self.embed_positions = nn.Embedding(s.max_source_positions, s.d_model)
        self.layers = nn.ModuleList(EncoderLayer(s.d_model, s.heads, s.ffn_dim) for _ in range(s.quantize_position))
        self.codebook = nn.Embedding(s.vocab_size, s.d_model)
        self.embed_positions2 = nn.Embedding(math.ceil(s.max_source_positions / s.kernel), s.d_model)
        if s.ema:
            # Present in the file when the config names an EMA decay (the reference registers them); unused here.
            self.register_buffer("ema_count", torch.ones(s.vocab_size))
            self.register_buffer("ema_weight", torch.zeros(s.vocab_size, s.d_model))

    def quantize_input(self, input_features: Tensor, feature_length: Tensor,
                       keep: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The states the codebook is searched with (B, T / (2 k), d) and the valid token count per row.
        `keep`, when given, receives every layer's output (before pooling) in order."""
        s = self.structure
        x = F.gelu(self.conv2(F.gelu(self.conv1(input_features)))).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        # Valid frames after each subsampling: the mask taken every 2nd frame, then every kernel-th.
        length = torch.div(feature_length + 1, 2, rounding_mode="floor")
        allowed = attention_allowed(length, x.shape[1], s.block_size, s.causal_attention)
        for i, layer in enumerate(self.layers):
            x = layer(x, allowed)
            if keep is not None:
                keep.append(x)
            if s.pooling_kernel is not None and i + 1 == s.pooling_position:
                x = self.pool(x)
                length = torch.div(length + s.kernel - 1, s.kernel, rounding_mode="floor")
                block = None if s.block_size is None else s.block_size // s.kernel
                allowed = attention_allowed(length, x.shape[1], block, s.causal_attention)
        return x, length

    def pool(self, x: Tensor) -> Tensor:
        k = self.structure.kernel
        b, t, d = x.shape
        x = F.pad(x, (0, 0, 0, (-t) % k))  # zeros on the right, as the reference pads (for max too)
        x = x.reshape(b, -1, k, d)
        return x.mean(dim=2) if self.structure.pooling_type == "avg" else x.amax(dim=2)

    def distances(self, states: Tensor) -> Tensor:
        """Squared distance of every state to every code (B, T, V), in the reference's order of operations."""
        code = self.codebook.weight
        code_sqr = (code * code).sum(dim=1)
        state_sqr = (states * states).sum(dim=-1, keepdim=True)
        return (code_sqr + state_sqr) - 2.0 * torch.matmul(states, code.t())

    def forward(self, input_features: Tensor, feature_length: Tensor) -> tuple[Tensor, Tensor]:
        states, length = self.quantize_input(input_features, feature_length)
        return torch.argmin(self.distances(states), dim=-1), length


# -- loading the released folder -----------------------------------------------------------------------------------

def expected_shapes(structure: TokenizerStructure) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = WhisperVQEncoder(structure)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _weight_files(folder: Path) -> list[Path]:
    # The reference globs model*.safetensors (one file, or the shards of save_pretrained's index).
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise SpeechTokenizerError(f"speech tokenizer folder {folder} has no model*.safetensors")
    return files


def _used(key: str, structure: TokenizerStructure) -> bool:
    """Whether the reference's loader takes `model.encoder.<key>`: not the final layer_norm, no layer >= q."""
    if key.startswith("layer_norm"):
        return False
    if key.startswith("layers."):
        index = key.split(".")[1]
        return index.isdigit() and int(index) < structure.quantize_position
    return True


def read_encoder_state(folder: Path, structure: TokenizerStructure) -> dict[str, Tensor]:
    """The `model.encoder.*` tensors below `quantize_position`, as float32, checked strictly against the
    structure: one error names every missing, unexpected and mis-shaped key."""
    state: dict[str, Tensor] = {}
    handles = []
    for path in _weight_files(folder):
        try:
            handles.append((path, safe_open(str(path), framework="pt")))
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
            raise SpeechTokenizerError(f"{path} is not a readable safetensors file: {exc}") from exc
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, tuple[Path, object]] = {}
    for path, handle in handles:
        for key in handle.keys():
            if key.startswith(PREFIX) and _used(key[len(PREFIX):], structure):
                shapes[key[len(PREFIX):]] = tuple(handle.get_slice(key).get_shape())
                where[key[len(PREFIX):]] = (path, handle)
    # Shapes first (no tensor read), so a wrong file fails before any weight is loaded.
    problems = key_mismatches(expected_shapes(structure), {k: torch.empty(s, device="meta")
                                                           for k, s in shapes.items()})
    if problems:
        raise SpeechTokenizerError(f"speech tokenizer {folder} does not match its config.json "
                                   f"(keys under {PREFIX!r}): " + "; ".join(problems))
    for key, (_, handle) in where.items():
        tensor = handle.get_tensor(PREFIX + key)
        if not tensor.is_floating_point():
            raise SpeechTokenizerError(f"{folder}: {PREFIX}{key} is {tensor.dtype}, expected a float tensor")
        state[key] = tensor.float()
    return state


def load_encoder(folder: str | Path) -> tuple[WhisperVQEncoder, Frontend]:
    """The encoder of a released tokenizer folder (fp32, eval) and its feature settings."""
    folder = Path(folder)
    structure, features = read_tokenizer_configs(folder)
    state = read_encoder_state(folder, structure)
    with torch.device("meta"):
        model = WhisperVQEncoder(structure)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), features


# -- the tokenizer ---------------------------------------------------------------------------------------------

class GLM4VoiceTokenizer:
    """GLM-4-Voice's speech tokenizer on PyTorch (CPU or CUDA), the reference procedure around `WhisperVQEncoder`.

    Implements the data pipeline's `SpeechTokenizer` protocol (`codebook_size`, `rate_hz`, `encode`).
    """

    name = NAME

    def __init__(self, folder: str | Path, device: str = "cpu"):
        self.folder = Path(folder)
        self.model, self.features = load_encoder(self.folder)
        self.model.to(device)
        self.device = torch.device(device)
        self.structure = self.model.structure
        self.codebook_size = self.structure.vocab_size
        self.rate_hz = self.features.sample_rate / self.structure.stride_samples(self.features.hop)

    @property
    def source(self) -> str:
        return str(self.folder)

    @torch.inference_mode()
    def run_batch(self, features: np.ndarray, frame_lengths: np.ndarray) -> np.ndarray:
        tokens, _ = self.model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device),
                               torch.from_numpy(np.asarray(frame_lengths, dtype=np.int64)).to(self.device))
        return tokens.cpu().numpy()

    @torch.inference_mode()
    def quantize_input(self, features: np.ndarray, frame_lengths: np.ndarray,
                       keep: list[Tensor] | None = None) -> np.ndarray:
        states, _ = self.model.quantize_input(
            torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device),
            torch.from_numpy(np.asarray(frame_lengths, dtype=np.int64)).to(self.device), keep)
        return states.cpu().numpy()

    def tokenize(self, inputs: Iterable[np.ndarray], batch_size: int = BATCH_SEGMENTS,
                 chunk: int = DEFAULT_CHUNK) -> list[list[int]]:
        """Tokens per 16 kHz input (the reference's `extract_speech_token` on the same list)."""
        return procedure.tokenize_all(self.run_batch, inputs, self.structure, self.features, batch_size, chunk)

    def encode(self, wav: np.ndarray, sample_rate: int) -> list[int]:
        item = procedure.audio_input(wav, sample_rate)
        return self.tokenize([item.wav])[0]


def open_speech_tokenizer(folder: str | Path, device: str = "cpu"):
    """A released tokenizer folder (config.json + safetensors: PyTorch) or an exported tokenizer bundle
    (manifest.json: onnxruntime, no torch) as a `SpeechTokenizer`."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return procedure.OnnxSpeechTokenizer(folder)
    if not folder.is_dir():
        raise SpeechTokenizerError(f"speech tokenizer folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise SpeechTokenizerError(f"{folder} is neither a GLM-4-Voice tokenizer folder (config.json, "
                                   "model.safetensors, preprocessor_config.json) nor an exported tokenizer bundle "
                                   "(manifest.json)")
    return GLM4VoiceTokenizer(folder, device)


# -- writing random tokenizers in the released layout ----------------------------------------------------------------

def whisper_vq_config(*, d_model: int = 64, encoder_layers: int = 4, heads: int = 4, ffn_dim: int = 128,
                      n_mels: int = 128, pooling_kernel: int | None = 4, pooling_type: str = "avg",
                      pooling_position: int = 2, quantize_position: int = 2, vocab_size: int = 16384,
                      block_size: int | None = 200, causal_convolution: bool = True, causal_attention: bool = False,
                      decoder_layers: int = 1, max_source_positions: int = 1500) -> dict:
    """A `WhisperVQForConditionalGeneration` config.json with every field the released one has."""
    return {
        "activation_dropout": 0.0, "activation_function": "gelu", "apply_spec_augment": False,
        "architectures": ["WhisperVQForConditionalGeneration"], "attention_dropout": 0.0,
        "begin_suppress_tokens": None, "bos_token_id": 998, "classifier_proj_size": 256, "d_model": d_model,
        "decoder_attention_heads": heads, "decoder_ffn_dim": ffn_dim, "decoder_layerdrop": 0.0,
        "decoder_layers": decoder_layers, "decoder_start_token_id": 998, "dropout": 0.0,
        "encoder_attention_heads": heads, "encoder_causal_attention": causal_attention,
        "encoder_causal_convolution": causal_convolution, "encoder_ffn_dim": ffn_dim, "encoder_layerdrop": 0.0,
        "encoder_layers": encoder_layers, "eos_token_id": 999, "init_std": 0.02, "is_encoder_decoder": True,
        "mask_feature_length": 10, "mask_feature_min_masks": 0, "mask_feature_prob": 0.0, "mask_time_length": 10,
        "mask_time_min_masks": 2, "mask_time_prob": 0.05, "max_source_positions": max_source_positions,
        "max_target_positions": 64, "median_filter_width": 7, "model_type": "whisper",
        "num_hidden_layers": encoder_layers, "num_mel_bins": n_mels, "pad_token_id": 999,
        "pooling_kernel_size": pooling_kernel, "pooling_position": pooling_position, "pooling_type": pooling_type,
        "quantize_causal_block_size": block_size, "quantize_causal_encoder": False,
        "quantize_commit_coefficient": 0.25, "quantize_ema_decay": None, "quantize_encoder_only": False,
        "quantize_loss_scale": 1.0, "quantize_position": quantize_position, "quantize_restart_interval": None,
        "quantize_vocab_size": vocab_size, "scale_embedding": False, "skip_language_detection": False,
        "torch_dtype": "float32", "transformers_version": "4.51.3", "use_cache": True,
        "use_weighted_layer_sum": False, "vocab_size": 1000,
    }


PREPROCESSOR_CONFIG = {
    "chunk_length": 30, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
    "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right",
    "padding_value": 0.0, "return_attention_mask": False, "sampling_rate": 16000,
}
GENERATION_CONFIG = {"_from_model_config": True, "begin_suppress_tokens": [], "bos_token_id": 998,
                     "decoder_start_token_id": 998, "eos_token_id": 999, "pad_token_id": 999, "suppress_tokens": [],
                     "transformers_version": "4.51.3"}


def _sinusoids(length: int, channels: int) -> Tensor:
    """Whisper's positional table (what the released encoder's embed_positions starts from)."""
    inv = torch.exp(-math.log(10000.0) / (channels // 2 - 1) * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


def _probe_audio(seconds: float = 6.0, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like probe (gliding harmonics under a syllable envelope, plus noise) whose
    encoder states set the codebook's spread."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * procedure.SAMPLE_RATE)) / procedure.SAMPLE_RATE
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / procedure.SAMPLE_RATE
    voiced = sum(np.sin(h * phase) / h for h in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
    return (0.1 * envelope * voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_random_tokenizer(out_dir: str | Path, *, seed: int = 0, decoder_layers: int = 1,
                           **structure: object) -> Path:
    """A deterministic random-init speech tokenizer in the released folder layout: config.json, model.safetensors
    (every encoder layer, the final layer_norm and the Whisper decoder, as `save_pretrained` writes them),
    preprocessor_config.json, generation_config.json. `structure` overrides `whisper_vq_config`'s sizes and flags.

    The codebook is drawn around the spread of this encoder's own states on a speech-like probe, so tokens are
    diverse (random codes far from every state would make nearly all tokens one code).
    """
    out_dir = Path(out_dir)
    config = whisper_vq_config(decoder_layers=decoder_layers, **structure)  # type: ignore[arg-type]
    s = TokenizerStructure.from_config(config, "write_random_tokenizer")
    full = TokenizerStructure(**{**s.to_dict(), "quantize_position": s.encoder_layers})
    d = s.d_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = WhisperVQEncoder(full)
        with torch.no_grad():
            for m in encoder.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.8, 1.2)
                    m.bias.normal_(0.0, 0.05)
            encoder.embed_positions.weight.copy_(_sinusoids(s.max_source_positions, d))
            rows = encoder.embed_positions2.num_embeddings
            encoder.embed_positions2.weight.copy_(encoder.embed_positions.weight[:rows])
        trimmed = WhisperVQEncoder(s)
        trimmed.load_state_dict({k: v for k, v in encoder.state_dict().items() if k in trimmed.state_dict()})
        features = tokenizer_frontend(PREPROCESSOR_CONFIG, s.n_mels)
        batch = procedure.segment_batch([_probe_audio(seed=seed)], [0], features,
                                        procedure.padded_length([6 * procedure.SAMPLE_RATE], s, features))
        with torch.no_grad():
            states, length = trimmed.quantize_input(torch.from_numpy(batch.features),
                                                    torch.from_numpy(batch.frame_lengths))
            states = states[0, : int(length[0])]
            mean, std = states.mean(0), states.std(0)
            codes = mean + std * torch.randn(s.vocab_size, d)
            encoder.codebook.weight.copy_(codes)
        tensors = {PREFIX + k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}
        tensors[PREFIX + "layer_norm.weight"] = torch.ones(d) + 0.05 * torch.randn(d)
        tensors[PREFIX + "layer_norm.bias"] = 0.05 * torch.randn(d)
        tensors.update(_random_decoder(config, d))
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, content in (("config.json", config), ("preprocessor_config.json", PREPROCESSOR_CONFIG),
                              ("generation_config.json", GENERATION_CONFIG)):
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _random_decoder(config: dict, d: int) -> dict[str, Tensor]:
    """The Whisper decoder's tensors as the released file carries them (never loaded by the tokenizer)."""
    ffn, prefix = config["decoder_ffn_dim"], "model.decoder."
    out = {prefix + "embed_tokens.weight": 0.02 * torch.randn(config["vocab_size"], d),
           prefix + "embed_positions.weight": 0.02 * torch.randn(config["max_target_positions"], d),
           prefix + "layer_norm.weight": torch.ones(d), prefix + "layer_norm.bias": torch.zeros(d)}
    for i in range(config["decoder_layers"]):
        p = f"{prefix}layers.{i}."
        for attn in ("self_attn", "encoder_attn"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[f"{p}{attn}.{proj}.weight"] = 0.02 * torch.randn(d, d)
                if proj != "k_proj":
                    out[f"{p}{attn}.{proj}.bias"] = torch.zeros(d)
            out[f"{p}{attn}_layer_norm.weight"], out[f"{p}{attn}_layer_norm.bias"] = torch.ones(d), torch.zeros(d)
        out[f"{p}fc1.weight"], out[f"{p}fc1.bias"] = 0.02 * torch.randn(ffn, d), torch.zeros(ffn)
        out[f"{p}fc2.weight"], out[f"{p}fc2.bias"] = 0.02 * torch.randn(d, ffn), torch.zeros(d)
        out[f"{p}final_layer_norm.weight"], out[f"{p}final_layer_norm.bias"] = torch.ones(d), torch.zeros(d)
    return out
