"""Triton kernels for the single-position decode step of the Qwen3 decoders (training/qwen3.py), with their launchers.

Each launcher takes and returns torch tensors and only launches kernels: no host sync, no allocation whose size
depends on a device value, grid sizes from shapes alone, so a launch can be recorded by CUDA graph capture and
replayed with new values in the same buffers. Importing this module needs Triton; under TRITON_INTERPRET=1 the same
kernels run on CPU tensors in Triton's interpreter (how the tests check them without a GPU).

Numerics: inputs are loaded and widened to fp32, every reduction accumulates in fp32, and where the PyTorch code
rounds an intermediate to the activations' dtype (RMSNorm's normalized rows, SiLU before the product, each product of
the rotary embedding) the kernel rounds at the same point, so bf16/fp16 results track the eager path closely.
Values are always widened explicitly before arithmetic: Triton's interpreter stores bf16 as raw 16-bit patterns and
only converts them on a cast.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # the interpreter's function type: kernels decorated while TRITON_INTERPRET=1 is set
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - every Triton 3 release has it
    InterpretedFunction = ()

# Cache rows one attention program reads per iteration; the per-head split length is a multiple of it.
ATTN_BLOCK_N = 64
ATTN_WARPS = 8
# Splits of the reduction over partial results taken at a time (bounds registers whatever the split count).
ATTN_REDUCE_BLOCK = 16
MATVEC_BLOCK_N = 32
MATVEC_BLOCK_K = 256
ELEMENTWISE_BLOCK = 1024
# Rows of x at or below which a weight-only linear runs the matrix-vector kernel (decode steps, M-state TTS feeds).
MATVEC_MAX_ROWS = 8


def _pow2(n: int, least: int = 16) -> int:
    """The block size covering n: a power of two, at least `least` (small blocks gain nothing and tl.dot needs 16)."""
    return max(least, 1 << max(0, (int(n) - 1).bit_length()))


# -- RMSNorm ----------------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_cols, x_stride, y_stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # As qwen3.rms_norm: the normalized row is cast to x's dtype before the weight multiplies it.
    h = (x * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_stride + cols, (h * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim of x (any leading shape: the hidden state, or the per-head q/k norms)."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"RMSNorm weight {tuple(weight.shape)} does not match the last dim {n}")
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, n, rows.stride(0), out.stride(0), float(eps),
                                           BLOCK=_pow2(n))
    return out.reshape(x.shape)


# -- rotary embedding -------------------------------------------------------------------------------------------------
@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, T, sxb, sxh, sxt, sc, HALF: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # one (batch, head, position) row; the output is contiguous (B, H, T, D)
    t = pid % T
    bh = pid // T
    h = bh % H
    b = bh // H
    d = tl.arange(0, BLOCK)
    mask = d < HALF
    src = x_ptr + b * sxb + h * sxh + t * sxt
    x1 = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + d, mask=mask, other=0.0).to(tl.float32)
    row = t * sc
    c1 = tl.load(cos_ptr + row + d, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + row + HALF + d, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + row + d, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + row + HALF + d, mask=mask, other=0.0).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    # x * cos + rotate_half(x) * sin, each product rounded to the dtype as PyTorch does.
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    dst = y_ptr + pid * (2 * HALF)
    tl.store(dst + d, y1.to(dt), mask=mask)
    tl.store(dst + HALF + d, y2.to(dt), mask=mask)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) (any strides, last dim contiguous) with per-position cos/sin rows (T, D) -> (B, H, T, D)."""
    b, h, t, d = x.shape
    if d % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {d}")
    cos2, sin2 = cos.reshape(-1, d), sin.reshape(-1, d)
    if cos2.shape[0] != t or sin2.shape != cos2.shape:
        raise ValueError(f"rope tables {tuple(cos.shape)} do not give one row per position of {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    out = torch.empty((b, h, t, d), dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    if out.numel():
        _rope_kernel[(b * h * t,)](x, cos2, sin2, out, h, t, x.stride(0), x.stride(1), x.stride(2), cos2.stride(0),
                                   HALF=d // 2, BLOCK=_pow2(d // 2))
    return out


# -- SwiGLU -----------------------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    act = (g * tl.sigmoid(g)).to(dt).to(tl.float32)  # F.silu(gate) is rounded before the product, as in PyTorch
    tl.store(y_ptr + offs, (act * u).to(dt), mask=mask)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise (same shapes)."""
    if gate.shape != up.shape:
        raise ValueError(f"SwiGLU halves differ: {tuple(gate.shape)} vs {tuple(up.shape)}")
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty(g.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = out.numel()
    if n:
        _swiglu_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](g, u, out, n, BLOCK=ELEMENTWISE_BLOCK)
    return out


# -- decode attention -------------------------------------------------------------------------------------------------
@triton.jit
def _attn_partial_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr,
                         sqh, skh, skn, svh, svn, L, split_len, n_splits, scale_log2,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """One (KV head, split) program: online softmax of the GROUP query heads sharing that KV head over the split's
    filled rows. Rows past the position are never loaded; a split that starts past it writes an empty partial."""
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    last = tl.load(pos_ptr).to(tl.int32)
    filled = tl.minimum(last + 1, L)
    start = split * split_len
    end = tl.minimum(start + split_len, filled)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < GROUP
    dmask = d < D
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + heads[:, None] * sqh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    q = q.to(tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kvh * skh + n[:, None] * skn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        # fp32 products ("ieee": no TF32 rounding of q and k), scores in the log2 domain for exp2.
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kvh * svh + n[:, None] * svn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = heads * n_splits + split
    tl.store(m_ptr + out, m_i, mask=gmask)
    tl.store(l_ptr + out, l_i, mask=gmask)
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _attn_reduce_kernel(m_ptr, l_ptr, acc_ptr, pos_ptr, o_ptr, soh, split_len, n_splits,
                        SPLITS_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """One query head: the softmax-weighted merge of its splits' partials (only splits holding filled rows)."""
    head = tl.program_id(0)
    last = tl.load(pos_ptr).to(tl.int32)
    s_all = tl.arange(0, SPLITS_PAD)
    live = (s_all < n_splits) & (s_all * split_len <= last)
    m_all = tl.load(m_ptr + head * n_splits + s_all, mask=live, other=float("-inf"))
    m_max = tl.max(m_all, axis=0)  # finite: split 0 always holds row 0
    d = tl.arange(0, D_PAD)
    dmask = d < D
    total = tl.zeros([D_PAD], tl.float32)
    denom = tl.zeros([SPLIT_BLOCK], tl.float32)
    for s0 in range(0, n_splits, SPLIT_BLOCK):
        s = s0 + tl.arange(0, SPLIT_BLOCK)
        smask = (s < n_splits) & (s * split_len <= last)
        m = tl.load(m_ptr + head * n_splits + s, mask=smask, other=float("-inf"))
        w = tl.where(smask, tl.exp2(m - m_max), 0.0)
        lsum = tl.load(l_ptr + head * n_splits + s, mask=smask, other=0.0)
        denom += w * lsum
        a = tl.load(acc_ptr + (head * n_splits + s)[:, None] * D + d[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0)
        total += tl.sum(w[:, None] * a, axis=0)
    out = total / tl.sum(denom, axis=0)
    tl.store(o_ptr + head * soh + d, out.to(o_ptr.dtype.element_ty), mask=dmask)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a fixed 8 for CPU tensors in the interpreter)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def attention_splits(length: int, kv_heads: int, device: torch.device, splits: int = 0) -> tuple[int, int]:
    """(split length, split count) for a cache of `length` rows: about four programs per SM over all KV heads, each
    split a whole number of row blocks. Fixed by the shapes, never by the position, so a captured graph replays for
    every position. `splits` > 0 asks for that many (tests use it to cross split boundaries)."""
    blocks = triton.cdiv(max(length, 1), ATTN_BLOCK_N)
    want = splits if splits > 0 else max(1, (4 * _sm_count(device)) // max(kv_heads, 1))
    per_split = triton.cdiv(blocks, max(1, min(want, blocks))) * ATTN_BLOCK_N
    return per_split, triton.cdiv(max(length, 1), per_split)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, splits: int = 0) -> Tensor:
    """Attention of one query position: q (1, H, 1, D) over rows 0..pos of the cache k, v (1, KV, L, D) (views of
    the static cache are fine: strides are passed, the last dim must be contiguous); `pos` a one-element integer
    tensor on the device. Split-K over the cache rows, grouped-query aware (each program loads its K/V rows once for
    all H / KV query heads that share them). Returns (1, H, 1, D) in q's dtype."""
    b, h, t, d = q.shape
    kv, length = k.shape[1], k.shape[2]
    if b != 1 or t != 1:
        raise ValueError(f"decode attention takes batch 1 and one query position, got {tuple(q.shape)}")
    if k.shape != v.shape or k.shape[0] != 1 or k.shape[3] != d or h % kv:
        raise ValueError(f"cache {tuple(k.shape)} / {tuple(v.shape)} does not fit queries {tuple(q.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the cache's head dim must be contiguous")
    group = h // kv
    split_len, n_splits = attention_splits(length, kv, q.device, splits)
    m = torch.empty((h, n_splits), dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty((h, n_splits, d), dtype=torch.float32, device=q.device)
    out = torch.empty((1, h, 1, d), dtype=q.dtype, device=q.device)
    d_pad = _pow2(d)  # tl.dot needs every dim >= 16
    _attn_partial_kernel[(kv, n_splits)](
        q, k, v, pos, m, lsum, acc, q.stride(1), k.stride(1), k.stride(2), v.stride(1), v.stride(2), length,
        split_len, n_splits, math.log2(math.e) / math.sqrt(d),
        GROUP=group, GROUP_PAD=_pow2(group), D=d, D_PAD=d_pad, BLOCK_N=ATTN_BLOCK_N,
        num_warps=ATTN_WARPS)  # 8 warps: a 64 x 128 fp32 K (and V) tile in registers
    _attn_reduce_kernel[(h,)](m, lsum, acc, pos, out, out.stride(1), split_len, n_splits,
                              SPLITS_PAD=_pow2(n_splits), SPLIT_BLOCK=ATTN_REDUCE_BLOCK, D=d, D_PAD=d_pad)
    return out


# -- weight-only int8 / int4 matrix-vector products --------------------------------------------------------------------
@triton.jit
def _matvec_int8_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, sxm, sym, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        x = tl.load(x_ptr + row * sxm + k, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    scale = tl.load(s_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sym + n, (acc * scale).to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _matvec_int4_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, n_groups, sxm, sym, HALF_GROUP: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Packed int4 (two per byte, q + 8), one fp16 scale per row and group of 2 * HALF_GROUP columns."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    j = tl.arange(0, HALF_GROUP)
    packed_cols = n_groups * HALF_GROUP
    acc = tl.zeros([BLOCK_N], tl.float32)
    for grp in range(0, n_groups):
        even = grp * (2 * HALF_GROUP) + 2 * j
        xe = tl.load(x_ptr + row * sxm + even, mask=even < K, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + row * sxm + even + 1, mask=even + 1 < K, other=0.0).to(tl.float32)
        byte = tl.load(w_ptr + n[:, None] * packed_cols + grp * HALF_GROUP + j[None, :], mask=nmask[:, None], other=0)
        byte = byte.to(tl.int32)
        low = ((byte & 15) - 8).to(tl.float32)
        high = ((byte >> 4) - 8).to(tl.float32)
        part = tl.sum(low * xe[None, :] + high * xo[None, :], axis=1)
        scale = tl.load(s_ptr + n * n_groups + grp, mask=nmask, other=0.0).to(tl.float32)
        acc += part * scale
    tl.store(y_ptr + row * sym + n, acc.to(y_ptr.dtype.element_ty), mask=nmask)


def wo_linear(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int, in_features: int) -> Tensor:
    """x (..., K) times a weight-only quantized (N, K) matrix (kernels/reference.quantize_weight's layout), the
    weight dequantized in registers: each int8/int4 byte is read once per row of x. For a few rows only (decode)."""
    k = x.shape[-1]
    if k != in_features:
        raise ValueError(f"input has {k} features, the layer {in_features}")
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n = qweight.shape[0]
    out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        grid = (triton.cdiv(n, MATVEC_BLOCK_N), rows.shape[0])
        if bits == 8:
            _matvec_int8_kernel[grid](rows, qweight, scales, out, n, k, rows.stride(0), out.stride(0),
                                      BLOCK_N=MATVEC_BLOCK_N, BLOCK_K=MATVEC_BLOCK_K)
        elif bits == 4:
            if group_size % 2 or group_size & (group_size - 1):
                raise ValueError(f"the int4 kernel takes a power-of-two group size, got {group_size}")
            _matvec_int4_kernel[grid](rows, qweight, scales, out, n, k, scales.shape[1], rows.stride(0),
                                      out.stride(0), HALF_GROUP=group_size // 2, BLOCK_N=MATVEC_BLOCK_N)
        else:
            raise ValueError(f"weight-only kernels are int8 or int4, not int{bits}")
    return out.reshape(*x.shape[:-1], n)


INTERPRETED = isinstance(_rms_norm_kernel, InterpretedFunction)

__all__ = ["ATTN_BLOCK_N", "INTERPRETED", "MATVEC_MAX_ROWS", "attention_splits", "decode_attention", "rms_norm",
           "rope", "swiglu", "wo_linear"]
