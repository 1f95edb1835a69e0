"""Accuracy of reduced-precision bundles, measured against the fp32 bundle on the same inputs: never assumed.

```
python -m opens2s_edge.benchmarks.accuracy REFERENCE_BUNDLE BUNDLE [BUNDLE ...] [--audio IN.wav]
       [--text-tokens 64] [--speech-tokens 256] [--flow-steps 10,8,6,4] [--threads 1] [--out accuracy.json]
```

1. The reference bundle (fp32) answers one greedy turn; its text ids and speech ids are the reply.
2. Every bundle (the reference too, as a check: its figures must be exact) is then *teacher-forced* through the same
   interleaved schedule (runtime/interleave.py, the one definition): its samplers record the logits they are given
   and return the reference's tokens, so each bundle's LLM and TTS LM see the same reply. Each bundle uses its own
   audio encoder, projections and LLM hidden states, so what is measured is the whole decoder path at its precision.
   - per decoder: the logits' SNR in dB (10 log10 sum ref^2 / sum (x - ref)^2 over every step and id), the mean
     KL divergence KL(p_ref || p) of the softmaxes in nats per step, and top-1 agreement (the TTS LM over the ids
     its sampler may pick: speech tokens and EOS).
3. token2wav: the reference's speech units through each bundle's flow + estimator + HiFT (non-streamed, seed 0):
   the mel's max and mean absolute deviation and SNR, the waveform's SNR, and the log-spectral distance (dB) of
   the two waveforms' STFTs.
4. `--flow-steps`: the reference bundle's token2wav with fewer Euler steps, against its own 10-step output, with
   the estimator's time per synthesis.

Random weights (`opens2s-edge init`) are a worst case for int4: their weights are Gaussian with no outliers
structure and their logits nearly flat, so a small absolute error flips argmaxes that trained weights keep. The
printed table says so beside the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

RANDOM_WEIGHTS_NOTE = ("random weights are a worst case for int4 (no trained outlier structure, near-flat logits: "
                       "small errors flip the argmax); trained weights are expected to fare better, not measured here")


# -- a bundle on onnxruntime, driven through the interleave schedule -------------------------------------------------
@dataclass
class _Recorder:
    """A sampler that records the logits it is shown and returns either its own pick or the forced token."""

    pick: Any  # the bundle's own sampler (reference run) or None (teacher-forced)
    forced: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    picked: list[int] = field(default_factory=list)

    def __call__(self, row: np.ndarray) -> int:
        self.logits.append(np.asarray(row, np.float32).copy())
        token = int(self.pick(row)) if self.pick is not None else self.forced[len(self.logits) - 1]
        self.picked.append(token)
        return token


class _Text:
    def __init__(self, decoder: Any, prompt_embeds: np.ndarray):
        self.decoder, self.prompt = decoder, prompt_embeds

    def prefill(self) -> tuple[np.ndarray, np.ndarray]:
        self.decoder.reset()
        out = self.decoder.run(self.prompt)
        return out["logits"], out["hidden"]

    def step(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        out = self.decoder.run(self.decoder.embed([token]))
        return out["logits"], out["hidden"]


class _Speech:
    def __init__(self, decoder: Any, projection: Any, start: np.ndarray):
        self.decoder, self.projection, self.start_input = decoder, projection, start

    def start(self) -> None:
        self.decoder.reset()
        self.decoder.run(self.start_input)

    def feed_hidden(self, hidden: np.ndarray) -> np.ndarray:
        rows = self.projection.run({"llm_hidden": hidden[None]})[0][0]
        return self.decoder.run(rows)["logits"]

    def step(self, token: int) -> np.ndarray:
        return self.decoder.run(self.decoder.embed([token]))["logits"]


class BundleRunner:
    """One bundle's graphs on onnxruntime CPU, for teacher-forced turns and token2wav."""

    def __init__(self, path: Path, threads: int = 1):
        from opens2s_edge.runtime.bundle import load_bundle
        from opens2s_edge.runtime.engine import GraphToken2Wav
        from opens2s_edge.runtime.onnx_backend import OnnxRuntimeBackend
        from opens2s_edge.runtime.prompt import PromptBuilder, SpeechVocab

        self.path = path
        self.bundle = load_bundle(path, verify=False)
        m = self.bundle.manifest
        self.backend = OnnxRuntimeBackend(self.bundle, ("cpu",), threads)
        self.prompt = PromptBuilder.from_folder(self.bundle.root)
        t = m["speech_tokens"]
        self.vocab = SpeechVocab(offset=t["offset"], eos_ids=tuple(t["eos_ids"]), count=t["count"])
        self.llm = self.backend.decoder("llm", self.bundle.array("llm_embed"))
        self.tts = self.backend.decoder("tts_lm", self.bundle.array("tts_embed"))
        self.audio = self.backend.graph("audio_encoder")
        self.projection = self.backend.graph("tts_projection")
        speaker = self.backend.graph("speaker_projection").run(
            {"speaker": np.zeros((1, 1, m["tts"]["speaker_dim"]), np.float32)})[0][0]
        self.speaker_start = speaker
        self.token2wav = GraphToken2Wav.from_backend(self.bundle, self.backend)

    def describe(self) -> dict[str, Any]:
        m = self.bundle.manifest
        graphs = m["graphs"]
        return {"bundle": str(self.path), "dtype": m.get("dtype"), "form": m.get("form"),
                "weights": m.get("weights", "float"),
                "quantized_graphs": {g: {k: e["weights"][k] for k in ("weights", "block_size", "symmetric",
                                                                      "accuracy_level")}
                                     for g, e in graphs.items() if "weights" in e}}

    def prompt_embeds(self, wav: np.ndarray) -> np.ndarray:
        from opens2s_edge.runtime.audio import Frontend, audio_features
        from opens2s_edge.runtime.prompt import AUDIO_PLACEHOLDER_ID

        frontend = Frontend.from_json(self.bundle.manifest["audio"])
        features, length = audio_features(wav, frontend)
        embeds, valid = self.audio.run({"input_features": features, "feature_length": np.array([length], np.int64)})
        audio = embeds[0, : int(valid[0])]
        ids = self.prompt.prompt_ids()
        cut = ids.index(AUDIO_PLACEHOLDER_ID)
        return np.concatenate([self.llm.embed(ids[:cut]), audio.astype(self.llm.embed_dtype),
                               self.llm.embed(ids[cut + 1:])])

    def turn(self, wav: np.ndarray, text_tokens: int, speech_tokens: int,
             forced: tuple[list[int], list[int]] | None = None) -> tuple[_Recorder, _Recorder]:
        """One turn through the interleave schedule: greedy when `forced` is None, else teacher-forced on
        (text ids, speech ids). Returns the two recorders (their logits, in decode order)."""
        from opens2s_edge.runtime.decoder import ContextFull
        from opens2s_edge.runtime.decoding import DecodeOptions, GenerationDefaults, interleave_config, make_samplers
        from opens2s_edge.runtime.interleave import interleave

        g = self.bundle.manifest["generation"]
        defaults = GenerationDefaults(tuple(g["text_eos_ids"]), g["max_text_tokens"], tuple(g["speech_eos_ids"]),
                                      g["max_speech_tokens"])
        options = DecodeOptions(greedy=True, max_text_tokens=text_tokens, max_speech_tokens=speech_tokens)
        cfg = interleave_config(self.bundle.manifest["interleave_strategy"], defaults, options)
        text_pick, speech_pick = make_samplers(options, self.vocab)
        if forced is None:
            text, speech = _Recorder(text_pick), _Recorder(speech_pick)
        else:
            text, speech = _Recorder(None, list(forced[0])), _Recorder(None, list(forced[1]))
        schedule = interleave(_Text(self.llm, self.prompt_embeds(wav)),
                              _Speech(self.tts, self.projection, self.speaker_start), cfg, text, speech)
        try:
            for _ in schedule:
                pass
        except ContextFull:
            pass  # the turn ends where the cache does, as the engine's does; a forced replay ends at the same step
        return text, speech

    def units(self, speech_ids: list[int]) -> list[int]:
        return self.vocab.to_units([i for i in speech_ids if not self.vocab.is_eos(i)])


