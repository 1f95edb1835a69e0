"""The PyTorch CUDA backend: our Qwen3 definitions on a GPU, for machines where TensorRT is not installed.

In the spirit of gpt-fast: the KV caches are preallocated once (`Qwen3LM.setup_cache`), and the
single-position decode step of each LM runs with its token id and position in fixed device buffers, so the
whole step (embedding, every layer, final norm, lm_head) is one fixed-shape computation that is captured once
as a CUDA graph and replayed for every token. Prefill and the multi-position TTS feeds run eagerly on the same
caches (their length varies).

The step reads its position from a tensor, so nothing in it depends on a host value: the rope rows are
gathered by that tensor, the causal mask is built from it, the K/V write is an `index_copy_` at it, and
attention reads a fixed-length window of the cache under that mask. The window is one of a few lengths
(`attention_windows`: 256, 512, ... up to the cache length), one graph each, chosen on the host from the
position, so a short turn does not read the whole preallocated cache every step.

Step modes:
- `eager`: the existing path (integer start, attention over the filled prefix). The CPU default.
- `static`: the fixed-shape step run eagerly: exactly the code a graph captures, on any device (tests).
- `graph`: the fixed-shape step captured as `torch.cuda.CUDAGraph`s (lazily, one per window and input kind,
  warm-up on a side stream, one memory pool) and replayed. The CUDA default.
- `compile`: the fixed-shape step through `torch.compile(mode="reduce-overhead", fullgraph=True)`, which
  captures its own CUDA graphs (one window: the whole cache).

Kernels (`use_kernels`): `torch` (the default) runs the step on PyTorch's own ops; `triton` swaps in the Triton
kernels of kernels/ (RMSNorm, rotary embedding, SwiGLU, and an attention that reads only the cache rows up to the
position, so one graph over the whole cache serves every position), optionally with the decoders' projections
quantized weight-only (int8 / int4) and multiplied by a matvec kernel that dequantizes in registers.

Sampling stays on the host, in runtime/sampling.py: one definition of every sampler for this backend, the
onnxruntime runtime and the TensorRT runtime, so a seed gives the same reply on each. The step returns one
float32 row (logits then the final-norm hidden state), copied to the host in one transfer per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .qwen3 import TORCH_DTYPES, TORCH_OPS, ContextFull, Qwen3LM, Qwen3Ops

DTYPES = TORCH_DTYPES  # the backend accepts every bundle dtype
STEP_MODES = ("eager", "static", "graph", "compile")
KERNELS = ("torch", "triton")
SMALLEST_WINDOW = 256


class DeviceError(RuntimeError):
    """The requested device, precision or step mode cannot be used on this machine."""


def resolve_device(device: str | torch.device) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` -> a torch.device, with an explanation when CUDA is not usable here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device {device!r} is not a device name (cpu, cuda, cuda:N)") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"device {device!r} is not supported: use cpu or cuda[:N]")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch"
        else:
            why = (f"PyTorch is built for CUDA {torch.version.cuda} but sees no usable GPU "
                   "(driver missing or too old, or CUDA_VISIBLE_DEVICES hides it)")
        raise DeviceError(f"CUDA was requested but is not available: {why}. Use --device cpu.")
    count = torch.cuda.device_count()
    index = 0 if dev.index is None else dev.index
    if index >= count:
        raise DeviceError(f"device {device!r} does not exist: {count} CUDA device(s) visible")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32/bf16/fp16 (or a torch dtype); None picks fp32 on CPU and bf16 on CUDA (fp16 where bf16 is missing)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DeviceError(f"dtype {dtype} is not supported: use one of {', '.join(DTYPES)}")
        return dtype
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise DeviceError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_step_mode(device: torch.device, cuda_graphs: bool | None = None, compile: bool = False,
                      step_mode: str | None = None) -> str:
    """The decode step mode from the user's switches (see the module docstring)."""
    if step_mode is not None:
        if step_mode not in STEP_MODES:
            raise DeviceError(f"step mode {step_mode!r} is not one of {', '.join(STEP_MODES)}")
        if step_mode == "graph" and device.type != "cuda":
            raise DeviceError("CUDA graphs need a CUDA device (--device cuda)")
        return step_mode
    if compile:
        if cuda_graphs is False:
            raise DeviceError("torch.compile reduce-overhead captures CUDA graphs; it cannot run with graphs off")
        return "compile"
    if device.type != "cuda":
        if cuda_graphs:
            raise DeviceError("CUDA graphs need a CUDA device (--device cuda)")
        return "eager"
    return "eager" if cuda_graphs is False else "graph"


