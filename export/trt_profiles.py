"""TensorRT optimization profiles for a bundle's graphs, derived from its manifest alone.

A profile gives every dynamic input a (min, opt, max) shape; TensorRT tunes kernels for `opt` and the engine accepts
any shape in [min, max]. Each graph's symbolic dims (manifest["graphs"][g]["inputs"][i]["shape"], strings such as
"tokens" or "frames") get one range per profile from a rule below, and every input's shape is then spelled out from
those symbol ranges, so inputs that share a symbol always share a range (the estimator's x, mu, cond and mask all
have "frames") and an unknown symbol is an error instead of a silently unbounded dim.

Where the ranges come from:
- decoders (llm, tts_lm): a "prefill" profile, 1..max_context rows, and a "decode" profile of exactly 1 row, so the
  decode step has one fixed shape (what CUDA graph capture needs); the caches are static (1, kv_heads, MAX, head_dim)
  in the graph already. The `start` scalar gets a value range 0..MAX-1 in case TensorRT treats it as a shape tensor.
- token2wav (flow, estimator, hift): the chunk lengths streaming asks for, computed from
  runtime/token2wav_stream.StreamConfig and the decoder spec (manifest["token2wav"]["spec"]); the estimator's batch
  of 2 (conditional + unconditional CFG pass) is static in the graph.
- audio_encoder: whole 30 s windows, 1..limits["max_windows"].
- tts_projection: 1..max_context rows (M hidden states per interleave chunk is the usual call).

Pure Python on the manifest: no tensorrt, no onnx, no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from opens2s_edge.runtime.interleave import parse_strategy
from opens2s_edge.runtime.token2wav_stream import DecoderSpec, StreamConfig

# Prefill length TensorRT tunes the LLM for: a system prompt, chat template and a few seconds of speech at 6.25 Hz
# come to roughly a hundred rows.
LLM_PREFILL_OPT = 128

Range = tuple[int, int, int]


class ProfileError(ValueError):
    """A graph's inputs cannot be given a profile (an unknown symbolic dim, a range that is empty)."""


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[list[int], list[int], list[int]]]  # input -> (min, opt, max) shape
    values: dict[str, Range] = field(default_factory=dict)  # int scalar inputs -> value range, if a shape tensor

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}
        if self.values:
            out["values"] = {k: list(v) for k, v in self.values.items()}
        return out

    def is_static(self, name: str) -> bool:
        lo, _, hi = self.shapes[name]
        return lo == hi


@dataclass(frozen=True)
class _Rule:
    """Symbol ranges for each profile of one graph."""

    profiles: list[tuple[str, dict[str, Range]]]
    values: dict[str, Range] = field(default_factory=dict)


def _check(name: str, rng: Range) -> Range:
    lo, opt, hi = rng
    if not 1 <= lo <= opt <= hi:
        raise ProfileError(f"symbol {name!r}: range min {lo}, opt {opt}, max {hi} is not 1 <= min <= opt <= max")
    return rng


def text_span(manifest: dict) -> int:
    """M of the interleave strategy "M:N": LLM hidden states fed to the TTS LM per chunk."""
    return parse_strategy(str(manifest.get("interleave_strategy", "4:8")))[0]


def stream_ranges(spec: DecoderSpec, stream: StreamConfig) -> dict[str, Range]:
    """Token and mel-frame counts one streaming call can have (see Token2WavStream._flow_chunk / _vocode).

    flow tokens: a chunk is at most max(first_chunk, chunk) tokens, preceded by a window that starts on an encoder
    block, so start - window_start <= window + block - 1; a last chunk can be a single token. Its steady state is a
    full window plus a chunk.
    estimator frames: the flow's mel frames for those token counts, spec.frames(n).
    hift frames: a call covers vocoder_context frames already sent, vocoder_lookahead frames held back from the last
    call, and what this chunk commits: its own frames (+1 for rounding) plus, at the end, the mel_overlap frames
    held back for cross-fading.
    """
    stream.check(spec)
    largest = max(stream.first_chunk, stream.chunk)
    tokens = (1, min(stream.window + stream.chunk, stream.max_window_tokens(spec)), stream.max_window_tokens(spec))
    frames = tuple(spec.frames(n) for n in tokens)
    around = stream.vocoder_context + stream.vocoder_lookahead
    vocoder = (1, around + spec.frames(stream.chunk), around + stream.mel_overlap + spec.frames(largest) + 1)
    return {"flow_tokens": tokens, "estimator_frames": frames, "hift_frames": vocoder}  # type: ignore[dict-item]


