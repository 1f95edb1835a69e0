"""One voice turn on a bundle: speech in, text and streamed speech out, as a stream of timed events.

```
wav -> log-mel (numpy) -> audio graph -> prompt splice -> interleave(LLM graph, TTS graph)
                                                              | speech tokens
                                                              v
                                              Token2WavStream(flow, estimator, HiFT graphs) -> PCM
```
Sessions, caches and buffers are created once per `VoiceEngine`; a turn resets positions only.

The turn logic exists once, over three small protocols that each backend implements (`Graph`, `Decoder`, and
the token2wav backend of token2wav_stream, which `GraphToken2Wav` builds from three `Graph`s):
onnxruntime (`onnx_backend.OnnxRuntimeBackend`: CPU, CUDA EP, TensorRT EP) and native TensorRT
(`trt_backend.TensorRTBackend`, loaded only when asked for, so neither tensorrt nor cuda-python is imported
otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .audio import Frontend, audio_features
from .bundle import Bundle
from .decoding import DecodeOptions, GenerationDefaults, interleave_config, make_samplers
from .interleave import InterleaveResult, interleave
from .onnx_backend import BackendError, ContextFull, OnnxRuntimeBackend, OrtGraph, make_session
from .prompt import AUDIO_PLACEHOLDER_ID, PromptBuilder, SpeechVocab
from .token2wav_stream import DecoderSpec, StreamConfig, Token2WavStream


@dataclass
class TurnOptions(DecodeOptions):
    stream: StreamConfig = field(default_factory=StreamConfig)


class Graph(Protocol):
    """A single-shot graph: named host arrays in (any float dtype; the backend casts to the graph's own), host
    arrays out in the graph's output order, float outputs as float32."""

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Decoder(Protocol):
    """A decoder graph with its KV cache held by the backend (see export/README.md, the decoder contract).
    `run(embeds)` feeds (T, D) rows at `pos`, advances `pos` by T and returns the last row of each result
    output ("logits", "hidden") as float32; it raises ContextFull instead of running past `max_len`."""

    pos: int
    max_len: int
    embed_dtype: Any  # the host dtype `run` takes and `embed` returns

    def reset(self) -> None: ...

    def embed(self, ids: Sequence[int]) -> np.ndarray: ...

    def run(self, embeds: np.ndarray) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    """Makes the graphs of one bundle runnable; VoiceEngine asks for each by its bundle name."""

    name: str

    def graph(self, name: str) -> Graph: ...

    def decoder(self, name: str, embed_table: np.ndarray) -> Decoder: ...

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


@dataclass
class Latency:
    first_text_s: float | None = None
    first_audio_s: float | None = None
    total_s: float = 0.0
    audio_s: float = 0.0
    encode_s: float = 0.0

    @property
    def rtf(self) -> float | None:
        """Real-time factor: turn wall time over seconds of reply audio (< 1 is faster than real time)."""
        return self.total_s / self.audio_s if self.audio_s else None

    def to_json(self) -> dict:
        return {"first_text_s": self.first_text_s, "first_audio_s": self.first_audio_s, "total_s": self.total_s,
                "audio_s": self.audio_s, "encode_s": self.encode_s, "rtf": self.rtf}


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
    stopped: str  # "eos", "budget" or "context"

    def to_json(self) -> dict:
        return {"text": self.text, "text_ids": self.text_ids, "speech_ids": self.speech_ids,
                "speech_units": self.speech_units, "latency": self.latency.to_json()}


Event = TextDelta | SpeechToken | AudioChunk | TurnDone


class _TextDecoder:
    def __init__(self, decoder: Decoder, prompt_embeds: np.ndarray):
        self.decoder, self.prompt_embeds = decoder, prompt_embeds

    def prefill(self) -> tuple[np.ndarray, np.ndarray]:
        self.decoder.reset()
        out = self.decoder.run(self.prompt_embeds)
        return out["logits"], out["hidden"]

    def step(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        out = self.decoder.run(self.decoder.embed([token]))
        return out["logits"], out["hidden"]


class _SpeechDecoder:
    def __init__(self, engine: VoiceEngine):
        self.decoder = engine.tts
        self.engine = engine

    def start(self) -> None:
        self.decoder.reset()
        self.decoder.run(self.engine.speaker_start)

    def feed_hidden(self, hidden: np.ndarray) -> np.ndarray:
        projected = self.engine.project_hidden(hidden)
        return self.decoder.run(projected)["logits"]

    def step(self, token: int) -> np.ndarray:
        return self.decoder.run(self.decoder.embed([token]))["logits"]


class GraphToken2Wav:
    """The streaming token2wav protocol on the bundle's flow, estimator and HiFT graphs, on any backend."""

    def __init__(self, spec: DecoderSpec, flow: Graph, estimator: Graph, hift: Graph):
        self.spec, self.flow, self.estimator, self.hift = spec, flow, estimator, hift

    @classmethod
    def from_backend(cls, bundle: Bundle, backend: Backend) -> GraphToken2Wav:
        return cls(DecoderSpec(**bundle.manifest["token2wav"]["spec"]), backend.graph("flow"),
                   backend.graph("estimator"), backend.graph("hift"))

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
        super().__init__(DecoderSpec(**bundle.manifest["token2wav"]["spec"]),
                         *(OrtGraph(make_session(bundle.graph_path(name), providers, threads))
                           for name in ("flow", "estimator", "hift")))


class AudioTooLong(ValueError):
    """The utterance is empty or longer than the audio graph's profile."""


class VoiceEngine:
    """A loaded bundle, ready to answer turns. Not thread-safe: one turn at a time."""

    def __init__(self, bundle: Bundle, providers: tuple[str, ...] = ("cpu",), threads: int = 0, *,
                 backend: str | Backend = "onnxruntime", engines: str | None = None, cuda_graphs: bool = True):
        """`backend`: "onnxruntime" (on `providers`: cpu, cuda, tensorrt EPs), "tensorrt" (the bundle's engine
        set, picked for this GPU or by `engines` key; `cuda_graphs` replays each decode step as one CUDA graph),
        or a backend object."""
        self.bundle = bundle
        m = bundle.manifest
        self.frontend = Frontend.from_json(m["audio"])
        self.backend = make_backend(backend, bundle, providers, threads, engines, cuda_graphs) \
            if isinstance(backend, str) else backend
        self.prompt = PromptBuilder.from_folder(bundle.root)
        t = m["speech_tokens"]
        self.vocab = SpeechVocab(offset=t["offset"], eos_ids=tuple(t["eos_ids"]), count=t["count"])
        self.audio = self.backend.graph("audio_encoder")
        self.llm = self.backend.decoder("llm", bundle.array("llm_embed"))
        self.tts = self.backend.decoder("tts_lm", bundle.array("tts_embed"))
        self.tts_projection = self.backend.graph("tts_projection")
        self.speaker_projection = self.backend.graph("speaker_projection")
        self.speaker_start = self.project_speaker(np.zeros(m["tts"]["speaker_dim"], np.float32))
        self.token2wav = GraphToken2Wav.from_backend(bundle, self.backend)
        g = m["generation"]
        self.defaults = GenerationDefaults(tuple(g["text_eos_ids"]), g["max_text_tokens"], tuple(g["speech_eos_ids"]),
                                           g["max_speech_tokens"])

    # -- small graphs --------------------------------------------------------------------------------
    def project_hidden(self, hidden: np.ndarray) -> np.ndarray:
        """LLM final-norm hidden states (k, D_llm) -> TTS LM inputs (k, D_tts)."""
        return self.tts_projection.run({"llm_hidden": hidden[None]})[0][0]

    def project_speaker(self, speaker: np.ndarray) -> np.ndarray:
        """A speaker vector -> the TTS LM's first input (1, D_tts); zeros give the learned start vector."""
        return self.speaker_projection.run({"speaker": speaker.reshape(1, 1, -1)})[0][0]

    def encode_audio(self, wav: np.ndarray) -> np.ndarray:
        """Mono samples at the frontend's rate -> the valid adapter embeddings (T, D_llm)."""
        features, length = audio_features(wav, self.frontend)
        embeds, valid = self.audio.run({"input_features": features, "feature_length": np.array([length], np.int64)})
        return embeds[0, : int(valid[0])]

    # -- one turn ------------------------------------------------------------------------------------
    def check_audio(self, wav: np.ndarray) -> None:
        """Refuse an utterance the audio graph was not exported for, before any work starts."""
        limit_s = self.bundle.graph("audio_encoder")["limits"]["max_windows"] * self.frontend.window_seconds
        seconds = wav.size / self.frontend.sample_rate
        if wav.size == 0:
            raise AudioTooLong("the utterance has no samples")
        if seconds > limit_s:
            raise AudioTooLong(f"the utterance is {seconds:.1f} s; this bundle's audio graph takes at most "
                               f"{limit_s} s (export with a larger --max-audio-seconds)")

    def turn(self, wav: np.ndarray, options: TurnOptions | None = None) -> Iterator[Event]:
        """Check the input now, then return the turn's event stream (work happens as it is consumed)."""
        self.check_audio(wav)
        return self._turn(wav, options or TurnOptions())

    def _turn(self, wav: np.ndarray, options: TurnOptions) -> Iterator[Event]:
        t0 = time.perf_counter()
        latency = Latency()
        audio_embeds = self.encode_audio(wav)
        latency.encode_s = time.perf_counter() - t0
        prompt_ids = self.prompt.prompt_ids(options.system_prompt)
        cut = prompt_ids.index(AUDIO_PLACEHOLDER_ID)
        prompt_embeds = np.concatenate([self.llm.embed(prompt_ids[:cut]), audio_embeds.astype(self.llm.embed_dtype),
                                        self.llm.embed(prompt_ids[cut + 1:])])
        cfg = interleave_config(self.bundle.manifest["interleave_strategy"], self.defaults, options)
        text_sampler, speech_sampler = make_samplers(options, self.vocab)
        stream = Token2WavStream(self.token2wav, options.stream, seed=options.seed)
        result = InterleaveResult()
        pieces: list[np.ndarray] = []
        text_so_far = ""
        stopped = "budget"
        sample_rate = self.token2wav.spec.sample_rate

        def emit_audio(pcm: np.ndarray) -> Iterator[AudioChunk]:
            if pcm.size:
                now = time.perf_counter() - t0
                if latency.first_audio_s is None:
                    latency.first_audio_s = now
                pieces.append(pcm)
                yield AudioChunk(now, pcm, sample_rate)

        schedule = interleave(_TextDecoder(self.llm, prompt_embeds), _SpeechDecoder(self), cfg, text_sampler,
                              speech_sampler, result)
        try:
            for event in schedule:
                now = time.perf_counter() - t0
                if event.kind == "text":
                    if latency.first_text_s is None:
                        latency.first_text_s = now
                    if event.token in cfg.text_eos_ids:
                        stopped = "eos"
                    full = self.prompt.decode(result.text_ids)
                    # A token may end inside a UTF-8 character: hold the text back until it completes.
                    delta = "" if full.endswith("\ufffd") else full[len(text_so_far):]
                    text_so_far += delta
                    yield TextDelta(now, event.token, delta)
                else:
                    yield SpeechToken(now, event.token)
                    if self.vocab.is_eos(event.token):
                        continue
                    unit = self.vocab.to_units([event.token])
                    yield from emit_audio(stream.push(unit))
        except ContextFull:
            stopped = "context"
        yield from emit_audio(stream.finalize())
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        latency.total_s = time.perf_counter() - t0
        latency.audio_s = audio.shape[0] / sample_rate
        speech_ids = [i for i in result.speech_ids if not self.vocab.is_eos(i)]
        yield TurnDone(latency.total_s, self.prompt.decode(result.text_ids), result.text_ids, speech_ids,
                       self.vocab.to_units(speech_ids), audio, sample_rate, latency, stopped)