# -- figures ---------------------------------------------------------------------------------------------------------
def _snr_db(ref: np.ndarray, got: np.ndarray) -> float | None:
    """None when identical (infinite SNR, which JSON cannot carry)."""
    noise = float(np.sum((got.astype(np.float64) - ref) ** 2))
    return None if noise == 0.0 else 10.0 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logit_figures(ref: np.ndarray, got: np.ndarray, allowed: np.ndarray | None = None) -> dict[str, Any]:
    """SNR (dB), mean KL(p_ref || p) (nats per step) and top-1 agreement of two (steps, vocab) logit arrays; top-1
    over the ids in `allowed` when given (what the sampler may pick)."""
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    r, g = (ref, got) if allowed is None else (ref[:, allowed], got[:, allowed])
    agree = float(np.mean(np.argmax(r, axis=-1) == np.argmax(g, axis=-1)))
    return {"steps": int(ref.shape[0]), "snr_db": _snr_db(ref, got), "kl_nats": max(kl, 0.0), "top1_agreement": agree,
            "max_abs_diff": float(np.max(np.abs(got.astype(np.float64) - ref)))}


def log_spectral_distance(ref: np.ndarray, got: np.ndarray, n_fft: int = 1024, hop: int = 256) -> float:
    """Mean over frames of the RMS over bins of the dB difference of two waveforms' power spectra (Hann STFT)."""
    n = min(len(ref), len(got))
    if n < n_fft:
        n_fft = hop = max(16, 1 << (max(n, 16).bit_length() - 1))
    window = np.hanning(n_fft)
    frames = 1 + (n - n_fft) // hop

    def power(x: np.ndarray) -> np.ndarray:
        idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
        return np.abs(np.fft.rfft(x[:n][idx] * window, axis=-1)) ** 2 + 1e-10

    diff = 10.0 * np.log10(power(ref.astype(np.float64)) / power(got.astype(np.float64)))
    return float(np.mean(np.sqrt(np.mean(diff**2, axis=-1))))