def _rules(manifest: dict, stream: StreamConfig) -> dict[str, Callable[[dict], _Rule]]:
    spec = DecoderSpec(**manifest["token2wav"]["spec"]) if "token2wav" in manifest else DecoderSpec()
    m = text_span(manifest)
    llm_max = manifest.get("llm", {}).get("max_context") or manifest["graphs"]["llm"]["limits"]["max_context"]

    def decoder(opt: int) -> Callable[[dict], _Rule]:
        def rule(graph: dict) -> _Rule:
            top = int(graph["limits"]["max_context"])
            return _Rule([("prefill", {"tokens": (1, min(opt, top), top)}), ("decode", {"tokens": (1, 1, 1)})],
                         values={"start": (0, min(opt, top - 1), top - 1)})
        return rule

    def audio(graph: dict) -> _Rule:
        window, most = int(graph["limits"]["window_frames"]), int(graph["limits"]["max_windows"])
        return _Rule([("default", {"frames": (window, window, window * most)})])

    ranges = stream_ranges(spec, stream)
    hift = ranges["hift_frames"]
    return {
        "llm": decoder(LLM_PREFILL_OPT),
        "tts_lm": decoder(m),
        "audio_encoder": audio,
        "tts_projection": lambda g: _Rule([("default", {"rows": (1, min(m, llm_max), llm_max)})]),
        "flow": lambda g: _Rule([("default", {"tokens": ranges["flow_tokens"]})]),
        "estimator": lambda g: _Rule([("default", {"frames": ranges["estimator_frames"]})]),
        "hift": lambda g: _Rule([("default", {"frames": hift,
                                              "samples": tuple(spec.hop * f for f in hift)})]),  # type: ignore[dict-item]
    }


def graph_profiles(name: str, graph: dict, rule: _Rule | None) -> list[Profile]:
    """Spell out every input's (min, opt, max) shape from the rule's symbol ranges."""
    dynamic = {d for i in graph["inputs"] for d in i["shape"] if isinstance(d, str)}
    if rule is None:
        if dynamic:
            raise ProfileError(f"graph {name!r} has dynamic dims {sorted(dynamic)} but no profile rule: "
                               "add one to export/trt_profiles.py")
        rule = _Rule([("default", {})])
    profiles = []
    for profile_name, symbols in rule.profiles:
        missing = dynamic - set(symbols)
        if missing:
            raise ProfileError(f"graph {name!r} profile {profile_name!r}: no range for symbolic dims {sorted(missing)}")
        for sym, rng in symbols.items():
            _check(f"{name}.{sym}", rng)
        shapes = {}
        for inp in graph["inputs"]:
            lo, opt, hi = ([symbols[d][k] if isinstance(d, str) else int(d) for d in inp["shape"]] for k in range(3))
            shapes[inp["name"]] = (lo, opt, hi)
        values = {k: v for k, v in rule.values.items() if any(i["name"] == k for i in graph["inputs"])}
        profiles.append(Profile(profile_name, shapes, values))
    return profiles


def derive_profiles(manifest: dict, stream: StreamConfig | None = None,
                    graphs: list[str] | None = None) -> dict[str, list[Profile]]:
    """Optimization profiles for every graph of the bundle (or those named), in the order TensorRT will index them."""
    stream = stream or StreamConfig()
    rules = _rules(manifest, stream)
    names = graphs if graphs is not None else list(manifest["graphs"])
    out = {}
    for name in names:
        if name not in manifest["graphs"]:
            raise ProfileError(f"bundle has no graph {name!r} (has: {', '.join(manifest['graphs'])})")
        graph = manifest["graphs"][name]
        out[name] = graph_profiles(name, graph, rules[name](graph) if name in rules else None)
    return out


def stream_record(stream: StreamConfig | None = None) -> dict:
    """The streaming settings the token2wav profiles were derived for (recorded with the engine set, so a runtime
    with larger chunks can refuse instead of failing inside TensorRT)."""
    return asdict(stream or StreamConfig())


def describe(profiles: dict[str, list[Profile]]) -> list[str]:
    """Human-readable lines, one per dynamic input per profile."""
    lines = []
    for name, plist in profiles.items():
        # An input is shown if any profile of its graph lets it vary (the decode profile pins "tokens" to 1).
        varying = {k for p in plist for k in p.shapes if not p.is_static(k)}
        for p in plist:
            body = ", ".join(f"{k} {_fmt(v[0])}..{_fmt(v[2])} (opt {_fmt(v[1])})" if v[0] != v[2]
                             else f"{k} {_fmt(v[0])} (fixed)" for k, v in p.shapes.items() if k in varying)
            lines.append(f"{name} [{p.name}]: {body or 'static shapes'}"
                         + "".join(f"; {k} values {lo}..{hi}" for k, (lo, _, hi) in p.values.items()))
    return lines


def _fmt(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"
