"""The benchmark run: peers side by side on the same weights, the roofline, and the per-chunk token2wav cost.

`run_bench(config)` runs every requested peer in its own process (harness.run_isolated), turns the raw records
into statistics, ratios and roofline fractions, and returns one JSON-able dict; `report.py` prints and plots it.
A peer that cannot run here is recorded under "skipped" with the reason; no figure is ever filled in for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import llm_peers, ort_variants, peers
from .harness import PeerFailed, machine_description, run_isolated, summarize
from .roofline import DecoderShape, decode_bound, device_bandwidth, fraction_of_bound, memory_bandwidth

# ort-int4 / ort-int8: our runtime on copies of the bundle whose decoders' weights onnxruntime's quantizer made
# int4 / int8 (benchmarks/ort_variants.py), in the turn and alone.
TURN_PEERS = ("reference", "torch", "ort", "ort-int4", "ort-int8", "trt")
ALL_PEERS = ("reference", "torch", "ort", "ort-int4", "ort-int8", "trt", "genai", "optimum")
NEEDS_CHECKPOINT = ("reference", "torch", "genai", "optimum")
# LLM-alone peers that run on the CPU whatever --providers says (their CPU packages): host-RAM bandwidth is their
# floor even in a GPU run.
HOST_ONLY_PEERS = ("genai", "optimum")


@dataclass(frozen=True)
class Workload:
    """How much one preset asks of each peer: budgets of a turn, the LLM-alone prompt/decode, token2wav length."""

    max_text_tokens: int
    max_speech_tokens: int
    llm_prompt_tokens: int
    llm_new_tokens: int
    token2wav_tokens: int
    runs: int
    warmup: int


WORKLOADS = {
    "tiny": Workload(16, 64, 32, 16, 72, 2, 1),
    "small": Workload(64, 256, 64, 64, 240, 5, 1),
    # The released sizes: 8B LLM + 1.7B TTS LM; the reference's own budgets are 512 text / 512+ speech tokens.
    "full": Workload(128, 512, 128, 128, 480, 10, 2),
}


@dataclass
class BenchConfig:
    bundle: Path
    checkpoint: Path | None
    decoder: Path | None
    audio: Path
    out: Path
    preset: str = "small"
    peers: tuple[str, ...] = ALL_PEERS
    runs: int | None = None
    warmup: int | None = None
    threads: int = 0
    providers: tuple[str, ...] = ("cpu",)
    cache_root: Path = field(default_factory=llm_peers.default_cache)
    workload: Workload | None = None

    def resolved(self) -> Workload:
        w = self.workload or WORKLOADS[self.preset]
        return Workload(w.max_text_tokens, w.max_speech_tokens, w.llm_prompt_tokens, w.llm_new_tokens,
                        w.token2wav_tokens, self.runs if self.runs is not None else w.runs,
                        self.warmup if self.warmup is not None else w.warmup)


# -- token2wav cost per chunk against response length (reusing token2wav_chunk_cost) ---------------------------
def token2wav_cost(config: dict) -> dict[str, Any]:
    """Per-chunk cost over one long response: ours (bounded window) on PyTorch and on the bundle's graphs,
    and the reference-style full-history re-encode, all from benchmarks/token2wav_chunk_cost.py."""
    import torch

    from opens2s_edge.runtime.token2wav_stream import StreamConfig

    from .token2wav_chunk_cost import ours, reference_style

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    out: dict[str, Any] = {"tokens": config["tokens"]}
    backends: list[tuple[str, Any]] = []
    if config.get("decoder"):
        from opens2s_edge.training.token2wav.decoder import load_decoder

        backends.append(("torch", load_decoder(config["decoder"]).backend))
    if config.get("bundle"):
        from opens2s_edge.runtime.bundle import load_bundle
        from opens2s_edge.runtime.engine import OrtToken2Wav
        from opens2s_edge.runtime.onnx_backend import resolve_providers

        bundle = load_bundle(config["bundle"], verify=False)
        backends.append(("ort", OrtToken2Wav(bundle, resolve_providers(config["providers"]), config["threads"])))
    stream_config = StreamConfig()
    for name, backend in backends:
        spec = backend.spec
        tokens = np.random.default_rng(0).integers(0, spec.vocab_size, config["tokens"])
        ours(backend, tokens[:30], stream_config)  # warm-up: allocators, kernels, graph caches
        out[f"ours_{name}"] = ours(backend, tokens, stream_config)
        if name == "torch" and config.get("reference_style"):
            out["reference_style_torch"] = reference_style(backend, tokens)
        out["token_rate"] = spec.token_rate
    return out


# -- statistics ------------------------------------------------------------------------------------------------
TURN_METRICS = ("first_text_s", "first_audio_s", "rtf", "total_s", "audio_s")
COMPONENT_METRICS = ("audio_encoder_s", "llm_prefill_s", "llm_decode_tok_s", "tts_decode_tok_s")
CHUNK_METRICS = {"estimator_per_chunk_s": "estimator_s", "hift_per_chunk_s": "hift_s",
                 "token2wav_per_chunk_s": "seconds"}
# Metrics where a larger number is better; for the rest (seconds, RTF) smaller is better.
HIGHER_IS_BETTER = {"llm_decode_tok_s", "tts_decode_tok_s", "decode_tok_s"}


def summarize_turns(raw: dict[str, Any]) -> dict[str, Any]:
    turns = raw["turns"]
    stats: dict[str, Any] = {m: summarize([t[m] for t in turns]) for m in TURN_METRICS}
    for m in COMPONENT_METRICS:
        stats[m] = summarize([t["components"][m] for t in turns])
    for m, key in CHUNK_METRICS.items():
        # One value per run: the mean over that run's chunks (chunk sizes differ: the first one is shorter).
        stats[m] = summarize([float(np.mean([c[key] for c in t["components"]["token2wav_chunks"]]))
                              for t in turns if t["components"]["token2wav_chunks"]])
    stats["text_tokens"] = [t["text_tokens"] for t in turns]
    stats["speech_tokens"] = [t["speech_tokens"] for t in turns]
    stats["chunks_per_turn"] = [len(t["components"]["token2wav_chunks"]) for t in turns]
    return stats


def ratios(values: dict[str, float | None], higher_is_better: bool) -> dict[str, dict[str, float | None]]:
    """For each peer, how many times better it is than each other peer (> 1: better)."""
    out: dict[str, dict[str, float | None]] = {}
    for a, va in values.items():
        out[a] = {}
        for b, vb in values.items():
            if a == b:
                continue
            if not va or not vb:
                out[a][b] = None
            else:
                out[a][b] = va / vb if higher_is_better else vb / va
    return out


def _p50(stat: dict | None) -> float | None:
    return None if not stat else stat.get("p50")


def _ids_parity(raws: dict[str, dict]) -> dict[str, Any]:
    """Do the peers produce the same greedy ids (first timed run)? A check that they ran the same model."""
    firsts = {p: (r["turns"][0]["text_ids"], r["turns"][0]["speech_ids"]) for p, r in raws.items() if r["turns"]}
    if not firsts:
        return {}
    base_name = next(iter(firsts))
    base = firsts[base_name]
    return {"against": base_name,
            **{p: {"text_ids_equal": ids[0] == base[0], "speech_ids_equal": ids[1] == base[1]}
               for p, ids in firsts.items() if p != base_name}}


# -- roofline --------------------------------------------------------------------------------------------------
def _decoder_shapes(config: BenchConfig, manifest: dict) -> dict[str, DecoderShape] | None:
    if config.checkpoint is None or not (config.checkpoint / "config.json").is_file():
        return None
    raw = json.loads((config.checkpoint / "config.json").read_text())
    return {"llm": DecoderShape.from_hf_config(raw["llm_config"]),
            "tts": DecoderShape.from_hf_config(raw["tts_lm_config"])}


def _graph_weight_bytes(bundle: Path, manifest: dict, graph: str) -> int:
    """Bytes of a decoder graph's weights as stored in the bundle (graph + external data)."""
    name = manifest["graphs"][graph]["file"]
    return sum(f.stat().st_size for f in bundle.iterdir() if f.name in (name, name + ".data"))


