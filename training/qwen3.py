"""Qwen3 decoder with a static, preallocated KV cache: one definition for the LLM and the TTS LM.

Parameter names follow Hugging Face's Qwen3ForCausalLM (`model.layers.N...`, `lm_head`), so the
released OpenS2S weights load unchanged under the `llm_model.` and `tts_lm_model.` prefixes. The TTS LM
is the same decoder plus a speaker head (`spk2tts`, `spk_ln`) that makes its first input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The bundle's dtype names (the keys of runtime/dtypes.BUNDLE_DTYPES) as torch dtypes: the one table that export,
# the checkpoint loaders and the CUDA backend share.
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    # Width of the speaker vector fed through spk2tts; 0 for a plain LM (the LLM).
    speaker_dim: int = 0

    @classmethod
    def from_dict(cls, d: dict, speaker_dim: int = 0) -> Qwen3Config:
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
        if d.get("rope_scaling"):
            raise ValueError(f"rope_scaling {d['rope_scaling']!r} is not supported (Qwen3 uses none)")
        return cls(**kwargs, speaker_dim=speaker_dim)


class KVCache(nn.Module):
    """Keys and values for every layer position up to `max_len`, written in place.

    Layout (batch, kv_heads, max_len, head_dim) matches what attention reads, so an update is a
    single indexed copy and a read is a view.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Statistics in fp32 whatever the weights' dtype: fp16 variance overflows on real activations.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gqa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, pos: Tensor) -> Tensor:  # noqa: ARG001
    """q (B, H, T, D) over k, v (B, KV, L, D) under `mask` (T, L) -> (B, H, T, D). `pos` (T,) are the query
    positions (the mask is `pos[:, None] >= arange(L)`); kernels that read only rows <= pos use it.

    GQA as plain attention: the query heads that share a KV head are stacked along the rows, so no copy of the
    cache is made (and the graph exports without SDPA's enable_gqa)."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    q = q.reshape(b, k.shape[1], group * t, d)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(group, 1) if group > 1 else mask)
    return y.reshape(b, h, t, d)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def scatter_rows(cache: Tensor, new: Tensor, pos: Tensor) -> Tensor:
    """`cache` (B, KV, L, D) with rows `pos` replaced by `new` (B, KV, T, D), out of place: how a cache that arrives
    as a tensor (a graph's past) becomes the present. A scatter on the sequence axis (ONNX ScatterElements)."""
    return torch.scatter(cache, 2, pos.view(1, 1, -1, 1).expand_as(new), new)


def split_heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    """(B, T, heads * head_dim) -> (B, T, heads, head_dim)."""
    return x.view(*x.shape[:-1], heads, head_dim)


@dataclass(frozen=True)
class Positions:
    """Where the rows of one forward call sit, computed once per call for every layer."""

    pos: Tensor  # (T,) absolute positions of the rows
    mask: Tensor  # (T, L) bool: key position <= query position, over the L cache rows attention reads
    cos: Tensor  # (T, head_dim) rotary rows at `pos`, in the activations' dtype
    sin: Tensor
    cos_table: Tensor  # (max positions, head_dim) float32: the whole tables, for a fused op that indexes them itself
    sin_table: Tensor


# (q (B, T, H, D) and k (B, T, KV, D) after their norms, v (B, T, KV * D) as projected, past_k, past_v (B, KV, L, D),
# positions) -> (y (B, T, H * D), present_k, present_v): rotary, cache write and attention as one primitive. v and y
# keep their heads flat: a fused op takes and gives them so, and the reshapes would be nodes of their own.
FusedAttention = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Positions], tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Qwen3Ops:
    """The primitives a decoder layer is made of, chosen per model instance (`Qwen3LM.set_ops`). The default is the
    plain PyTorch code above; kernels/ provides a Triton set for the CUDA decode step, and export/lm.py one set per
    ONNX decoder form (each primitive computes the same numbers eagerly and emits its form's ONNX ops when traced).

    - `write_cache(past, new, pos) -> present`: how a cache that arrives as a tensor (`GraphCache` in a traced
      graph) takes its new rows. The PyTorch `KVCache` writes its own buffers in place and does not use it.
    - `fused_attention`: when set, a layer with a cache hands the normalized q/k and v to it instead of running
      rope, the cache write and attention itself (onnxruntime's GroupQueryAttention does all three in one op).
    - `reads_filled_rows`: attention of a single position reads only the cache rows <= its position (from `pos`),
      so a caller need not narrow the cache to a window first.
    - `split_heads`: (B, T, heads * head_dim) -> (B, T, heads, head_dim). Traced plainly it reads the row count off
      the tensor's shape (Shape, Gather, Concat per call); a form may emit a constant-shape Reshape instead.
    """

    rms_norm: Callable[[Tensor, Tensor, float], Tensor] = rms_norm
    rope: Callable[[Tensor, Tensor, Tensor], Tensor] = apply_rope
    attention: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor] = gqa_attention
    swiglu: Callable[[Tensor, Tensor], Tensor] = swiglu
    name: str = "torch"
    reads_filled_rows: bool = False
    write_cache: Callable[[Tensor, Tensor, Tensor], Tensor] = scatter_rows
    fused_attention: FusedAttention | None = None
    split_heads: Callable[[Tensor, int, int], Tensor] = split_heads


TORCH_OPS = Qwen3Ops()