def token2wav_figures(ref_mel: np.ndarray, mel: np.ndarray, ref_wav: np.ndarray, wav: np.ndarray) -> dict[str, Any]:
    d = np.abs(mel.astype(np.float64) - ref_mel)
    return {"frames": int(ref_mel.shape[-1]), "mel_max_abs": float(d.max()), "mel_mean_abs": float(d.mean()),
            "mel_snr_db": _snr_db(ref_mel, mel), "wav_snr_db": _snr_db(ref_wav, wav),
            "log_spectral_distance_db": log_spectral_distance(ref_wav, wav)}


def _synthesize(token2wav: Any, units: list[int], steps: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Non-streamed mel and waveform (seed 0: the same noise for every bundle), and the estimator's seconds."""
    from opens2s_edge.runtime.token2wav_stream import _Randomness, synthesize_mel

    backend = token2wav
    if steps is not None:
        backend = _WithSteps(token2wav, steps)
    spec = backend.spec
    rand = _Randomness(spec, 0, True)
    frames = spec.frames(len(units))
    timed = _TimedEstimator(backend)
    mel = synthesize_mel(timed, np.asarray(units, np.int64), noise=rand.flow.frames(0, frames))
    wav, _ = backend.vocode(mel, rand.phase0, rand.source_noise(0, frames))
    return mel, wav, timed.seconds


class _WithSteps:
    """A token2wav backend whose spec asks for another number of Euler steps."""

    def __init__(self, inner: Any, steps: int):
        self.inner, self.spec = inner, replace(inner.spec, n_timesteps=steps)

    def encode(self, *args: Any) -> Any:
        return self.inner.encode(*args)

    def estimate(self, *args: Any) -> Any:
        return self.inner.estimate(*args)

    def vocode(self, *args: Any) -> Any:
        return self.inner.vocode(*args)


class _TimedEstimator(_WithSteps):
    def __init__(self, inner: Any):
        self.inner, self.spec, self.seconds = inner, inner.spec, 0.0

    def estimate(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = self.inner.estimate(*args)
        self.seconds += time.perf_counter() - t0
        return out


# -- the run ---------------------------------------------------------------------------------------------------------
def measure(reference: Path, bundles: list[Path], wav: np.ndarray, text_tokens: int = 64, speech_tokens: int = 256,
            flow_steps: tuple[int, ...] = (), threads: int = 1, progress: Any = print) -> dict[str, Any]:
    """Every figure above as one JSON-able dict."""
    ref = BundleRunner(reference, threads)
    progress(f"[accuracy] reference turn on {reference} (greedy, {text_tokens} text / {speech_tokens} speech tokens)")
    text, speech = ref.turn(wav, text_tokens, speech_tokens)
    # Every bundle replays exactly what the reference's own samplers picked.
    text_ids, speech_ids = text.picked, speech.picked
    forced = (text_ids, speech_ids)
    allowed = np.array([*range(ref.vocab.offset, ref.vocab.offset + ref.vocab.count), *ref.vocab.eos_ids])
    units = ref.units(speech_ids)
    ref_mel, ref_wav, ref_est_s = _synthesize(ref.token2wav, units) if units else (None, None, 0.0)
    out: dict[str, Any] = {"reference": ref.describe(), "text_tokens": len(text_ids), "speech_tokens": len(speech_ids),
                           "units": len(units), "note": RANDOM_WEIGHTS_NOTE, "bundles": [], "flow_steps": []}
    for path in [reference, *bundles]:
        progress(f"[accuracy] teacher-forced turn on {path}")
        runner = ref if path == reference else BundleRunner(path, threads)
        t, s = runner.turn(wav, text_tokens, speech_tokens, forced)
        entry: dict[str, Any] = {**runner.describe(),
                                 "llm": logit_figures(np.stack(text.logits), np.stack(t.logits)),
                                 "tts": logit_figures(np.stack(speech.logits), np.stack(s.logits), allowed)}
        if units:
            mel, wav_out, est_s = _synthesize(runner.token2wav, units)
            entry["token2wav"] = {**token2wav_figures(ref_mel, mel, ref_wav, wav_out), "estimator_s": est_s}
        out["bundles"].append(entry)
    if units:
        for steps in flow_steps:
            progress(f"[accuracy] token2wav with {steps} Euler steps on {reference}")
            mel, wav_out, est_s = _synthesize(ref.token2wav, units, steps)
            out["flow_steps"].append({"steps": steps, "estimator_s": est_s,
                                      "reference_steps": ref.token2wav.spec.n_timesteps,
                                      "reference_estimator_s": ref_est_s,
                                      **token2wav_figures(ref_mel, mel, ref_wav, wav_out)})
    return out


def _fmt(x: Any, spec: str) -> str:
    if x is None:
        return "exact"
    return format(x, spec)


def format_table(result: dict[str, Any]) -> str:
    lines = [f"Accuracy against {result['reference']['bundle']} (teacher-forced: {result['text_tokens']} text, "
             f"{result['speech_tokens']} speech tokens, {result['units']} units)", f"Note: {result['note']}", "",
             "| bundle | weights | LLM SNR dB | LLM KL | LLM top-1 | TTS SNR dB | TTS KL | TTS top-1 | mel max abs | "
             "mel SNR dB | wav SNR dB | LSD dB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in result["bundles"]:
        q = b["quantized_graphs"]
        what = b["weights"] if not q else ", ".join(
            f"{g}: {e['weights']} b{e['block_size']} {'sym' if e['symmetric'] else 'asym'} acc{e['accuracy_level']}"
            for g, e in q.items())
        t2w = b.get("token2wav", {})
        lines.append(
            f"| {Path(b['bundle']).name} ({b['dtype']}, {b['form']}) | {what} | {_fmt(b['llm']['snr_db'], '.1f')} | "
            f"{b['llm']['kl_nats']:.2e} | {b['llm']['top1_agreement']:.3f} | {_fmt(b['tts']['snr_db'], '.1f')} | "
            f"{b['tts']['kl_nats']:.2e} | {b['tts']['top1_agreement']:.3f} | "
            f"{t2w.get('mel_max_abs', float('nan')):.2e} | "
            f"{_fmt(t2w.get('mel_snr_db'), '.1f')} | {_fmt(t2w.get('wav_snr_db'), '.1f')} | "
            f"{t2w.get('log_spectral_distance_db', float('nan')):.3f} |")
    if result["flow_steps"]:
        lines += ["", "token2wav Euler steps against the reference bundle's own "
                  f"{result['flow_steps'][0]['reference_steps']} steps:", "",
                  "| steps | estimator s | mel max abs | mel mean abs | mel SNR dB | wav SNR dB | LSD dB |",
                  "|---|---|---|---|---|---|---|"]
        for f in result["flow_steps"]:
            lines.append(f"| {f['steps']} | {f['estimator_s']:.3f} | {f['mel_max_abs']:.3e} | "
                         f"{f['mel_mean_abs']:.3e} | "
                         f"{_fmt(f['mel_snr_db'], '.1f')} | {_fmt(f['wav_snr_db'], '.1f')} | "
                         f"{f['log_spectral_distance_db']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import opens2s_edge
    from opens2s_edge.runtime.audio import load_wav

    p = argparse.ArgumentParser(prog="python -m opens2s_edge.benchmarks.accuracy", description=__doc__.split("\n")[0])
    p.add_argument("reference", type=Path, help="the fp32 bundle every figure is measured against")
    p.add_argument("bundles", type=Path, nargs="*", help="bundles at other precisions (same checkpoint)")
    p.add_argument("--audio", type=Path, default=Path(opens2s_edge.__file__).parent / "assets" / "hello.wav")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--speech-tokens", type=int, default=256)
    p.add_argument("--flow-steps", default="", help="comma-separated Euler step counts to compare with the reference's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    try:
        steps = tuple(int(s) for s in args.flow_steps.split(",") if s.strip())
    except ValueError:
        p.error(f"--flow-steps: expected comma-separated integers, got {args.flow_steps!r}")
    if any(s < 1 for s in steps):
        p.error("--flow-steps: every step count must be at least 1")
    if args.text_tokens < 1 or args.speech_tokens < 1:
        p.error("--text-tokens and --speech-tokens must be at least 1")
    for path in (args.reference, *args.bundles):
        if not (path / "manifest.json").is_file():
            p.error(f"{path} is not a bundle (no manifest.json)")
    wav = load_wav(args.audio)
    result = measure(args.reference, list(args.bundles), wav, args.text_tokens, args.speech_tokens, steps,
                     args.threads, progress=lambda line: print(line, flush=True))
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