def roofline(config: BenchConfig, manifest: dict, bandwidth: float, turn_stats: dict[str, dict],
             turn_raw: dict[str, dict], llm_alone: dict[str, dict], workload: Workload,
             host_bandwidth: float | None = None, bundles: dict[str, str] | None = None,
             genai_dirs: dict[str, str] | None = None) -> dict[str, Any]:
    """Bytes each decode step must read and the tokens/s bound, per decoder, with each peer's fraction of it.
    `bandwidth` is the memory the decoders read from (device memory in a GPU run); `host_bandwidth`, when given,
    is the floor of the LLM-alone peers that stay on the CPU. A peer whose bundle (`bundles`) or genai model folder
    (`genai_dirs`) is known is held to the bytes it actually reads: its graph's weights as stored (int4/int8 blocks,
    scales and zero points) plus the KV rows its attention reads (the filled rows in the gqa form and genai's graph,
    all max_context rows in the fixed-shape forms)."""
    bundles = bundles or {}
    genai_dirs = genai_dirs or {}
    shapes = _decoder_shapes(config, manifest)
    weight_dtype = manifest.get("dtype", "fp32")
    host_bandwidth = host_bandwidth or bandwidth
    result: dict[str, Any] = {"bandwidth_bytes_per_s": bandwidth, "host_bandwidth_bytes_per_s": host_bandwidth,
                              "weight_dtype": weight_dtype, "decoders": {}}
    for decoder, graph, metric in (("llm", "llm", "llm_decode_tok_s"), ("tts", "tts_lm", "tts_decode_tok_s")):
        m = manifest[decoder]
        # Mean context a decode step attends to over a turn (first timed run of any turn peer).
        contexts = []
        for raw in turn_raw.values():
            t = raw["turns"][0]
            c = t["components"]
            if decoder == "llm" and c["llm_prefill_positions"]:
                contexts.append(c["llm_prefill_positions"] + c["llm_decode_steps"] / 2)
            elif decoder == "tts":
                contexts.append(1 + (t["text_tokens"] + t["speech_tokens"]) / 2)
        context = float(np.mean(contexts)) if contexts else float(workload.llm_prompt_tokens)
        if shapes is not None:
            shape = shapes[decoder]
            bound = decode_bound(shape, context, weight_dtype, weight_dtype, bandwidth)
            source = "checkpoint config.json"
        else:
            kv = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * int(round(context))
            weights = _graph_weight_bytes(config.bundle, manifest, graph)
            total = weights + kv * (2 if weight_dtype != "fp32" else 4)
            bound = {"context": context, "weight_bytes": weights, "kv_bytes": total - weights,
                     "bytes_per_step": total, "bound_tokens_per_s": bandwidth / total}
            source = "bundle graph sizes"
        # Our decoder graphs have fixed-shape caches: attention reads all max_context rows under a mask.
        kv_full = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * m["max_context"] * (4 if weight_dtype == "fp32"
                                                                                          else 2)
        entry = {**bound, "source": source, "graph_kv_bytes_read": kv_full,
                 "graph_bound_tokens_per_s": bandwidth / (bound["weight_bytes"] + kv_full), "peers": {}}
        for peer, stats in turn_stats.items():
            achieved = _p50(stats.get(metric))
            b = bound if peer not in bundles else _read_bytes(Path(bundles[peer]), graph, m, context, bandwidth)
            entry["peers"][peer] = {"tokens_per_s": achieved, "fraction": fraction_of_bound(achieved, b),
                                    "bytes_per_step": b["bytes_per_step"],
                                    "bound_tokens_per_s": b["bound_tokens_per_s"]}
        if decoder == "llm":
            # The LLM alone runs at context P + N/2 on average: its own bound.
            ctx = workload.llm_prompt_tokens + workload.llm_new_tokens / 2
            for peer, res in llm_alone.items():
                precision = res.get("precision", weight_dtype)
                bw = host_bandwidth if peer.split("-")[0] in HOST_ONLY_PEERS else bandwidth
                if peer in bundles:
                    b = _read_bytes(Path(bundles[peer]), "llm", m, ctx, bw)
                elif peer in genai_dirs:
                    b = _genai_bytes(Path(genai_dirs[peer]), m, ctx, bw)
                elif shapes is not None:
                    b = decode_bound(shapes["llm"], ctx, precision, "fp32" if precision == "int4" else precision, bw)
                else:
                    b = {**bound, "bound_tokens_per_s": bw / bound["bytes_per_step"]}
                entry["peers"][f"alone:{peer}"] = {"tokens_per_s": res.get("decode_tok_s"), "context": ctx,
                                                   "bytes_per_step": b["bytes_per_step"],
                                                   "bytes_source": b.get("source", "nominal (parameters x dtype)"),
                                                   "bound_tokens_per_s": b["bound_tokens_per_s"],
                                                   "fraction": fraction_of_bound(res.get("decode_tok_s"), b)}
        result["decoders"][decoder] = entry
    return result


