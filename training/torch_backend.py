"""The PyTorch backend of the runtime's Engine: our model definitions, eager on any device or with the decode steps
replayed as CUDA graphs (cuda_backend.StaticDecodeStep), behind the same protocols as onnxruntime and TensorRT.

So `generate`, `run`, `chat` and the benchmarks share one turn loop (runtime/conversation.py), one set of stop
conditions, events and timings, whatever runs the networks. Each conversation gets its own KV caches (and, in a
graph mode, its own captured steps, in one shared memory pool).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opens2s_edge.runtime.decoder import KVDecoder
from opens2s_edge.runtime.engine import Engine
from opens2s_edge.runtime.prompt import PromptBuilder, SpeechVocab

from .checkpoint import read_frontend, read_generation_defaults
from .cuda_backend import DeviceError, StaticDecodeStep, attention_windows, host_row, kernel_ops
from .opens2s import OpenS2S
from .qwen3 import KVCache, Qwen3LM

# The PyTorch path has no exported audio profile: utterances are encoded in 30 s windows, all at once, so memory
# grows with the length; ten minutes is the stated limit.
MAX_AUDIO_SECONDS = 600.0


class TorchGraph:
    """A single-shot module call with the Graph protocol's numpy in/out."""

    def __init__(self, fn: Any, inputs: Sequence[str], param: torch.Tensor):
        self.fn, self.inputs, self.param = fn, tuple(inputs), param

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = []
        for name in self.inputs:
            a = torch.from_numpy(np.ascontiguousarray(feeds[name]))
            args.append(a.to(self.param.device, self.param.dtype if a.is_floating_point() else a.dtype))
        with torch.inference_mode():
            out = self.fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in out]


