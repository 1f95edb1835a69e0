"""The loaded engine: one model's graphs on one backend, its tokenizer, vocabularies and frontend, shared by every
conversation on it (compare onnxruntime-genai's `Model`, sherpa-onnx's recognizer).

```
wav -> log-mel (numpy) -> audio graph ---------------------+
history -> chat template -> prompt ids -> LLM cache (reused prefix, KV in place) -> interleave(LLM, TTS LM)
                                                                    | speech tokens
                                                                    v
                                              Token2WavStream(flow, estimator, HiFT) -> PCM
```
Backends implement three small protocols (`Graph`, `Backend.decoder` -> a `KVDecoder`, and the token2wav
protocol): onnxruntime (CPU, CUDA EP, TensorRT EP), native TensorRT, and PyTorch (training/torch_backend.py:
eager, or decode steps replayed as CUDA graphs). The turn itself is written once, in conversation.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .audio import AudioInputError, Frontend, audio_features
from .bundle import Bundle
from .decoder import ContextFull, KVDecoder
from .decoding import DecodeOptions, GenerationDefaults
from .onnx_backend import BackendError, OnnxRuntimeBackend, OrtGraph, make_session
from .prompt import DEFAULT_SYSTEM_PROMPT, PromptBuilder, SpeechVocab
from .token2wav_stream import DecoderSpec, StreamConfig, Token2WavBackend

__all__ = ["AudioChunk", "AudioTooLong", "Backend", "BackendError", "ContextFull", "Engine", "Graph",
           "GraphToken2Wav", "HistoryTrimmed", "Latency", "SpeechToken", "StepTiming", "TextDelta", "TurnDone",
           "TurnOptions", "make_backend"]


@dataclass
class TurnOptions(DecodeOptions):
    stream: StreamConfig = field(default_factory=StreamConfig)


class Graph(Protocol):
    """A single-shot graph: named host arrays in (any float dtype; the backend casts to the graph's own), host
    arrays out in the graph's output order, float outputs as float32."""

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(Protocol):
    """Makes one model's graphs runnable; the engine asks for each by its bundle name. `decoder` makes a new
    sequence (its own KV cache) each call; graphs and sessions are shared."""

    name: str

    def graph(self, name: str) -> Graph: ...

    def decoder(self, name: str, embed_table: np.ndarray) -> KVDecoder: ...

    def describe(self) -> dict[str, Any]: ...


BACKENDS = ("onnxruntime", "tensorrt")


def make_backend(name: str, bundle: Bundle, providers: Sequence[str] = ("cpu",), threads: int = 0,
                 engines: str | None = None, cuda_graphs: bool = True) -> Backend:
    """The backend called `name` for `bundle`; BackendError (named, with what to install) if it cannot run here."""
    if name == "onnxruntime":
        return OnnxRuntimeBackend(bundle, providers, threads)
    if name == "tensorrt":
        from .trt_backend import TensorRTBackend  # imports tensorrt and cuda-python, so only on request

        return TensorRTBackend(bundle, engines=engines, cuda_graphs=cuda_graphs)
    raise BackendError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")


# -- events ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextDelta:
    t: float  # seconds since the turn started
    token: int
    text: str  # the new characters this token completed (may be empty mid-character)


@dataclass(frozen=True)
class SpeechToken:
    t: float
    token: int


@dataclass(frozen=True)
class AudioChunk:
    t: float
    pcm: np.ndarray  # float32 mono at `sample_rate`
    sample_rate: int


@dataclass(frozen=True)
class HistoryTrimmed:
    """The history no longer fit the context: the oldest `dropped` messages were left out (the system prompt
    stays) and the prompt re-rendered."""

    t: float
    dropped: int
    kept: int


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


@dataclass
class Latency:
    first_text_s: float | None = None
    first_audio_s: float | None = None
    total_s: float = 0.0
    audio_s: float = 0.0
    encode_s: float = 0.0
    prefill_s: float = 0.0

    @property
    def rtf(self) -> float | None:
        """Real-time factor: turn wall time over seconds of reply audio (< 1 is faster than real time)."""
        return self.total_s / self.audio_s if self.audio_s else None

    def to_json(self) -> dict:
        return {"first_text_s": self.first_text_s, "first_audio_s": self.first_audio_s, "total_s": self.total_s,
                "audio_s": self.audio_s, "encode_s": self.encode_s, "prefill_s": self.prefill_s, "rtf": self.rtf}


@dataclass
class Trace:
    """What a turn computed on the way, for comparison with the reference: this turn's audio embeddings, the
    projected TTS inputs, and the first logits of each decoder."""

    audio_embeds: list[np.ndarray] = field(default_factory=list)
    tts_inputs: list[np.ndarray] = field(default_factory=list)
    llm_first_logits: np.ndarray | None = None
    tts_first_logits: np.ndarray | None = None


@dataclass
class TurnDone:
    t: float
    text: str
    text_ids: list[int]
    speech_ids: list[int]  # TTS vocabulary ids, EOS excluded
    speech_units: list[int]  # vocoder codes
    audio: np.ndarray
    sample_rate: int
    latency: Latency
    stopped: str  # "eos", "budget", "context" or "cancelled"
    prompt_ids: list[int] = field(default_factory=list)  # AUDIO_PLACEHOLDER_ID where an audio's rows go
    reused: int = 0  # LLM positions taken from the cache
    prefilled: int = 0  # LLM positions computed for the prompt
    timings: list[StepTiming] = field(default_factory=list)
    trace: Trace = field(default_factory=Trace)
    history_text: str = ""  # the assistant text the history keeps (shorter than `text` after a cancel)

    def to_json(self) -> dict:
        return {"text": self.text, "text_ids": self.text_ids, "speech_ids": self.speech_ids,
                "speech_units": self.speech_units, "prompt_ids": self.prompt_ids, "reused": self.reused,
                "prefilled": self.prefilled, "stopped": self.stopped, "latency": self.latency.to_json()}


Event = TextDelta | SpeechToken | AudioChunk | HistoryTrimmed | TurnDone


# -- token2wav on graphs -----------------------------------------------------------------------------------
class GraphToken2Wav:
    """The streaming token2wav protocol on a backend's flow, estimator and HiFT graphs."""

    def __init__(self, spec: DecoderSpec, flow: Graph, estimator: Graph, hift: Graph):
        self.spec, self.flow, self.estimator, self.hift = spec, flow, estimator, hift

    @classmethod
    def from_backend(cls, bundle: Bundle, backend: Backend) -> GraphToken2Wav:
        return cls(bundle.spec.token2wav, backend.graph("flow"), backend.graph("estimator"), backend.graph("hift"))

    def encode(self, tokens: np.ndarray, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, spks = self.flow.run({"tokens": np.asarray(tokens, np.int64)[None],
                                  "embedding": np.asarray(embedding, np.float32)[None]})
        return mu[0], spks[0]

    def estimate(self, x: np.ndarray, mask: np.ndarray, mu: np.ndarray, t: np.ndarray, spks: np.ndarray,
                 cond: np.ndarray) -> np.ndarray:
        return self.estimator.run({"x": x, "mask": mask, "mu": mu, "t": t, "spks": spks, "cond": cond})[0]

    def vocode(self, mel: np.ndarray, phase: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        wav, _source, frame_phase = self.hift.run({
            "mel": np.asarray(mel, np.float32)[None],
            "phase": np.asarray(phase, np.float32).reshape(1, -1, 1),
            "noise": np.asarray(noise, np.float32)[None]})
        return wav[0], frame_phase[0]


class OrtToken2Wav(GraphToken2Wav):
    """GraphToken2Wav on onnxruntime sessions (what the benchmarks time on its own)."""

    def __init__(self, bundle: Bundle, providers: list[str], threads: int):
        super().__init__(bundle.spec.token2wav,
                         *(OrtGraph(make_session(bundle.graph_path(name), providers, threads))
                           for name in ("flow", "estimator", "hift")))


class AudioTooLong(AudioInputError):
    """The utterance is empty, not finite, or longer than the audio graph takes."""


# -- the engine ----------------------------------------------------------------------------------------------
class Engine:
    """A loaded model on one backend, shared by conversations. `conversation()` makes a new one; `turn(wav)`
    answers one utterance without memory (a reused conversation, reset each call).

    Not thread-safe: a turn at a time (conversations interleave turn by turn, or step by step by advancing
    their turn iterators in turn).
    """

    def __init__(self, backend: Backend, prompt: PromptBuilder, vocab: SpeechVocab, frontend: Frontend,
                 defaults: GenerationDefaults, interleave_strategy: str, token2wav: Token2WavBackend,
                 llm_embed: np.ndarray, tts_embed: np.ndarray, speaker_dim: int, max_audio_seconds: float,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.backend = backend
        self.prompt, self.vocab, self.frontend, self.defaults = prompt, vocab, frontend, defaults
        self.interleave_strategy = interleave_strategy
        self.token2wav = token2wav
        self.llm_embed, self.tts_embed = llm_embed, tts_embed
        self.speaker_dim = speaker_dim
        self.max_audio_seconds = max_audio_seconds
        self.system_prompt = system_prompt
        self.audio = backend.graph("audio_encoder")
        self.tts_projection = backend.graph("tts_projection")
        self.speaker_projection = backend.graph("speaker_projection")
        self._default_speaker = self.project_speaker(np.zeros(speaker_dim, np.float32))
        self._oneshot = None

    @classmethod
    def from_bundle(cls, bundle: Bundle, providers: tuple[str, ...] = ("cpu",), threads: int = 0, *,
                    backend: str | Backend = "onnxruntime", engines: str | None = None,
                    cuda_graphs: bool = True) -> Engine:
        """`backend`: "onnxruntime" (on `providers`: cpu, cuda, tensorrt EPs), "tensorrt" (the bundle's engine
        set, picked for this GPU or by `engines` key; `cuda_graphs` replays each decode step as one CUDA graph),
        or a backend object."""
        spec = bundle.spec  # the whole manifest checked here, before any session loads
        made = make_backend(backend, bundle, providers, threads, engines, cuda_graphs) \
            if isinstance(backend, str) else backend
        limit = bundle.graph("audio_encoder")["limits"].get("max_windows", 1) * spec.audio.window_seconds
        engine = cls(made, PromptBuilder.from_folder(bundle.root), spec.speech_tokens, spec.audio, spec.generation,
                     spec.interleave_strategy, GraphToken2Wav.from_backend(bundle, made), bundle.array("llm_embed"),
                     bundle.array("tts_embed"), spec.tts.speaker_dim, min(limit, spec.max_audio_seconds),
                     spec.system_prompt)
        engine.bundle = bundle
        return engine

    @property
    def sample_rate(self) -> int:
        """The reply audio's rate (0: an engine without a vocoder makes no audio)."""
        return self.token2wav.spec.sample_rate if self.token2wav is not None else 0

    # -- the small graphs ------------------------------------------------------------------------------
    def project_hidden(self, hidden: np.ndarray) -> np.ndarray:
        """LLM final-norm hidden states (k, D_llm) -> TTS LM inputs (k, D_tts)."""
        return self.tts_projection.run({"llm_hidden": hidden[None]})[0][0]

    def project_speaker(self, speaker: np.ndarray) -> np.ndarray:
        """A speaker vector -> the TTS LM's first input (1, D_tts); zeros give the learned start vector."""
        return self.speaker_projection.run({"speaker": np.asarray(speaker, np.float32).reshape(1, 1, -1)})[0][0]

    def speaker_input(self, speaker: np.ndarray | None) -> np.ndarray:
        if speaker is None:
            return self._default_speaker
        speaker = np.asarray(speaker, np.float32).reshape(-1)
        if speaker.shape != (self.speaker_dim,) or not np.isfinite(speaker).all():
            raise ValueError(f"speaker vector: expected {self.speaker_dim} finite values, got {speaker.size}")
        return self.project_speaker(speaker)

    def check_audio(self, wav: np.ndarray) -> None:
        """Refuse an utterance the audio graph was not made for, before any work starts."""
        wav = np.asarray(wav)
        if wav.size == 0:
            raise AudioTooLong("the utterance has no samples")
        if not np.isfinite(wav).all():
            raise AudioTooLong(f"the utterance holds {int((~np.isfinite(wav)).sum())} NaN or Inf samples")
        seconds = wav.size / self.frontend.sample_rate
        if seconds > self.max_audio_seconds:
            raise AudioTooLong(f"the utterance is {seconds:.1f} s; this engine takes at most "
                               f"{self.max_audio_seconds:g} s (export with a larger --max-audio-seconds)")

    def encode_audio(self, wav: np.ndarray) -> np.ndarray:
        """Mono samples at the frontend's rate -> the valid adapter embeddings (T, D_llm)."""
        features, length = audio_features(wav, self.frontend)
        embeds, valid = self.audio.run({"input_features": features, "feature_length": np.array([length], np.int64)})
        return embeds[0, : int(valid[0])]

    # -- conversations --------------------------------------------------------------------------------
    def conversation(self, system_prompt: str | None = None, speaker: np.ndarray | None = None,
                     history: Sequence[Any] = ()) -> Any:
        """A new conversation: its own KV caches, history, speaker and token2wav state."""
        from .conversation import Conversation

        return Conversation(self, self.system_prompt if system_prompt is None else system_prompt, speaker,
                            history)

    def turn(self, wav: np.ndarray, options: TurnOptions | None = None, text: str = "",
             on_step: OnStep | None = None) -> Iterator[Event]:
        """One utterance without memory: the input is checked now, the work happens as events are consumed."""
        options = options or TurnOptions()
        conversation = self.oneshot()
        conversation.reset(options.system_prompt)
        return conversation.turn(wav, text, options, on_step=on_step)

    def oneshot(self) -> Any:
        """The conversation `turn` reuses (its decoders are what a one-utterance benchmark or test drives)."""
        if self._oneshot is None:
            self._oneshot = self.conversation()
        return self._oneshot