def _read_bytes(bundle: Path, graph: str, shape: dict, context: float, bandwidth: float) -> dict[str, Any]:
    """What one decode step of `bundle`'s `graph` reads: its stored weights and the KV rows its form reads."""
    m = json.loads((bundle / "manifest.json").read_text())
    entry = m["graphs"][graph]
    rows = context if entry.get("form") == "gqa" else shape["max_context"]
    kv = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * rows * (4 if entry["dtype"] == "fp32" else 2)
    weights = ort_variants.graph_bytes(bundle, graph)
    return {"weight_bytes": weights, "kv_bytes": int(kv), "bytes_per_step": int(weights + kv),
            "bound_tokens_per_s": bandwidth / (weights + kv), "source": "graph files as stored + KV rows read"}


def _genai_bytes(model_dir: Path, shape: dict, context: float, bandwidth: float) -> dict[str, Any]:
    """onnxruntime-genai's model: its graph files as stored, and fp32 KV over the filled rows (GroupQueryAttention)."""
    weights = sum(f.stat().st_size for f in model_dir.glob("model.onnx*"))
    kv = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * context * 4
    return {"weight_bytes": weights, "kv_bytes": int(kv), "bytes_per_step": int(weights + kv),
            "bound_tokens_per_s": bandwidth / (weights + kv), "source": "genai graph files as stored + KV rows read"}