def attention_windows(max_len: int, smallest: int = SMALLEST_WINDOW) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_len`, then `max_len`: the cache lengths a step may read."""
    windows, n = [], smallest
    while n < max_len:
        windows.append(n)
        n *= 2
    return (*windows, max_len)


class CacheWindow:
    """The first `length` positions of one layer's KVCache, as views: a step that attends over a window reads
    (and writes through) these instead of the whole preallocated cache."""

    def __init__(self, cache: torch.nn.Module, length: int):
        self.cache = cache
        self.k = cache.k[:, :, :length]
        self.v = cache.v[:, :, :length]

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class StaticDecodeStep:
    """One LM's single-position decode step over its preallocated cache, with fixed input/output buffers.

    `token(id, pos)` feeds a token id, `embeds(x, pos)` a (1, 1, D) input embedding; both return the float32
    row `[logits (V), hidden (D)]` on the device, valid until the next call of any step sharing the graph
    pool (graphs replayed one after another reuse each other's scratch memory): copy it out at once.
    """

    def __init__(self, lm: Qwen3LM, mode: str = "static", windows: Sequence[int] | None = None,
                 pool: object | None = None, caches: Sequence[torch.nn.Module] | None = None):
        """`caches`: the sequence's KV caches (default: the LM's own, from setup_cache)."""
        if mode not in ("static", "graph", "compile"):
            raise ValueError(f"StaticDecodeStep runs the fixed-shape step (static, graph, compile), not {mode!r}")
        caches = list(lm.caches) if caches is None and lm.caches is not None else caches
        if not caches:
            raise ValueError("give the step its KV caches (or call setup_cache on the LM first)")
        weight = lm.model.embed_tokens.weight
        self.lm, self.mode, self.device = lm, mode, weight.device
        if mode == "graph" and self.device.type != "cuda":
            raise DeviceError("CUDA graphs need the model on a CUDA device")
        self.max_len = int(caches[0].k.shape[2])
        if lm._rope_len < self.max_len:  # the graphs read the rope tables in place: they must never be rebuilt
            lm._ensure_rope(self.max_len)
        self.vocab = lm.config.vocab_size
        # compile: one window (the whole cache), so one specialization per input kind.
        windows = (self.max_len,) if mode == "compile" else tuple(windows or attention_windows(self.max_len))
        if list(windows) != sorted(set(windows)) or windows[-1] != self.max_len or windows[0] < 1:
            raise ValueError(f"attention windows {windows} must increase and end at the cache length {self.max_len}")
        self.windows = windows
        with torch.inference_mode(False), torch.no_grad():
            # Normal (not inference-mode) tensors, so fill_/copy_ work inside and outside inference mode.
            self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.inputs = torch.zeros(1, 1, lm.config.hidden_size, dtype=weight.dtype, device=self.device)
            self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        # Cache views per window, built once (the whole cache is the cache itself).
        self._caches = {n: (list(caches) if n == self.max_len else [CacheWindow(c, n) for c in caches])
                        for n in windows}
        self.pool = pool
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._compiled: dict[str, object] = {}
        if mode == "compile":
            for cache in caches:  # the caches are mutated in place: cudagraph trees must not copy them
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
            for buf in (self.ids, self.inputs, self.pos):
                torch._dynamo.mark_static_address(buf)

    # -- the step itself ---------------------------------------------------------------------------------
    def forward(self, kind: str, window: int) -> Tensor:
        """The computation a graph captures: no host value, no shape that depends on the position."""
        x = self.lm.embed(self.ids) if kind == "token" else self.inputs
        logits, hidden = self.lm(x, self.pos, caches=self._caches[window])
        return torch.cat([logits[0, -1].float(), hidden[0, -1].float()])

    def _forward_token(self, window: int) -> Tensor:
        return self.forward("token", window)

    def _forward_embeds(self, window: int) -> Tensor:
        return self.forward("embeds", window)

    def window_for(self, pos: int) -> int:
        if pos >= self.max_len:
            raise ContextFull(f"context of {pos + 1} positions exceeds the cache of {self.max_len}")
        return next(n for n in self.windows if n > pos)

    # -- entry points ------------------------------------------------------------------------------------
    def token(self, token: int, pos: int) -> Tensor:
        window = self.window_for(pos)
        self.ids.fill_(token)  # a fill kernel with the value as argument: no host-to-device copy, no sync
        self.pos.fill_(pos)
        return self._run("token", window)

    def embeds(self, embeds: Tensor, pos: int) -> Tensor:
        if tuple(embeds.shape) != tuple(self.inputs.shape):
            raise ValueError(f"the decode step takes one position {tuple(self.inputs.shape)}, "
                             f"got {tuple(embeds.shape)}")
        window = self.window_for(pos)
        self.inputs.copy_(embeds)
        self.pos.fill_(pos)
        return self._run("embeds", window)

    def _run(self, kind: str, window: int) -> Tensor:
        if self.mode == "static":
            return self.forward(kind, window)
        if self.mode == "compile":
            fn = self._compiled.get(kind)
            if fn is None:
                raw = self._forward_token if kind == "token" else self._forward_embeds
                fn = self._compiled[kind] = torch.compile(raw, mode="reduce-overhead", fullgraph=True,
                                                          dynamic=False)
            # Each call is a new step for cudagraph trees: the previous row was already copied to the host.
            torch.compiler.cudagraph_mark_step_begin()
            return fn(window)
        entry = self._graphs.get((kind, window))
        if entry is None:
            entry = self._graphs[(kind, window)] = self._capture(kind, window)
        graph, row = entry
        graph.replay()
        return row

    def _capture(self, kind: str, window: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Warm up on a side stream, then capture. Warm-up runs write this position's K/V from the inputs
        already in the buffers, which the replay writes again identically, so capturing mid-turn is safe.
        Always under inference mode (as every replay is), so whatever the capture creates lazily, such as the
        generator's graph state, is made in one mode only."""
        with torch.inference_mode(), torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.forward(kind, window)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                row = self.forward(kind, window)
        return graph, row

    def capture_all(self, kinds: Sequence[str] = ("token", "embeds")) -> int:
        """Capture (or compile) every window ahead of a turn, so no step pays for it mid-turn. Writes
        position 0 of the cache, which every turn's prefill overwrites. Returns the number of graphs."""
        if self.mode == "static":
            return 0
        with torch.inference_mode():
            self._capture_all(kinds)
        return len(self._graphs) if self.mode == "graph" else len(self._compiled)

    def _capture_all(self, kinds: Sequence[str]) -> None:
        for kind in kinds:
            for window in self.windows:
                self.pos.fill_(0)
                self._run(kind, window)

    @property
    def graphs(self) -> int:
        return len(self._graphs)


def kernel_ops(kernels: str, device: torch.device | None = None) -> Qwen3Ops:
    """The Qwen3 primitive set for `kernels` ("torch" or "triton"). Triton on a CUDA device needs Triton installed;
    elsewhere the Triton set runs its reference fallbacks (or Triton's interpreter under TRITON_INTERPRET=1)."""
    if kernels == "torch":
        return TORCH_OPS
    if kernels != "triton":
        raise DeviceError(f"kernels {kernels!r} is not one of {', '.join(KERNELS)}")
    from opens2s_edge.kernels.ops import TRITON_OPS, KernelError, triton_kernels

    if device is not None and device.type == "cuda":
        try:
            triton_kernels()
        except KernelError as exc:
            raise DeviceError(str(exc)) from exc
    return TRITON_OPS


def use_kernels(generator: Any, kernels: str = "triton", weights: str | None = None) -> None:
    """Run a `Generator`'s decoders (the LLM and the TTS LM) on `kernels`, in place; `weights` "int8" / "int4"
    also quantizes their projections weight-only (see TorchBackend.set_kernels). Call it before `warmup()`."""
    generator.backend.set_kernels(kernels, weights)
    generator.kernels, generator.weights = kernels, weights


def host_row(row: Tensor) -> np.ndarray:
    """Device row -> a fresh float32 numpy array (one device-to-host copy; it synchronizes)."""
    out = row.detach().to("cpu", torch.float32)
    if out.data_ptr() == row.data_ptr():  # already on the host: a copy, the step's buffer is reused
        out = out.clone()
    return out.numpy()


__all__ = ["DTYPES", "KERNELS", "STEP_MODES", "DeviceError", "StaticDecodeStep", "CacheWindow", "attention_windows",
           "host_row", "kernel_ops", "resolve_device", "resolve_dtype", "resolve_step_mode", "use_kernels"]
