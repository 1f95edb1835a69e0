"""`opens2s-edge inspect`: a bundle's manifest as a table (torch-free)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 pass")


def _shape(io: dict) -> str:
    return f"{io['name']} {io['dtype']}[{', '.join(str(d) for d in io['shape'])}]"


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle, verify=not args.no_verify)
    except BundleError as exc:
        raise UserError(str(exc)) from exc
    m = bundle.manifest
    rows = [("format version", str(m["format_version"])), ("dtype", m["dtype"]),
            ("interleave M:N", m["interleave_strategy"]),
            ("exported with", ", ".join(f"{k} {v}" for k, v in m["versions"].items())),
            ("LLM", ", ".join(f"{k} {v}" for k, v in m["llm"].items())),
            ("TTS LM", ", ".join(f"{k} {v}" for k, v in m["tts"].items())),
            ("generation", ", ".join(f"{k} {v}" for k, v in m["generation"].items())),
            ("speech tokens", ", ".join(f"{k} {v}" for k, v in m["speech_tokens"].items())),
            ("audio", ", ".join(f"{k} {v}" for k, v in m["audio"].items())),
            ("token2wav", ", ".join(f"{k} {v}" for k, v in m["token2wav"]["spec"].items()))]
    width = max(len(k) for k, _ in rows)
    print(f"bundle {bundle.root}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("\n  graph               form     inputs -> outputs")
    for name, g in m["graphs"].items():
        ins = [i for i in g["inputs"] if not i["name"].startswith("past_")]
        outs = [o for o in g["outputs"] if not o["name"].startswith("present_")]
        cache = len(g["inputs"]) - len(ins)
        extra = f" (+{cache} KV-cache tensors, in place)" if cache else ""
        print(f"  {name:<19} {g['form']:<8} {'; '.join(map(_shape, ins))} -> {'; '.join(map(_shape, outs))}{extra}")
        if g["limits"]:
            print(f"  {'':<19} {'':<8} limits: {', '.join(f'{k} {v}' for k, v in g['limits'].items())}")
    total = sum(f["size"] for f in m["files"].values())
    checked = "not checked" if args.no_verify else "verified"
    print(f"\n  {len(m['files'])} files, {total / 1e6:.1f} MB, sha256 {checked}")
    return 0
