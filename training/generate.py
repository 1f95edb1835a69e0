"""PyTorch generation: speech in -> text ids + speech ids (and, with a decoder, the spoken reply), through the
shared interleave schedule.

`TorchTextDecoder` / `TorchSpeechDecoder` adapt our Qwen3 modules (static KV caches) to the
protocols in runtime/interleave.py; the schedule itself is the runtime's, so both paths decide alike.
On CUDA the single-position steps run as captured CUDA graphs (training/cuda_backend.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from opens2s_edge.runtime.audio import audio_features
from opens2s_edge.runtime.decoding import DecodeOptions, interleave_config, make_samplers
from opens2s_edge.runtime.interleave import InterleaveResult, interleave
from opens2s_edge.runtime.prompt import AUDIO_PLACEHOLDER_ID, PromptBuilder, SpeechVocab
from opens2s_edge.runtime.token2wav_stream import StreamConfig

from .checkpoint import load_checkpoint, read_frontend, read_generation_defaults
from .cuda_backend import StaticDecodeStep, host_row, resolve_device, resolve_dtype, resolve_step_mode
from .opens2s import SPEAKER_DIM, OpenS2S


@dataclass(frozen=True)
class StepTiming:
    """One timed piece of a turn. `kind`: audio (encoder + adapter), llm_prefill, llm_step, tts_start,
    tts_feed, tts_step, token2wav (one streaming chunk, or the final flush). `positions`: positions the
    decoder ran (tokens for token2wav). `start_s`: seconds since the turn began. `seconds`: wall time, host to
    host: every step ends with its logits on the host, so it includes the device's work."""

    kind: str
    positions: int
    start_s: float
    seconds: float

    def to_json(self) -> dict:
        return {"kind": self.kind, "positions": self.positions, "start_s": self.start_s, "seconds": self.seconds}


OnStep = Callable[[StepTiming], None]


class _Timer:
    """Times the decoders' calls for one turn and hands each `StepTiming` to a list and a callback."""

    def __init__(self, on_step: OnStep | None = None):
        self.t0 = time.perf_counter()
        self.steps: list[StepTiming] = []
        self.on_step = on_step

    def record(self, kind: str, positions: int, started: float) -> None:
        now = time.perf_counter()
        timing = StepTiming(kind, positions, started - self.t0, now - started)
        self.steps.append(timing)
        if self.on_step is not None:
            self.on_step(timing)


def _row(t: torch.Tensor) -> np.ndarray:
    return t[0, -1].float().cpu().numpy()