# -- quantized variants and decode profiles -----------------------------------------------------------------------
def _derive_variants(config: BenchConfig, base: dict, progress: Callable[[str], None],
                     failed: dict[str, str]) -> dict[str, dict]:
    """The bundles of the requested ort-int4 / ort-int8 peers, derived once (cached) in their own process."""
    wanted = [p for p in config.peers if p in ort_variants.VARIANTS]
    if not wanted:
        return {}
    progress(f"[bench] deriving {', '.join(wanted)} bundles (MatMulNBitsQuantizer on the LLM and TTS LM graphs)")
    try:
        paths = run_isolated(ort_variants.derive_variants, {**base, "variants": wanted,
                                                            "cache_root": str(config.cache_root)})
    except PeerFailed as exc:
        for p in wanted:
            failed[p] = str(exc)
        return {}
    return {p: {"bundle": paths[p], "variant_weights": ort_variants.VARIANTS[p]} for p in wanted}


def _decode_profiles(config: BenchConfig, base: dict, variants: dict[str, dict], llm_alone: dict[str, dict],
                     llm_config: dict, workload: Workload, progress: Callable[[str], None],
                     failed: dict[str, str]) -> dict[str, Any]:
    """onnxruntime's per-op profile of decode steps: our LLM and TTS LM graphs (each ort peer's bundle), and
    onnxruntime-genai's graphs where that peer ran, in the same run."""
    if set(config.providers) != {"cpu"}:
        return {}  # the profiles below read CPU kernel times; a GPU run's nodes run asynchronously
    jobs: list[tuple[str, Any, dict]] = []
    bundles = {"ort": str(config.bundle), **{k: v["bundle"] for k, v in variants.items()}}
    for peer, bundle in bundles.items():
        if peer not in config.peers:
            continue
        for graph in ("llm", "tts_lm"):
            jobs.append((f"{peer}:{graph}", ort_variants.decode_profile,
                         {"bundle": bundle, "graph": graph, "threads": config.threads or 0,
                          "prompt_tokens": workload.llm_prompt_tokens, "steps": 32}))
    for label in llm_alone:
        if label.startswith("genai-") and "cache" in llm_config:
            model_dir = Path(llm_config["cache"]) / label
            if (model_dir / "genai_config.json").is_file():
                jobs.append((f"{label}:llm", ort_variants.genai_profile,
                             {"model_dir": str(model_dir), "threads": config.threads or 0,
                              "prompt_tokens": workload.llm_prompt_tokens, "steps": 32}))
    out: dict[str, Any] = {}
    for label, fn, job in jobs:
        progress(f"[bench] onnxruntime profile of 32 decode steps, {label}")
        try:
            out[label] = run_isolated(fn, job)
        except PeerFailed as exc:
            failed[f"profile:{label}"] = str(exc)
    return out


