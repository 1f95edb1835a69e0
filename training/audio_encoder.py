"""The Qwen2-Audio encoder (Whisper-large-v3-like, 25 Hz out) and the OpenS2S adapter (6.25 Hz out).

Parameter names follow transformers' Qwen2AudioEncoder and the reference's Subsampler, so the released
weights load under `audio_encoder_model.` and `audio_adapter.`.

Shapes are static per 30 s window: the encoder runs every window whole (the reference passes no
attention mask), and the adapter zeroes frames past the valid length before each convolution, which is
exactly what the reference's trim-then-zero-pad does. So one code path serves the PyTorch pipeline
and the fixed-shape exported graph (`OpenS2S.audio_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AudioEncoderConfig:
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    num_mel_bins: int = 128
    max_source_positions: int = 1500

    @property
    def window_frames(self) -> int:
        """Log-mel frames in one window: the reference cuts its input at 2 x max_source_positions (conv2 halves it)."""
        return 2 * self.max_source_positions

    @classmethod
    def from_dict(cls, d: dict) -> AudioEncoderConfig:
        if d.get("model_type", "qwen2_audio_encoder") not in ("qwen2_audio_encoder", "qwen2_audio"):
            raise ValueError(f"audio_encoder_config.model_type {d.get('model_type')!r} is not supported "
                             "(qwen2_audio_encoder only)")
        if d.get("activation_function", "gelu") != "gelu":
            raise ValueError(f"audio encoder activation {d['activation_function']!r} is not supported (gelu)")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's fixed positional table (the released file stores it as `embed_positions.weight`)."""
    log_timescale = torch.log(torch.tensor(max_timescale)) / (channels // 2 - 1)
    inv = torch.exp(-log_timescale * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


class EncoderAttention(nn.Module):
    """Whisper's self-attention (k without bias), shared by the audio encoder and the speech tokenizer."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (d // heads) ** -0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, allowed: Tensor | None = None) -> Tensor:
        """`allowed`: (B or 1, 1, T, T) bool, which key each query may attend to (None: all)."""
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if allowed is None:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # MatMul + Softmax written out (what TensorRT 10.3 parses); a masked score gets float32's lowest value,
            # as the reference's additive mask gives it, so a row never becomes all -inf.
            scores = torch.matmul(q * self.scale, k.transpose(2, 3))
            scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
            y = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """A pre-norm Whisper encoder layer (GELU MLP)."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = EncoderAttention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, allowed: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), allowed)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


def encoder_lengths(mel_frames: Tensor) -> Tensor:
    """Valid 25 Hz frames for a count of valid log-mel frames in one window (conv2 stride 2, pool 2)."""
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class AudioEncoder(nn.Module):
    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        c = self.config = config
        self.conv1 = nn.Conv1d(c.num_mel_bins, c.d_model, 3, padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(c.max_source_positions, c.d_model)
        self.layers = nn.ModuleList(EncoderLayer(c.d_model, c.encoder_attention_heads, c.encoder_ffn_dim)
                                    for _ in range(c.encoder_layers))
        self.layer_norm = nn.LayerNorm(c.d_model)

    def reset_positions(self) -> None:
        with torch.no_grad():
            self.embed_positions.weight.copy_(sinusoids(*self.embed_positions.weight.shape))

    def forward_windows(self, features: Tensor) -> Tensor:
        """(W, n_mels, 3000) windows -> (W, 750, d), each window encoded on its own."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(features)))).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        x = F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2)
        return self.layer_norm(x)

    def forward(self, features: Tensor, mel_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, n_mels, 3000*S) + valid log-mel frames (B,) -> (B, 750*S, d) and valid 25 Hz frames (B,).

        Audio longer than one window is encoded in 30 s windows and concatenated, as the reference does;
        rows past the valid length are padding (the adapter ignores them).
        """
        b, n_mels, frames = features.shape
        window = self.config.window_frames
        if frames % window:
            raise ValueError(f"features must span whole windows ({window} frames), got {frames}")
        windows = frames // window
        per_window = features.view(b, n_mels, windows, window).permute(0, 2, 1, 3)
        encoded = self.forward_windows(per_window.reshape(b * windows, n_mels, window))
        encoded = encoded.view(b, windows * encoded.shape[1], -1)
        # Valid frames per window, then summed: each window is pooled on its own.
        starts = torch.arange(windows, device=features.device) * window
        # min/max rather than clamp: TensorRT's Clip takes floats only.
        in_window = torch.minimum(torch.maximum(mel_lengths[:, None] - starts[None, :], torch.zeros_like(starts)),
                                  torch.full_like(starts, window))
        return encoded, torch.where(in_window > 0, encoder_lengths(in_window), 0).sum(1)


def conv_out_lengths(lengths: Tensor) -> Tensor:
    return (lengths - 1) // 2 + 1


class Conv1dSubsampler(nn.Module):
    """Conv1d (stride 2) + GLU layers; frames past the valid length are zeroed before each conv."""

    def __init__(self, in_dim: int, mid_dim: int, out_dim: int, kernel_sizes: list[int]):
        super().__init__()
        n = len(kernel_sizes)
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(in_dim if i == 0 else mid_dim // 2, mid_dim if i < n - 1 else out_dim * 2, k, stride=2,
                      padding=k // 2)
            for i, k in enumerate(kernel_sizes))

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = x.transpose(1, 2)
        for conv in self.conv_layers:
            valid = torch.arange(x.shape[2], device=x.device)[None, None, :] < lengths[:, None, None]
            x = F.glu(conv(x * valid), dim=1)
            lengths = conv_out_lengths(lengths)
        return x.transpose(1, 2), lengths


class Adapter(nn.Module):
    """Reference `Subsampler`: 2x (Conv1d k5 s2 + GLU) to the LLM width, then FFN + residual + LayerNorm."""

    def __init__(self, in_dim: int, inner_dim: int, out_dim: int, kernel_sizes: list[int]):
        super().__init__()
        self.subsampler = Conv1dSubsampler(in_dim, 2 * in_dim, out_dim, kernel_sizes)
        self.fc1 = nn.Linear(out_dim, inner_dim, bias=False)
        self.fc2 = nn.Linear(inner_dim, out_dim, bias=False)
        self.ln = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, lengths = self.subsampler(x, lengths)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.ln(x), lengths