class TorchDecoder(KVDecoder):
    """One sequence on a Qwen3LM: its own static KV cache; single positions through the fixed-shape step (a CUDA
    graph on CUDA) when the backend's step mode is not eager."""

    def __init__(self, backend: TorchBackend, lm: Qwen3LM):
        weight = lm.model.embed_tokens.weight
        super().__init__(None, backend.max_context, np.float32)  # type: ignore[arg-type]  # rows come from the device
        self.backend, self.lm = backend, lm
        c = lm.config
        self.caches = [KVCache(1, c.num_key_value_heads, backend.max_context, c.head_dim, weight.dtype, weight.device)
                       for _ in range(c.num_hidden_layers)]
        self.vocab = c.vocab_size
        self.step = self._make_step()

    def _make_step(self) -> StaticDecodeStep | None:
        b = self.backend
        if b.step_mode == "eager":
            return None
        windows = (b.max_context,) if b.filled_rows_only else b.windows
        return StaticDecodeStep(self.lm, b.step_mode, windows, b.pool, caches=self.caches)

    def rebuild_step(self) -> None:
        """After the backend's kernels changed: steps are captured again on first use."""
        self.step = self._make_step()

    def embed(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        w = self.lm.model.embed_tokens.weight
        with torch.inference_mode():
            return self.lm.embed(torch.as_tensor(np.asarray(ids, np.int64), device=w.device)).float().cpu().numpy()

    def _split(self, row: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": row[: self.vocab], "hidden": row[self.vocab:]}

    def _run(self, embeds: np.ndarray, start: int) -> dict[str, np.ndarray]:
        w = self.lm.model.embed_tokens.weight
        x = torch.from_numpy(embeds).to(w.device, w.dtype)[None]
        with torch.inference_mode():
            if self.step is not None and x.shape[1] == 1:
                return self._split(host_row(self.step.embeds(x, start)))
            logits, hidden = self.lm(x, start, caches=self.caches, last_only=True)
            return {"logits": logits[0, -1].float().cpu().numpy(), "hidden": hidden[0, -1].float().cpu().numpy()}

    def feed_token(self, token: int) -> dict[str, np.ndarray]:
        if self.pos + 1 > self.max_len:
            return self.run(self.embed([token]))  # raises ContextFull with the limit named
        with torch.inference_mode():
            if self.step is not None:
                out = self._split(host_row(self.step.token(token, self.pos)))
            else:
                w = self.lm.model.embed_tokens.weight
                ids = torch.tensor([[token]], device=w.device)
                logits, hidden = self.lm(self.lm.embed(ids), self.pos, caches=self.caches)
                out = {"logits": logits[0, -1].float().cpu().numpy(), "hidden": hidden[0, -1].float().cpu().numpy()}
        self.pos += 1
        return out


class TorchBackend:
    """OpenS2S's networks in PyTorch, by the bundle's graph names."""

    name = "torch"

    def __init__(self, model: OpenS2S, max_context: int, step_mode: str = "eager",
                 windows: Sequence[int] | None = None):
        self.model, self.max_context, self.step_mode = model, max_context, step_mode
        self.param = model.llm2tts.weight
        self.windows = tuple(windows or attention_windows(max_context))
        self.pool = torch.cuda.graph_pool_handle() if step_mode == "graph" else None
        self.filled_rows_only = False
        self.kernels, self.weights = "torch", None
        self.decoders: list[TorchDecoder] = []
        for lm in (model.llm_model, model.tts_lm_model):
            lm._ensure_rope(max_context)  # the rope tables are read in place by captured steps: built once

    def graph(self, name: str) -> TorchGraph:
        m = self.model
        if name == "audio_encoder":
            return TorchGraph(m.audio_embeddings, ("input_features", "feature_length"), self.param)
        if name == "tts_projection":
            return TorchGraph(m.tts_input, ("llm_hidden",), self.param)
        if name == "speaker_projection":
            return TorchGraph(m.tts_lm_model.speaker_input, ("speaker",), self.param)
        raise DeviceError(f"the PyTorch backend has no graph {name!r}")

    def decoder(self, name: str, embed_table: np.ndarray | None = None) -> TorchDecoder:
        lm = {"llm": self.model.llm_model, "tts_lm": self.model.tts_lm_model}[name]
        decoder = TorchDecoder(self, lm)
        self.decoders.append(decoder)
        return decoder

    def set_kernels(self, kernels: str = "triton", weights: str | None = None) -> None:
        """Run both LMs on `kernels` ("torch" or "triton"); `weights` "int8" / "int4" also quantizes their
        projections weight-only. With kernels whose attention reads only the filled rows, decode steps use one
        window (the whole cache): one CUDA graph per input kind. Steps already captured are rebuilt."""
        ops = kernel_ops(kernels, self.param.device)
        lms = (self.model.llm_model, self.model.tts_lm_model)
        if weights is not None:
            from opens2s_edge.kernels.ops import KernelError
            from opens2s_edge.kernels.quant import quantize_linears

            try:
                for lm in lms:
                    quantize_linears(lm, weights, use_kernels=kernels == "triton")
            except KernelError as exc:
                raise DeviceError(str(exc)) from exc
        for lm in lms:
            lm.set_ops(ops)
        self.kernels, self.weights, self.filled_rows_only = kernels, weights, ops.reads_filled_rows
        for decoder in self.decoders:
            decoder.rebuild_step()

    def describe(self) -> dict[str, Any]:
        p = self.param
        return {"backend": self.name, "device": str(p.device), "dtype": str(p.dtype).replace("torch.", ""),
                "step_mode": self.step_mode, "kernels": self.kernels, "weights": self.weights}


def torch_engine(model: OpenS2S, folder: Path, max_context: int, step_mode: str = "eager",
                 windows: Sequence[int] | None = None, token2wav: Any = None) -> Engine:
    """The runtime's Engine on this checkpoint's PyTorch model; `token2wav` a Token2WavBackend (None: no audio)."""
    backend = TorchBackend(model, max_context, step_mode, windows)
    return Engine(backend, PromptBuilder.from_folder(folder), SpeechVocab.from_folder(folder / "tts"),
                  read_frontend(folder, model.config), read_generation_defaults(folder),
                  model.config.interleave_strategy, token2wav, None, None,  # type: ignore[arg-type]
                  model.tts_lm_model.spk2tts.in_features, MAX_AUDIO_SECONDS)