class TorchTextDecoder:
    """The LLM. With `step` (a StaticDecodeStep) single tokens go through the fixed-shape step (a CUDA graph
    on CUDA); the prompt is always prefilled eagerly."""

    def __init__(self, model: OpenS2S, prompt_embeds: torch.Tensor, step: StaticDecodeStep | None = None,
                 timer: _Timer | None = None):
        self.lm = model.llm_model
        self.prompt_embeds = prompt_embeds
        self.pos = 0
        self.static_step = step
        self.timer = timer

    def prefill(self) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        logits, hidden = self.lm(self.prompt_embeds, 0)
        self.pos = self.prompt_embeds.shape[1]
        self.first_logits = logits[0, -1]
        self.last_hidden = hidden[:, -1:]
        out = _row(logits), _row(hidden)
        if self.timer is not None:
            self.timer.record("llm_prefill", self.pos, started)
        return out

    def step(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        if self.static_step is not None:
            row = host_row(self.static_step.token(token, self.pos))
            self.pos += 1
            vocab = self.static_step.vocab
            out = row[:vocab], row[vocab:]
        else:
            ids = torch.tensor([[token]], device=self.prompt_embeds.device)
            logits, hidden = self.lm(self.lm.embed(ids), self.pos)
            self.pos += 1
            self.last_hidden = hidden
            out = _row(logits), _row(hidden)
        if self.timer is not None:
            self.timer.record("llm_step", 1, started)
        return out


class TorchSpeechDecoder:
    """The TTS LM. With `step`, single positions (speech tokens, and one-state feeds under M=1 strategies) go
    through the fixed-shape step; the speaker input and multi-state feeds run eagerly."""

    def __init__(self, model: OpenS2S, speaker: torch.Tensor | None = None, step: StaticDecodeStep | None = None,
                 timer: _Timer | None = None):
        self.model = model
        self.lm = model.tts_lm_model
        param = model.llm2tts.weight
        self.speaker = speaker if speaker is not None else torch.zeros(1, 1, SPEAKER_DIM, dtype=param.dtype)
        self.pos = 0
        self.tts_inputs: list[torch.Tensor] = []  # projected LLM states, kept for inspection/tests
        self.first_logits: torch.Tensor | None = None
        self.static_step = step
        self.timer = timer

    def _run(self, embeds: torch.Tensor, kind: str) -> np.ndarray:
        started = time.perf_counter()
        t = embeds.shape[1]
        if self.static_step is not None and t == 1 and kind != "tts_start":
            logits = host_row(self.static_step.embeds(embeds, self.pos))[: self.static_step.vocab]
        else:
            out, _ = self.lm(embeds, self.pos)
            logits = _row(out)
        self.pos += t
        if self.timer is not None:
            self.timer.record(kind, t, started)
        return logits

    def start(self) -> None:
        self.pos = 0
        self._run(self.lm.speaker_input(self.speaker.to(self.model.llm2tts.weight)), "tts_start")

    def feed_hidden(self, hidden: np.ndarray) -> np.ndarray:
        h = torch.from_numpy(hidden).to(self.model.llm2tts.weight)[None]
        projected = self.model.tts_input(h)
        self.tts_inputs.append(projected[0])
        logits = self._run(projected, "tts_feed")
        if self.first_logits is None:
            self.first_logits = torch.from_numpy(logits)
        return logits

    def step(self, token: int) -> np.ndarray:
        started = time.perf_counter()
        if self.static_step is not None:
            logits = host_row(self.static_step.token(token, self.pos))[: self.static_step.vocab]
            self.pos += 1
        else:
            ids = torch.tensor([[token]], device=self.model.llm2tts.weight.device)
            out, _ = self.lm(self.lm.embed(ids), self.pos)
            self.pos += 1
            logits = _row(out)
        if self.timer is not None:
            self.timer.record("tts_step", 1, started)
        return logits


GenerationOptions = DecodeOptions


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

    def to_json(self) -> dict:
        return {"text": self.text, "text_ids": self.text_ids, "speech_ids": self.speech_ids,
                "speech_units": self.speech_units}

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
        first_audio = next((t for t in self.timings if t.kind == "token2wav"), None)
        if first_audio is not None:
            out["first_audio_s"] = first_audio.start_s + first_audio.seconds
        return out


class Generator:
    """A loaded checkpoint ready to answer turns. Caches are allocated once and reused.

    `device`: cpu, cuda or cuda:N. `dtype`: fp32/bf16/fp16 or a torch dtype; None = fp32 on CPU, bf16 on
    CUDA. `cuda_graphs`: replay the single-token steps as CUDA graphs (default on CUDA). `compile`: the
    steps through torch.compile(mode="reduce-overhead") instead. `step_mode` names the mode directly
    (eager, static, graph, compile; see cuda_backend.py). `decoder`: a GLM-4-Voice decoder folder; the reply
    is then synthesized while it is generated (streaming token2wav, fp32, on the same device, with
    `stream_config`, default the runtime's `StreamConfig()`, seeded by the turn's seed as the runtime does).
    """

    def __init__(self, checkpoint: str | Path, dtype: torch.dtype | str | None = None, max_context: int = 4096,
                 *, device: str | torch.device = "cpu", cuda_graphs: bool | None = None, compile: bool = False,
                 step_mode: str | None = None, attention_windows: Sequence[int] | None = None,
                 decoder: str | Path | None = None, stream_config: StreamConfig | None = None):
        self.folder = Path(checkpoint)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.step_mode = resolve_step_mode(self.device, cuda_graphs, compile, step_mode)
        self.model = load_checkpoint(self.folder, dtype=self.dtype, device=self.device)
        self.prompt = PromptBuilder.from_folder(self.folder)
        self.vocab = SpeechVocab.from_folder(self.folder / "tts")
        self.defaults = read_generation_defaults(self.folder)
        self.frontend = read_frontend(self.folder, self.model.config)
        self.model.llm_model.setup_cache(max_context)
        self.model.tts_lm_model.setup_cache(max_context)
        self.llm_step = self.tts_step = None
        if self.step_mode != "eager":
            pool = torch.cuda.graph_pool_handle() if self.step_mode == "graph" else None
            self.llm_step = StaticDecodeStep(self.model.llm_model, self.step_mode, attention_windows, pool)
            self.tts_step = StaticDecodeStep(self.model.tts_lm_model, self.step_mode, attention_windows, pool)
        self.stream_config = stream_config or StreamConfig()
        self.decoder = None
        if decoder is not None:
            from .token2wav.decoder import load_decoder

            self.decoder = load_decoder(decoder, device=self.device)

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

    @torch.inference_mode()
    def __call__(self, wav: np.ndarray, options: GenerationOptions | None = None,
                 on_event: Callable[[str, int], None] | None = None,
                 on_step: OnStep | None = None) -> GenerationResult:
        """One turn. `on_event(kind, token)` sees each token as it is chosen; `on_step(StepTiming)` each timed
        piece (the same list comes back in `result.timings`)."""
        options = options or GenerationOptions()
        timer = _Timer(on_step)
        model = self.model
        started = time.perf_counter()
        features, length = audio_features(wav, self.frontend)
        audio_embeds = model.encode_audio(torch.from_numpy(features).to(self.device, self.dtype),
                                          torch.tensor([length], device=self.device))
        timer.record("audio", int(audio_embeds.shape[1]), started)
        prompt_ids = self.prompt.prompt_ids(options.system_prompt)
        prompt_embeds = model.splice_prompt(prompt_ids, audio_embeds, AUDIO_PLACEHOLDER_ID)
        text_dec = TorchTextDecoder(model, prompt_embeds, self.llm_step, timer)
        speech_dec = TorchSpeechDecoder(model, step=self.tts_step, timer=timer)
        text_sampler, speech_sampler = make_samplers(options, self.vocab)
        cfg = interleave_config(model.config.interleave_strategy, self.defaults, options)
        stream = self.decoder.stream(self.stream_config, seed=options.seed) if self.decoder is not None else None
        pieces: list[np.ndarray] = []
        pushed = voiced = 0  # units pushed to token2wav, and how many of them a returned chunk covered
        result = InterleaveResult()
        for event in interleave(text_dec, speech_dec, cfg, text_sampler, speech_sampler, result):
            if stream is not None and event.kind == "speech" and not self.vocab.is_eos(event.token):
                started = time.perf_counter()
                pcm = stream.push(self.vocab.to_units([event.token]))
                pushed += 1
                if pcm.size:
                    pieces.append(pcm)
                    timer.record("token2wav", pushed - voiced, started)
                    voiced = pushed
            if on_event is not None:
                on_event(event.kind, event.token)
        if stream is not None:
            started = time.perf_counter()
            pieces.append(stream.finalize())
            timer.record("token2wav", pushed - voiced, started)
        total_s = time.perf_counter() - timer.t0
        speech_ids = [i for i in result.speech_ids if not self.vocab.is_eos(i)]
        return GenerationResult(
            text=self.prompt.decode(result.text_ids),
            text_ids=result.text_ids,
            speech_ids=speech_ids,
            speech_units=self.vocab.to_units(speech_ids),
            prompt_ids=prompt_ids,
            adapter_out=audio_embeds.float().cpu().numpy(),
            tts_inputs=torch.cat(speech_dec.tts_inputs).float().cpu().numpy() if speech_dec.tts_inputs else None,
            llm_first_logits=getattr(text_dec, "first_logits", torch.zeros(0)).float().cpu().numpy(),
            tts_first_logits=None if speech_dec.first_logits is None else speech_dec.first_logits.numpy(),
            timings=timer.steps,
            total_s=total_s,
            audio=np.concatenate(pieces) if stream is not None else None,
            sample_rate=self.decoder.sample_rate if self.decoder is not None else None,
        )