class RMSNorm(nn.Module):
    ops: Qwen3Ops = TORCH_OPS

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    ops: Qwen3Ops = TORCH_OPS

    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)

    def forward(self, x: Tensor, p: Positions, cache: KVCache | None) -> Tensor:
        b, t, _ = x.shape
        split = self.ops.split_heads
        q = self.q_norm(split(self.q_proj(x), self.n_heads, self.head_dim))
        k = self.k_norm(split(self.k_proj(x), self.n_kv, self.head_dim))
        if cache is not None and self.ops.fused_attention is not None:
            y, cache.k, cache.v = self.ops.fused_attention(q, k, self.v_proj(x), cache.k, cache.v, p)
            return self.o_proj(y)
        v = split(self.v_proj(x), self.n_kv, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.ops.rope(q, p.cos, p.sin), self.ops.rope(k, p.cos, p.sin)
        if cache is not None:
            k, v = cache.update(p.pos, k, v)
            end = p.mask.shape[-1]
            # Only the filled prefix is read: a view in PyTorch. The exported fixed-shape graphs read the whole
            # cache under the mask, and there no Slice is emitted: onnxruntime's Slice copies even a full-length one.
            if end < k.shape[2]:
                k, v = k[:, :, :end], v[:, :, :end]
        y = self.ops.attention(q, k, v, p.mask, p.pos)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    ops: Qwen3Ops = TORCH_OPS

    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: Tensor, p: Positions, cache: KVCache | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), p, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, c: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Qwen3LM(nn.Module):
    """Qwen3ForCausalLM-compatible decoder. `forward` takes embeddings so audio or projected LLM states
    can be spliced in; it returns logits and the final-norm hidden state (what OpenS2S feeds the TTS LM).
    """

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if config.speaker_dim:
            self.spk2tts = nn.Linear(config.speaker_dim, config.hidden_size, bias=False)
            self.spk_ln = nn.LayerNorm(config.hidden_size, eps=1e-5)
        self.caches: nn.ModuleList | None = None
        self._rope_len = 0

    @property
    def ops(self) -> Qwen3Ops:
        return self.model.norm.ops

    def set_ops(self, ops: Qwen3Ops) -> None:
        """Run this instance's layers with `ops` (other instances keep theirs)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.ops = ops

    # -- cache ---------------------------------------------------------------------------------------
    def setup_cache(self, max_len: int, batch: int = 1, dtype: torch.dtype | None = None) -> None:
        """Preallocate the KV cache once; later turns reuse it (positions restart at 0)."""
        c = self.config
        if max_len > c.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings {c.max_position_embeddings}")
        param = self.model.embed_tokens.weight
        dtype = dtype or param.dtype
        self.caches = nn.ModuleList(
            KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, dtype, param.device)
            for _ in range(c.num_hidden_layers))
        self._ensure_rope(max_len)

    @property
    def max_len(self) -> int:
        return 0 if self.caches is None else self.caches[0].k.shape[2]

    def _ensure_rope(self, n: int) -> None:
        if n > self._rope_len:
            cos, sin = rope_tables(self.config.head_dim, n, self.config.rope_theta)
            device = self.model.embed_tokens.weight.device
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)
            self._rope_len = n

    # -- forward -------------------------------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        return self.model.embed_tokens(ids)

    def speaker_input(self, speaker: Tensor) -> Tensor:
        """The TTS LM's first input from a speaker vector (zeros give the learned start vector)."""
        return self.spk_ln(self.spk2tts(speaker))

    def forward(self, inputs_embeds: Tensor, start: int | Tensor = 0, caches: list | None = None,
                last_only: bool = False) -> tuple[Tensor, Tensor]:
        """Run positions start..start+T-1 and return (logits (B,T,V), hidden (B,T,D)), hidden after the
        final norm. `last_only` computes logits and hidden for the last position only.

        With an int `start` and the cache from `setup_cache`, K/V are written in place and attention reads
        the filled prefix; without a cache the call is a plain causal forward (training). With a tensor
        `start` and explicit `caches` (objects with `.k` and `update(pos, k, v)`), the whole preallocated
        cache is read under a mask: the fixed-shape form the exported graphs use.
        """
        t = inputs_embeds.shape[1]
        device = inputs_embeds.device
        caches = self.caches if caches is None else caches
        if isinstance(start, Tensor):
            kv_len = caches[0].k.shape[2]
            self._ensure_rope(kv_len)
            pos = start.reshape(()) + torch.arange(t, device=device)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        else:
            end = start + t
            if caches is not None and end > caches[0].k.shape[2]:
                raise ContextFull(f"context of {end} positions exceeds the cache of {caches[0].k.shape[2]}")
            if caches is None and start:
                raise ValueError("start > 0 needs a KV cache (call setup_cache first)")
            self._ensure_rope(end)
            kv_len = end if caches is not None else t
            pos = torch.arange(start, end, device=device)
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        mask = pos[:, None] >= torch.arange(kv_len, device=device)[None, :]
        p = Positions(pos, mask, cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype), self.rope_cos,
                      self.rope_sin)
        x = inputs_embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, p, None if caches is None else caches[i])
        if last_only:
            x = x[:, -1:]
        hidden = self.model.norm(x)
        return self.lm_head(hidden), hidden


class ContextFull(RuntimeError):
    """The KV cache has no room for the next positions: the turn must stop here."""


def init_weights(module: nn.Module, std: float, generator: torch.Generator) -> None:
    """Deterministic random init (normal(0, std) for matrices, ones/zeros for norms), seeded."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight") or name.endswith("_ln.weight") or name.endswith("ln.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


__all__ = ["Qwen3Config", "Qwen3LM", "Qwen3Ops", "TORCH_OPS", "KVCache", "ContextFull", "FusedAttention", "Positions",
           "apply_rope", "gqa_attention", "init_weights", "param_count", "rms_norm", "rope_tables",
           "scatter_rows", "split_heads", "swiglu"]
