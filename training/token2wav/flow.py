"""The flow's token side: embedding, block-causal conformer encoder, projection, length regulator.

Parameter names follow the released `flow.pt` (cosyvoice MaskedDiffWithXvec); `Flow.decoder.estimator` holds the
CFM estimator so that one state dict loads strictly. `Flow.forward` is the encoder path only (tokens -> mu): it is
one of the three graphs that export, the estimator and HiFT being the other two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cfm import ConditionalCFM
from .config import EncoderConfig, FlowConfig, LengthRegulatorConfig


def block_mask(n: int, block_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(n, n) bool, True where query i may attend key j: every key up to the end of i's block.

    This is the reference's `create_grid_mask(fill_triangle=True)` (lower triangle OR own block) without its
    Python loop: the lower triangle is contained in "j before the end of i's block".
    """
    idx = torch.arange(n, device=device)
    block_end = torch.div(idx, block_size, rounding_mode="floor") * block_size + block_size
    return idx[None, :] < block_end[:, None]


def rel_positions(n: int, d_model: int, device: torch.device | None = None) -> torch.Tensor:
    """ESPnet relative position table (1, 2n-1, d): relative positions n-1 down to -(n-1).

    Computed per length instead of sliced from a 5000-long table; the values are the same float32 operations.
    """
    pos = torch.arange(n - 1, -n, -1, device=device, dtype=torch.float32)
    div = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    # The reference builds the negative half as sin(-p * div); sin is odd, so sign(p) * sin(|p| * div) matches it
    # bit for bit where computing sin(p * div) on a negative argument might not.
    angle = pos.abs()[:, None] * div[None, :]
    sign = torch.where(pos < 0, -1.0, 1.0)[:, None]
    pe = torch.stack([sign * torch.sin(angle), torch.cos(angle)], dim=-1).reshape(2 * n - 1, d_model)
    return pe[None]


class BlockRelPositionAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (pos_bias_u/v) and a block mask."""

    def __init__(self, n_head: int, n_feat: int):
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.linear_q(x).view(b, n, self.h, self.d_k)
        k = self.linear_k(x).view(b, n, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, n, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)  # (1, h, 2n-1, d_k)
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        bd_full = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (b, h, n, 2n-1)
        # Relative shift as a gather: key j seen from query i sits at column (n-1) - i + j of the table.
        i = torch.arange(n, device=x.device)
        index = (n - 1 - i[:, None] + i[None, :]).expand(b, self.h, n, n)
        bd = torch.gather(bd_full, 3, index)
        scores = (ac + bd) / math.sqrt(self.d_k)
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, self.h * self.d_k)
        return self.linear_out(out)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-LN attention + feed-forward (the released config has no macaron FFN and no conv module)."""

    def __init__(self, size: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = BlockRelPositionAttention(heads, size)
        self.feed_forward = PositionwiseFeedForward(size, ffn)
        self.norm_ff = nn.LayerNorm(size, eps=1e-5)
        self.norm_mha = nn.LayerNorm(size, eps=1e-5)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos_emb, mask)
        return x + self.feed_forward(self.norm_ff(x))


class LinearInput(nn.Module):
    def __init__(self, idim: int, odim: int):
        super().__init__()
        # Index 2 of the reference Sequential is a Dropout: no parameters, so indices 0 and 1 are all we need.
        self.out = nn.ModuleList([nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5)])
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out[1](self.out[0](x)) * self.xscale


class BlockConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.block_size = cfg.block_size
        self.d_model = cfg.output_size
        self.embed = LinearInput(cfg.input_size, cfg.output_size)
        self.encoders = nn.ModuleList(
            ConformerLayer(cfg.output_size, cfg.attention_heads, cfg.linear_units) for _ in range(cfg.num_blocks)
        )
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, input_size), all N valid -> (B, N, output_size)."""
        n = x.shape[1]
        x = self.embed(x)
        pos_emb = rel_positions(n, self.d_model, x.device).to(x.dtype)
        mask = block_mask(n, self.block_size, x.device)
        for layer in self.encoders:
            x = layer(x, pos_emb, mask)
        return self.after_norm(x)


class InterpolateRegulator(nn.Module):
    """Nearest-neighbour resampling to the mel frame count, then (Conv1d k3, GroupNorm, Mish) x R and a 1x1 conv."""

    def __init__(self, cfg: LengthRegulatorConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in cfg.sampling_ratios:
            layers += [
                nn.Conv1d(cfg.channels, cfg.channels, 3, 1, 1),
                nn.GroupNorm(cfg.groups, cfg.channels),
                nn.Mish(),
            ]
        layers.append(nn.Conv1d(cfg.channels, cfg.out_channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
        """h (B, C, N), n_frames a 0-dim int64 tensor -> (B, C_out, n_frames).

        Nearest interpolation as torch's kernel computes it (source index floor(i * (N / M)) in float32), written
        as a gather so that the frame count stays a tensor: the exported graph takes any N.
        """
        n_in = torch.ones_like(h[0, 0], dtype=torch.float32).sum()
        scale = n_in / n_frames.to(torch.float32)
        src = torch.floor(torch.arange(n_frames, device=h.device).to(torch.float32) * scale).to(torch.int64)
        src = torch.minimum(src, n_in.to(torch.int64) - 1)
        return self.model(h.index_select(2, src))


class Flow(nn.Module):
    """MaskedDiffWithXvec: its forward is the token encoder; `decoder.estimator` is the CFM velocity network."""

    def __init__(self, cfg: FlowConfig, sample_rate: int, hop: int):
        super().__init__()
        self.cfg = cfg
        self.sample_rate, self.hop = sample_rate, hop
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = BlockConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.length_regulator = InterpolateRegulator(cfg.length_regulator)
        self.decoder = ConditionalCFM(cfg.cfm, cfg.estimator)

    def n_frames(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mel frames for (B, N) tokens as the reference computes them: int(N / token_rate * sample_rate / hop)
        in float32 (runtime DecoderSpec.frames is the same arithmetic), a 0-dim int64 tensor."""
        n = torch.ones_like(tokens[0], dtype=torch.float32).sum()
        return (n / self.cfg.input_frame_rate * self.sample_rate / self.hop).to(torch.int64)

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N) -> the block-causal encoder's output (B, N, D) and its projection (B, N, 80).
        Negative ids are clamped to 0 as in the reference (padding ids)."""
        # max rather than clamp: TensorRT's Clip takes floats only.
        x = self.input_embedding(torch.maximum(tokens, torch.zeros_like(tokens)))
        h = self.encoder(x)
        return h, self.encoder_proj(h)

    def forward(self, tokens: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N) int64, embedding (B, spk_embed_dim) x-vector -> mu (B, 80, M), spks (B, 80)."""
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        _, h = self.encode_tokens(tokens)
        mu = self.length_regulator(h.transpose(1, 2), self.n_frames(tokens))
        return mu, spks
