"""The bundle manifest's schema, written once: export builds a `Manifest` and writes `to_json()`, the runtime and
the benchmarks read `Manifest.from_json()`, which checks every structural field and names what is wrong.

```
format_version, dtype, form, source, versions, interleave_strategy
generation     GenerationDefaults (eos ids, budgets)        speech_tokens  SpeechVocab (offset, count, eos ids)
prompt         placeholder id, default system prompt        audio          Frontend + max_seconds
llm, tts       LMSpec (sizes, cache length)                 token2wav      DecoderSpec
graphs         name -> GraphEntry (file, IO, dtype, form, limits, verification)
arrays         name -> ArrayEntry                           files          path -> FileEntry (sha256, size)
engines        TensorRT engine sets (runtime/engines.py owns their meaning), optional
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .audio import Frontend
from .decoding import GenerationDefaults
from .prompt import SpeechVocab
from .token2wav_stream import DecoderSpec

FORMAT_VERSION = 2


class ManifestError(ValueError):
    """A manifest whose structure is not this version's (a missing section, a field of the wrong type)."""


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "an object",
          list: "a list"}


def _get(d: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any = dataclasses.MISSING) -> Any:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        if default is not dataclasses.MISSING:
            return default
        raise ManifestError(f"{where}: missing {key!r}")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join(_KINDS.get(k, k.__name__) for k in kinds)
        raise ManifestError(f"{where}.{key}: expected {names}, got {type(value).__name__} {value!r:.40}")
    return value


def _ints(d: dict, key: str, where: str) -> tuple[int, ...]:
    values = _get(d, key, list, where)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ManifestError(f"{where}.{key}: expected a non-empty list of integers, got {values!r:.60}")
    return tuple(values)


def _from(cls: type, d: dict, where: str, **overrides: Any) -> Any:
    """A flat dataclass from an object of the same field names, each type-checked."""
    kinds = {"int": int, "float": float, "str": str, "bool": bool, int: int, float: float, str: str, bool: bool}
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            continue
        kind = kinds[f.type]
        has_default = f.default is not dataclasses.MISSING
        values[f.name] = _get(d, f.name, kind, where, f.default if has_default else dataclasses.MISSING)
    return cls(**values, **overrides)


@dataclass(frozen=True)
class LMSpec:
    hidden_size: int
    vocab_size: int
    layers: int
    kv_heads: int
    head_dim: int
    max_context: int
    tied_embeddings: bool
    speaker_dim: int = 0  # the TTS LM's speaker vector width (0 for the LLM)


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphEntry:
    file: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    dtype: str
    form: str
    opset: int
    limits: dict[str, int] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # input bound to the same buffer as an output
    max_deviation: float = 0.0
    tolerance: float = 0.0
    deviation: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # fields a newer export adds (weights, quantization, ...)

    def to_json(self) -> dict:
        return {"file": self.file, "inputs": [i.to_json() for i in self.inputs],
                "outputs": [o.to_json() for o in self.outputs], "dtype": self.dtype, "form": self.form,
                "opset": self.opset, "limits": dict(self.limits), "aliases": dict(self.aliases),
                "max_deviation": self.max_deviation, "tolerance": self.tolerance, "deviation": dict(self.deviation),
                **self.extra}

    @classmethod
    def from_json(cls, d: dict, where: str) -> GraphEntry:
        def io(key: str) -> tuple[IOSpec, ...]:
            out = []
            for i, item in enumerate(_get(d, key, list, where)):
                w = f"{where}.{key}[{i}]"
                shape = _get(item, "shape", list, w)
                if not all(isinstance(s, (int, str)) and not isinstance(s, bool) for s in shape):
                    raise ManifestError(f"{w}.shape: expected integers and dimension names, got {shape!r:.60}")
                out.append(IOSpec(_get(item, "name", str, w), _get(item, "dtype", str, w), tuple(shape)))
            return tuple(out)

        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        limits = _get(d, "limits", dict, where, {})
        if not all(isinstance(v, int) for v in limits.values()):
            raise ManifestError(f"{where}.limits: expected integer limits, got {limits!r:.60}")
        return cls(file=_get(d, "file", str, where), inputs=io("inputs"), outputs=io("outputs"),
                   dtype=_get(d, "dtype", str, where), form=_get(d, "form", str, where),
                   opset=_get(d, "opset", int, where), limits=limits,
                   aliases=_get(d, "aliases", dict, where, {}),
                   max_deviation=_get(d, "max_deviation", float, where, 0.0),
                   tolerance=_get(d, "tolerance", float, where, 0.0),
                   deviation=_get(d, "deviation", dict, where, {}),
                   extra={k: v for k, v in d.items() if k not in known})


