"""Print and plot a bench.json result: the terminal table and bench.png (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROWS = (
    ("first text token (s)", "first_text_s", 1.0, "{:.3f}"),
    ("first audio (s)", "first_audio_s", 1.0, "{:.3f}"),
    ("RTF (turn / audio)", "rtf", 1.0, "{:.3f}"),
    ("total turn (s)", "total_s", 1.0, "{:.2f}"),
    ("audio encoder (ms)", "audio_encoder_s", 1e3, "{:.1f}"),
    ("LLM prefill (ms)", "llm_prefill_s", 1e3, "{:.1f}"),
    ("LLM decode (tok/s)", "llm_decode_tok_s", 1.0, "{:.1f}"),
    ("TTS LM decode (tok/s)", "tts_decode_tok_s", 1.0, "{:.1f}"),
    ("flow estimator / chunk (ms)", "estimator_per_chunk_s", 1e3, "{:.1f}"),
    ("HiFT / chunk (ms)", "hift_per_chunk_s", 1e3, "{:.1f}"),
    ("token2wav / chunk (ms)", "token2wav_per_chunk_s", 1e3, "{:.1f}"),
)


def _fmt(value: float | None, scale: float, spec: str) -> str:
    return "-" if value is None else spec.format(value * scale)


def _cell(stat: dict | None, scale: float, spec: str) -> str:
    if not stat or stat.get("p50") is None:
        return "-"
    text = _fmt(stat["p50"], scale, spec)
    if stat.get("n", 0) > 1:
        text += f" [{_fmt(stat['p90'], scale, spec)}/{_fmt(stat['p99'], scale, spec)}]"
        if stat.get("spread") is not None:
            text += f" ±{100 * stat['spread'] / 2:.0f}%"
    return text


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths,
                                                                                            strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                  strict=True))))
    return "\n".join(lines)


def _profile_section(profiles: dict[str, Any]) -> list[str]:
    """Where a decode step's time goes: onnxruntime's profile per graph (kernels, onnxruntime around them, our Python
    loop), and the op mix, largest first."""
    if not profiles:
        return []
    rows, ops = [], []
    for label, p in profiles.items():
        wall = p.get("wall_us")
        python = p.get("python_us")
        plain = p.get("wall_unprofiled_us")
        rows.append([label, f"{p['context']:.0f}", "-" if plain is None else f"{plain:.0f}",
                     "-" if wall is None else f"{wall:.0f}", f"{p['model_run_us']:.0f}",
                     f"{p['kernels_us']:.0f}", f"{p['onnxruntime_overhead_us']:.0f}",
                     "-" if python is None else f"{python:.0f} ({100 * python / wall:.1f}%)"])
        top = list(p["ops"].items())[:6]
        ops.append([label, "; ".join(f"{op} {v['us_per_step']:.0f} us x{v['nodes_per_step']:.0f} "
                                     f"({100 * v['share']:.0f}%)" for op, v in top)])
    return ["", "Where a decode step's time goes (onnxruntime's profile of 32 steps; us per step)",
            _table(["graph", "context", "step", "profiled step", "model_run", "kernels", "ort overhead", "python loop"],
                   rows),
            _table(["graph", "largest ops (us per step, nodes per step, share of kernel time)"], ops)]


def format_report(result: dict[str, Any]) -> str:
    out: list[str] = []
    m = result["machine"]
    cfg = result["config"]
    gpu = ", ".join(m["gpu"]) if m.get("gpu") else "none"
    out.append(f"opens2s-edge bench  {result['date']}  preset {result['preset']}  bundle {cfg['bundle_dtype']}/"
               f"{cfg['bundle_form']}  interleave {cfg['interleave_strategy']}")
    out.append(f"machine: {m['cpu']}, {m['usable_cores']} usable cores, {(m['ram_bytes'] or 0) / 2**30:.0f} GiB RAM, "
               f"GPU {gpu}; threads {cfg['threads'] or 'library default'}; providers {','.join(cfg['providers'])}")
    w = cfg["workload"]
    out.append(f"turn: {w['runs']} runs after {w['warmup']} warm-up, greedy, budgets {w['max_text_tokens']} text / "
               f"{w['max_speech_tokens']} speech tokens; cells are p50 [p90/p99] ±half the max-min spread")
    stats = result["turn"]["stats"]
    peers = list(stats)
    if peers:
        rows = [[label, *(_cell(stats[p].get(key), scale, spec) for p in peers)] for label, key, scale, spec in ROWS]
        rows.append(["tokens text/speech (run 1)", *(f"{stats[p]['text_tokens'][0]}/{stats[p]['speech_tokens'][0]}"
                                                    for p in peers)])
        rows.append(["peak RSS (MiB)", *(f"{stats[p]['peak_rss_bytes'] / 2**20:.0f}" for p in peers)])
        out += ["", "Per turn and per component", _table(["", *peers], rows)]
        parity = result["turn"].get("ids_parity") or {}
        if len(parity) > 1:
            same = [f"{p}: {'same' if v['text_ids_equal'] and v['speech_ids_equal'] else 'DIFFERENT'} ids"
                    for p, v in parity.items() if p != "against"]
            out.append(f"greedy ids vs {parity['against']}: " + "; ".join(same))
        if len(peers) > 1:
            out += ["", "Ratios (row peer better by x; p50 vs p50)"]
            ratio_rows = []
            for a in peers:
                for b in peers:
                    if a == b:
                        continue
                    cells = []
                    for _label, key, _s, _f in ROWS:
                        r = result["turn"]["ratios"].get(key, {}).get(a, {}).get(b)
                        cells.append("-" if r is None else f"{r:.2f}x")
                    ratio_rows.append([f"{a} vs {b}", *cells])
            short = ["1st text", "1st audio", "RTF", "total", "enc", "prefill", "LLM tok/s", "TTS tok/s", "est/chunk",
                     "HiFT/chunk", "t2w/chunk"]
            out.append(_table(["", *short], ratio_rows))
    alone = result["llm_alone"]
    if alone["peers"]:
        roof = result["roofline"]["decoders"]["llm"]["peers"]
        rows = []
        for p, r in alone["peers"].items():
            frac = roof.get(f"alone:{p}", {}).get("fraction")
            read = roof.get(f"alone:{p}", {}).get("bytes_per_step")
            rows.append([p, r.get("precision", "-"), _cell(r.get("prefill_s"), 1e3, "{:.1f}"),
                         _fmt(r.get("decode_tok_s"), 1.0, "{:.1f}"), "-" if read is None else f"{read / 2**20:.1f}",
                         "-" if frac is None else f"{100 * frac:.0f}%", f"{r['memory']['peak_rss_bytes'] / 2**20:.0f}"])
        out += ["", f"LLM decode alone: prompt {alone['prompt_tokens']} tokens, {alone['new_tokens']} greedy tokens "
                    "(decode = (N-1)/(T(N)-T(1)), p50 of runs)",
                _table(["peer", "weights", "prefill ms", "decode tok/s", "MiB read/step", "of bound", "peak RSS MiB"],
                       rows)]
        dec = alone["ratios"]["decode_tok_s"]
        names = list(alone["peers"])
        if len(names) > 1:
            rows = [[a, *("-" if a == b or dec[a].get(b) is None else f"{dec[a][b]:.2f}x" for b in names)]
                    for a in names]
            out += ["decode tok/s ratio (row / column)", _table(["", *names], rows)]
    roof = result["roofline"]
    device = (result["memory_bandwidth"].get("device") or {}).get("device")
    where = f"device memory of {device}" if device else "host memory"
    out += ["", f"Roofline: measured copy bandwidth {roof['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({where})"]
    rows = []
    for name, d in roof["decoders"].items():
        for p, v in d["peers"].items():
            if p.startswith("alone:"):
                continue
            rows.append([name, p, f"{d['context']:.0f}", f"{v.get('bytes_per_step', d['bytes_per_step']) / 2**20:.1f}",
                         f"{v.get('bound_tokens_per_s', d['bound_tokens_per_s']):.0f}",
                         _fmt(v["tokens_per_s"], 1.0, "{:.1f}"),
                         "-" if v["fraction"] is None else f"{100 * v['fraction']:.0f}%"])
        rows.append([name, "(our graph reads the full cache)", str(result["config"]["max_context"]),
                     f"{(d['weight_bytes'] + d['graph_kv_bytes_read']) / 2**20:.1f}",
                     f"{d['graph_bound_tokens_per_s']:.0f}", "", ""])
    out.append(_table(["decoder", "peer", "context", "MiB/step", "bound tok/s", "achieved", "of bound"], rows))
    out += _profile_section(result.get("decode_profile") or {})
    t2w = result.get("token2wav_chunks") or {}
    series = [k for k in ("ours_torch", "ours_ort", "reference_style_torch") if k in t2w]
    if series:
        rate = t2w["token_rate"]
        out += ["", f"token2wav per chunk against response length ({t2w['tokens']} tokens = {t2w['tokens'] / rate:.1f}"
                    " s of speech); ms per chunk"]
        for k in series:
            cells = ", ".join(f"{r['tokens_so_far'] / rate:.1f}s:{1e3 * r['seconds']:.0f}" for r in t2w[k])
            out.append(f"  {k}: {cells}")
    for title, items in (("Skipped", result["skipped"]), ("Failed", result["failed"])):
        if items:
            out += ["", f"{title}:"]
            out += [f"  {k}: {v.splitlines()[0][:300]}" for k, v in items.items()]
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    stats = result["turn"]["stats"]
    metrics = [("first_text_s", "first text"), ("first_audio_s", "first audio"), ("total_s", "total turn")]
    width = 0.8 / max(1, len(stats))
    for i, (peer, s) in enumerate(stats.items()):
        xs, p50, lo, hi = [], [], [], []
        for j, (key, _) in enumerate(metrics):
            st = s.get(key) or {}
            if st.get("p50") is None:
                continue
            xs.append(j + i * width)
            p50.append(st["p50"])
            lo.append(0.0)
            hi.append(st["p99"] - st["p50"])
        ax.bar(xs, p50, width, label=peer, yerr=[lo, hi], capsize=3)
        for j, (key, _) in enumerate(metrics):
            st = s.get(key) or {}
            if st.get("p90") is not None:
                ax.plot([j + i * width], [st["p90"]], "k_", markersize=10)
    ax.set_xticks([j + width * (len(stats) - 1) / 2 for j in range(len(metrics))], [m[1] for m in metrics])
    ax.set_ylabel("seconds (bar p50, tick p90, whisker p99)")
    ax.set_title("Turn latency per peer")
    ax.legend()

    ax = axes[1]
    t2w = result.get("token2wav_chunks") or {}
    for key, style in (("ours_torch", "o-"), ("ours_ort", "s-"), ("reference_style_torch", "^-")):
        if key in t2w:
            rate = t2w["token_rate"]
            ax.plot([r["tokens_so_far"] / rate for r in t2w[key]], [1e3 * r["seconds"] for r in t2w[key]], style,
                    label=key.replace("_", " "))
    ax.set_xlabel("response length at the end of the chunk (s of speech)")
    ax.set_ylabel("chunk cost (ms)")
    ax.set_title("token2wav per-chunk cost vs response length")
    ax.legend()

    ax = axes[2]
    names, rates, bounds = [], [], []
    roof = result["roofline"]["decoders"]["llm"]["peers"]
    for p, v in result["turn"]["stats"].items():
        if (v.get("llm_decode_tok_s") or {}).get("p50"):
            names.append(f"turn:{p}")
            rates.append(v["llm_decode_tok_s"]["p50"])
            bounds.append(result["roofline"]["decoders"]["llm"]["bound_tokens_per_s"])
    for p, r in result["llm_alone"]["peers"].items():
        if r.get("decode_tok_s"):
            names.append(f"alone:{p}")
            rates.append(r["decode_tok_s"])
            bounds.append(roof.get(f"alone:{p}", {}).get("bound_tokens_per_s") or 0)
    ax.barh(names, rates, color="tab:blue", label="achieved")
    ax.scatter(bounds, names, marker="|", s=300, color="red", label="bandwidth bound")
    # Achieved rates can be 1% of the bound or less: a linear axis would hide them.
    ax.set_xscale("log")
    ax.set_xlabel("LLM decode tokens/s (log scale)")
    ax.set_title("LLM decode vs the memory-bandwidth floor")
    ax.legend()
    fig.suptitle(f"opens2s-edge bench, preset {result['preset']}, {result['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
