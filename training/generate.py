"""PyTorch generation: speech in -> text ids + speech ids (and, with a decoder, the spoken reply).

`Generator` is the runtime's Engine on the PyTorch backend (training/torch_backend.py): the turn, its stop
conditions, events and timings are the runtime's own (runtime/conversation.py), so PyTorch, onnxruntime and
TensorRT decide alike. On CUDA the single-position steps run as captured CUDA graphs (training/cuda_backend.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opens2s_edge.runtime.decoding import DecodeOptions
from opens2s_edge.runtime.engine import OnStep, SpeechToken, StepTiming, TextDelta, TurnDone, TurnOptions
from opens2s_edge.runtime.token2wav_stream import StreamConfig

from .checkpoint import load_checkpoint
from .cuda_backend import resolve_device, resolve_dtype, resolve_step_mode
from .torch_backend import TorchBackend, torch_engine

GenerationOptions = DecodeOptions

__all__ = ["GenerationOptions", "GenerationResult", "Generator", "OnStep", "StepTiming"]


@dataclass
class GenerationResult:
    text: str
    text_ids: list[int]
    speech_ids: list[int]  # TTS vocabulary ids, EOS excluded
    speech_units: list[int]  # vocoder codes 0..16383
    prompt_ids: list[int] = field(default_factory=list)
    adapter_out: np.ndarray | None = None
    tts_inputs: np.ndarray | None = None
    llm_first_logits: np.ndarray | None = None
    tts_first_logits: np.ndarray | None = None
    timings: list[StepTiming] = field(default_factory=list)  # every timed piece of the turn, in order
    total_s: float = 0.0  # the whole turn, sampling and the schedule included
    audio: np.ndarray | None = None  # the spoken reply (float32), when the Generator has a decoder
    sample_rate: int | None = None
    stopped: str = "budget"

    def to_json(self) -> dict:
        return {"text": self.text, "text_ids": self.text_ids, "speech_ids": self.speech_ids,
                "speech_units": self.speech_units, "prompt_ids": self.prompt_ids}

    def timing_summary(self) -> dict:
        """Per kind: count, positions, total seconds, median and p90 milliseconds; plus first text/audio times."""
        out: dict = {"total_s": self.total_s}
        for kind in dict.fromkeys(t.kind for t in self.timings):
            rows = [t for t in self.timings if t.kind == kind]
            ms = np.array([t.seconds for t in rows]) * 1e3
            out[kind] = {"count": len(rows), "positions": sum(t.positions for t in rows),
                         "total_s": float(ms.sum() / 1e3), "median_ms": float(np.median(ms)),
                         "p90_ms": float(np.percentile(ms, 90))}
        for kind in ("llm_step", "tts_step"):
            if kind in out and out[kind]["total_s"] > 0:
                out[kind]["tokens_per_s"] = out[kind]["positions"] / out[kind]["total_s"]
        first_audio = next((t for t in self.timings if t.kind == "token2wav" and t.positions), None)
        if first_audio is not None:
            out["first_audio_s"] = first_audio.start_s + first_audio.seconds
        return out

    @classmethod
    def from_turn(cls, done: TurnDone, with_audio: bool) -> GenerationResult:
        t = done.trace
        return cls(text=done.text, text_ids=done.text_ids, speech_ids=done.speech_ids,
                   speech_units=done.speech_units, prompt_ids=done.prompt_ids,
                   adapter_out=t.audio_embeds[0][None] if t.audio_embeds else None,
                   tts_inputs=np.concatenate(t.tts_inputs) if t.tts_inputs else None,
                   llm_first_logits=t.llm_first_logits, tts_first_logits=t.tts_first_logits, timings=done.timings,
                   total_s=done.latency.total_s, audio=done.audio if with_audio else None,
                   sample_rate=done.sample_rate if with_audio else None, stopped=done.stopped)


class Generator:
    """A loaded checkpoint ready to answer turns (no memory between calls; `conversation()` for that).

    `device`: cpu, cuda or cuda:N. `dtype`: fp32/bf16/fp16 or a torch dtype; None = fp32 on CPU, bf16 on
    CUDA. `cuda_graphs`: replay the single-token steps as CUDA graphs (default on CUDA). `compile`: the
    steps through torch.compile(mode="reduce-overhead") instead. `step_mode` names the mode directly
    (eager, static, graph, compile; see cuda_backend.py). `decoder`: a GLM-4-Voice decoder folder; the reply
    is then synthesized while it is generated (streaming token2wav, fp32, on the same device, with
    `stream_config`, default the runtime's `StreamConfig()`, seeded by the turn's seed as the runtime does).
    `kernels` ("torch" | "triton") and `weights` (None | "int8" | "int4") choose the decode steps' primitives.
    """

    def __init__(self, checkpoint: str | Path, dtype: torch.dtype | str | None = None, max_context: int = 4096,
                 *, device: str | torch.device = "cpu", cuda_graphs: bool | None = None, compile: bool = False,
                 step_mode: str | None = None, attention_windows: Sequence[int] | None = None,
                 decoder: str | Path | None = None, stream_config: StreamConfig | None = None,
                 kernels: str = "torch", weights: str | None = None):
        self.folder = Path(checkpoint)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.step_mode = resolve_step_mode(self.device, cuda_graphs, compile, step_mode)
        self.model = load_checkpoint(self.folder, dtype=self.dtype, device=self.device)
        self.decoder = None
        if decoder is not None:
            from .token2wav.decoder import load_decoder

            self.decoder = load_decoder(decoder, device=self.device)
        self.engine = torch_engine(self.model, self.folder, max_context, self.step_mode, attention_windows,
                                   self.decoder.backend if self.decoder is not None else None)
        self.backend: TorchBackend = self.engine.backend  # type: ignore[assignment]
        self.prompt, self.vocab, self.defaults = self.engine.prompt, self.engine.vocab, self.engine.defaults
        self.frontend = self.engine.frontend
        self.stream_config = stream_config or StreamConfig()
        self.kernels, self.weights = "torch", None
        self._oneshot = self.engine.conversation()
        if kernels != "torch" or weights is not None:
            self.backend.set_kernels(kernels, weights)
            self.kernels, self.weights = kernels, weights

    @property
    def llm_step(self) -> Any:
        return self._oneshot.llm.step

    @property
    def tts_step(self) -> Any:
        return self._oneshot.tts.step

    def conversation(self, system_prompt: str | None = None, speaker: np.ndarray | None = None) -> Any:
        return self.engine.conversation(system_prompt, speaker)

    @torch.inference_mode()
    def warmup(self) -> int:
        """Capture (graph) or compile (compile) every decode step ahead of the first turn; returns how many.
        Without it each graph is captured the first time a turn needs it."""
        if self.llm_step is None:
            return 0
        # The TTS LM also takes single projected LLM states (the "embeds" step): every feed under an M=1
        # strategy, and a last text chunk of one token under any other.
        n = self.llm_step.capture_all(("token",)) + self.tts_step.capture_all(("token", "embeds"))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return n

    def __call__(self, wav: np.ndarray, options: GenerationOptions | None = None,
                 on_event: Callable[[str, int], None] | None = None,
                 on_step: OnStep | None = None) -> GenerationResult:
        """One turn. `on_event(kind, token)` sees each token as it is chosen; `on_step(StepTiming)` each timed
        piece (the same list comes back in `result.timings`)."""
        options = options or GenerationOptions()
        turn_options = TurnOptions(**{f.name: getattr(options, f.name) for f in dataclasses.fields(DecodeOptions)},
                                   stream=self.stream_config)
        self._oneshot.reset(options.system_prompt)
        done = None
        for event in self._oneshot.turn(wav, "", turn_options, on_step=on_step):
            if on_event is not None and isinstance(event, TextDelta):
                on_event("text", event.token)
            elif on_event is not None and isinstance(event, SpeechToken):
                on_event("speech", event.token)
            elif isinstance(event, TurnDone):
                done = event
        assert done is not None
        return GenerationResult.from_turn(done, self.decoder is not None)