@dataclass(frozen=True)
class ArrayEntry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    storage: str = ""  # "uint16" for bf16 tables stored as bit patterns

    def to_json(self) -> dict:
        out = {"file": self.file, "dtype": self.dtype, "shape": list(self.shape)}
        return {**out, "storage": self.storage} if self.storage else out


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    dtype: str
    form: str
    interleave_strategy: str
    generation: GenerationDefaults
    speech_tokens: SpeechVocab
    audio: Frontend
    max_audio_seconds: int
    llm: LMSpec
    tts: LMSpec
    token2wav: DecoderSpec
    graphs: dict[str, GraphEntry]
    arrays: dict[str, ArrayEntry]
    files: dict[str, FileEntry] = field(default_factory=dict)
    system_prompt: str = "You are a helpful assistant."
    audio_placeholder_id: int = -200
    source: dict[str, str] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    engines: Any = None  # TensorRT engine sets: runtime/engines.py reads and writes them
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level sections (a speech tokenizer's, ...)

    def graph(self, name: str) -> GraphEntry:
        if name not in self.graphs:
            raise ManifestError(f"the bundle has no graph {name!r} (has: {', '.join(self.graphs)})")
        return self.graphs[name]

    def to_json(self) -> dict:
        g, v = self.generation, self.speech_tokens
        out = {
            "format_version": FORMAT_VERSION, "dtype": self.dtype, "form": self.form, "source": dict(self.source),
            "versions": dict(self.versions), "interleave_strategy": self.interleave_strategy,
            "generation": {"text_eos_ids": list(g.text_eos_ids), "max_text_tokens": g.max_text_tokens,
                           "speech_eos_ids": list(g.speech_eos_ids), "max_speech_tokens": g.max_speech_tokens},
            "speech_tokens": {"offset": v.offset, "count": v.count, "eos_ids": list(v.eos_ids)},
            "prompt": {"audio_placeholder_id": self.audio_placeholder_id, "system_prompt": self.system_prompt},
            "audio": {**self.audio.to_json(), "max_seconds": self.max_audio_seconds},
            "llm": dataclasses.asdict(self.llm), "tts": dataclasses.asdict(self.tts),
            "token2wav": {"spec": dataclasses.asdict(self.token2wav)},
            "graphs": {k: e.to_json() for k, e in self.graphs.items()},
            "arrays": {k: e.to_json() for k, e in self.arrays.items()},
            "files": {k: {"sha256": f.sha256, "size": f.size} for k, f in self.files.items()},
            **self.extra,
        }
        if self.engines is not None:
            out["engines"] = self.engines
        return out

    @classmethod
    def from_json(cls, d: Any, where: str = "manifest.json") -> Manifest:
        """Check and read a manifest; ManifestError names the file, the field and what was expected."""
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{where}: bundle format version {version!r}; this runtime reads version "
                                f"{FORMAT_VERSION} (re-export with a matching opens2s-edge)")
        gen = _get(d, "generation", dict, where)
        w = f"{where}.generation"
        generation = GenerationDefaults(_ints(gen, "text_eos_ids", w), _get(gen, "max_text_tokens", int, w),
                                        _ints(gen, "speech_eos_ids", w), _get(gen, "max_speech_tokens", int, w))
        tok = _get(d, "speech_tokens", dict, where)
        w = f"{where}.speech_tokens"
        vocab = SpeechVocab(_get(tok, "offset", int, w), _ints(tok, "eos_ids", w), _get(tok, "count", int, w))
        audio_d = _get(d, "audio", dict, where)
        try:
            audio = Frontend.from_json(audio_d)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{where}.audio: expected the frontend's settings ({exc})") from exc
        t2w = _get(_get(d, "token2wav", dict, where), "spec", dict, f"{where}.token2wav")
        graphs = {k: GraphEntry.from_json(e, f"{where}.graphs.{k}")
                  for k, e in _get(d, "graphs", dict, where).items()}
        arrays = {}
        for k, e in _get(d, "arrays", dict, where).items():
            w = f"{where}.arrays.{k}"
            arrays[k] = ArrayEntry(_get(e, "file", str, w), _get(e, "dtype", str, w),
                                   tuple(_get(e, "shape", list, w)), _get(e, "storage", str, w, ""))
        files = {}
        for k, e in _get(d, "files", dict, where).items():
            w = f"{where}.files[{k!r}]"
            files[k] = FileEntry(_get(e, "sha256", str, w), _get(e, "size", int, w))
        prompt = _get(d, "prompt", dict, where, {})
        known = {"format_version", "dtype", "form", "source", "versions", "interleave_strategy", "generation",
                 "speech_tokens", "prompt", "audio", "llm", "tts", "token2wav", "graphs", "arrays", "files",
                 "engines"}
        strategy = _get(d, "interleave_strategy", str, where)
        from .interleave import parse_strategy

        try:
            parse_strategy(strategy)
        except ValueError as exc:
            raise ManifestError(f"{where}.interleave_strategy: {exc}") from exc
        return cls(
            dtype=_get(d, "dtype", str, where), form=_get(d, "form", str, where), interleave_strategy=strategy,
            generation=generation, speech_tokens=vocab, audio=audio,
            max_audio_seconds=_get(audio_d, "max_seconds", int, f"{where}.audio"),
            llm=_from(LMSpec, _get(d, "llm", dict, where), f"{where}.llm"),
            tts=_from(LMSpec, _get(d, "tts", dict, where), f"{where}.tts"),
            token2wav=_from(DecoderSpec, t2w, f"{where}.token2wav.spec"),
            graphs=graphs, arrays=arrays, files=files,
            system_prompt=_get(prompt, "system_prompt", str, f"{where}.prompt", "You are a helpful assistant."),
            audio_placeholder_id=_get(prompt, "audio_placeholder_id", int, f"{where}.prompt", -200),
            source=_get(d, "source", dict, where, {}), versions=_get(d, "versions", dict, where, {}),
            engines=d.get("engines"), extra={k: v for k, v in d.items() if k not in known})