# -- the run ---------------------------------------------------------------------------------------------------
def _skip_reason(exc: PeerFailed) -> str | None:
    """The reason a peer process gave for not running here (PeerSkipped), or None if it failed."""
    message = str(exc)
    if "PeerSkipped: " not in message:
        return None
    return message.split("PeerSkipped: ", 1)[1].split("\nTraceback")[0].strip()


def run_bench(config: BenchConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from opens2s_edge.runtime.bundle import load_bundle

    workload = config.resolved()
    bundle = load_bundle(config.bundle)
    manifest = bundle.manifest
    progress("[bench] measuring memory bandwidth")
    bw_before = memory_bandwidth()
    base = {"bundle": str(config.bundle), "checkpoint": str(config.checkpoint) if config.checkpoint else None,
            "decoder": str(config.decoder) if config.decoder else None, "audio": str(config.audio),
            "providers": list(config.providers), "threads": config.threads,
            "max_context": manifest["llm"]["max_context"], "runs": workload.runs, "warmup": workload.warmup,
            "max_text_tokens": workload.max_text_tokens, "max_speech_tokens": workload.max_speech_tokens}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    turn_raw: dict[str, dict] = {}
    variants = _derive_variants(config, base, progress, failed)
    for name in (p for p in TURN_PEERS if p in config.peers):
        if name in NEEDS_CHECKPOINT and (config.checkpoint is None or config.decoder is None):
            skipped[name] = ("needs the PyTorch checkpoint and decoder the bundle was exported from: pass "
                             "--checkpoint DIR --decoder DIR (the manifest's source folders are not on this machine)")
            continue
        if name in ort_variants.VARIANTS and name not in variants:
            continue  # its bundle could not be derived: recorded under failed
        progress(f"[bench] turn peer {name}: {workload.warmup} warm-up + {workload.runs} runs")
        t0 = time.perf_counter()
        try:
            if name in variants:
                turn_raw[name] = run_isolated(ort_variants.variant_turns, {**base, **variants[name]})
            else:
                turn_raw[name] = run_isolated(peers.TURN_PEERS[name], base)
        except PeerFailed as exc:
            reason = _skip_reason(exc)
            if reason is not None:
                skipped[name] = reason
                progress(f"[bench] turn peer {name} skipped: {reason[:200]}")
            else:
                failed[name] = str(exc)
                progress(f"[bench] turn peer {name} failed: {str(exc).splitlines()[0]}")
            continue
        progress(f"[bench] turn peer {name}: done in {time.perf_counter() - t0:.1f} s")

    llm_config = {**base, "prompt_ids": llm_peers.prompt_ids(manifest["llm"]["vocab_size"],
                                                             workload.llm_prompt_tokens),
                  "new_tokens": workload.llm_new_tokens, "cache_root": str(config.cache_root)}
    if config.checkpoint is not None:
        llm_config["cache"] = str(config.cache_root / "bench" / llm_peers.checkpoint_key(config.checkpoint))
    llm_alone: dict[str, dict] = {}
    llm_jobs: list[tuple[str, str, dict]] = []
    for name in config.peers:
        if name == "genai":
            llm_jobs += [(f"genai-{p}", "genai", {"precision": p}) for p in llm_peers.GENAI_PRECISIONS]
        else:
            llm_jobs.append((name, name, {}))
    for label, name, extra in llm_jobs:
        if name in NEEDS_CHECKPOINT and config.checkpoint is None:
            skipped[f"llm:{label}"] = "needs the checkpoint's LLM weights: pass --checkpoint DIR"
            continue
        if name in ort_variants.VARIANTS and name not in variants:
            continue
        progress(f"[bench] LLM decode alone, {label}: prompt {workload.llm_prompt_tokens}, "
                 f"{workload.llm_new_tokens} new tokens")
        try:
            if name in variants:
                llm_alone[label] = run_isolated(ort_variants.variant_llm, {**llm_config, **variants[name]})
            else:
                llm_alone[label] = run_isolated(llm_peers.LLM_PEERS[name], {**llm_config, **extra})
        except PeerFailed as exc:
            reason = _skip_reason(exc)
            if reason is not None:
                skipped[f"llm:{label}"] = reason
                progress(f"[bench] {label} skipped: {reason[:200]}")
            else:
                failed[f"llm:{label}"] = str(exc)
                progress(f"[bench] {label} failed: {str(exc).splitlines()[0]}")

    profiles = _decode_profiles(config, base, variants, llm_alone, llm_config, workload, progress, failed)
    progress(f"[bench] token2wav per-chunk cost over {workload.token2wav_tokens} tokens")
    t2w_config = {**base, "tokens": workload.token2wav_tokens,
                  "decoder": str(config.decoder) if config.decoder and ("torch" in config.peers
                                                                        or "reference" in config.peers) else None,
                  "bundle": str(config.bundle) if "ort" in config.peers else None,
                  "reference_style": "reference" in config.peers}
    try:
        token2wav = run_isolated(token2wav_cost, t2w_config)
    except PeerFailed as exc:
        failed["token2wav_cost"] = str(exc)
        token2wav = {}
    bw_after = memory_bandwidth()
    host_bandwidth = max(bw_before["bytes_per_s"], bw_after["bytes_per_s"])
    bandwidth, device_bw = host_bandwidth, None
    if set(config.providers) & {"cuda", "tensorrt"} and machine_description()["gpu"]:
        # Our decoders run on the GPU here: their floor is device-memory bandwidth, measured the same way.
        progress("[bench] measuring device memory bandwidth")
        try:
            device_bw = run_isolated(device_bandwidth, {})
            bandwidth = device_bw["bytes_per_s"]
        except PeerFailed as exc:
            failed["device_bandwidth"] = str(exc)

    turn_stats = {p: summarize_turns(r) for p, r in turn_raw.items()}
    for p, r in turn_raw.items():
        turn_stats[p]["peak_rss_bytes"] = r["memory"]["peak_rss_bytes"]
        turn_stats[p]["device_memory"] = r["memory"]["device"]
        turn_stats[p]["setup_s"] = r["setup_s"]
    metrics = (*TURN_METRICS[:4], *COMPONENT_METRICS, *CHUNK_METRICS)
    turn_ratios = {m: ratios({p: _p50(s.get(m)) for p, s in turn_stats.items()}, m in HIGHER_IS_BETTER)
                   for m in metrics}
    llm_ratios = {
        "decode_tok_s": ratios({p: r.get("decode_tok_s") for p, r in llm_alone.items()}, True),
        "prefill_s": ratios({p: _p50(r.get("prefill_s")) for p, r in llm_alone.items()}, False),
    }
    return {
        "schema": 1,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "preset": config.preset,
        "machine": machine_description(),
        "config": {**base, "peers": list(config.peers), "workload": asdict(workload),
                   "bundle_dtype": manifest.get("dtype"), "bundle_form": manifest.get("form"),
                   "interleave_strategy": manifest.get("interleave_strategy")},
        "memory_bandwidth": {"before": bw_before, "after": bw_after, "bytes_per_s": host_bandwidth,
                             "device": device_bw},
        "turn": {"stats": turn_stats, "ratios": turn_ratios, "ids_parity": _ids_parity(turn_raw), "raw": turn_raw},
        "llm_alone": {"prompt_tokens": workload.llm_prompt_tokens, "new_tokens": workload.llm_new_tokens,
                      "peers": llm_alone, "ratios": llm_ratios},
        "token2wav_chunks": token2wav,
        "decode_profile": profiles,
        "roofline": roofline(config, manifest, bandwidth, turn_stats, turn_raw, llm_alone, workload,
                             host_bandwidth,
                             {"ort": str(config.bundle), **{k: v["bundle"] for k, v in variants.items()}},
                             {label: str(Path(llm_config["cache"]) / label) for label in llm_alone
                              if label.startswith("genai-") and "cache" in llm_config}),
        "skipped": skipped,
        "failed": failed,
    }
