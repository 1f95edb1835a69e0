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
    if "llm" in m:
        try:
            _ = bundle.spec  # an OpenS2S bundle: its whole schema checked, a malformed field named
        except BundleError as exc:
            raise UserError(str(exc)) from exc

    def fields(section: object) -> str:
        if isinstance(section, dict):
            return ", ".join(f"{k} {fields(v) if isinstance(v, dict) else v}" for k, v in section.items())
        return str(section)

    # A speech-tokenizer bundle has only some of an OpenS2S bundle's sections: show what is there.
    labels = [("format_version", "format version"), ("dtype", "dtype"), ("interleave_strategy", "interleave M:N"),
              ("versions", "exported with"), ("llm", "LLM"), ("tts", "TTS LM"), ("generation", "generation"),
              ("speech_tokens", "speech tokens"), ("audio", "audio"), ("token2wav", "token2wav"),
              ("speech_tokenizer", "speech tokenizer")]
    rows = [(label, fields(m[key]["spec"] if key == "token2wav" else m[key])) for key, label in labels if key in m]
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
