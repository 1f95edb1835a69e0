"""`opens2s-edge tokenize`: speech -> GLM-4-Voice's 12.5 Hz units, per file.

`--tokenizer` is either the released tokenizer folder (config.json, model.safetensors, preprocessor_config.json: run
on PyTorch) or a tokenizer bundle from `opens2s-edge export-tokenizer` (manifest.json: onnxruntime, no torch
imported). `--audio` takes files and folders (every .wav/.flac/.ogg below, sorted). The files are batched as the
reference batches one list, so the units equal its units for the same files in the same order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=Path, required=True,
                   help="GLM-4-Voice tokenizer folder, or a tokenizer bundle written by export-tokenizer")
    p.add_argument("--audio", type=Path, nargs="+", required=True, help="audio files and/or folders of them")
    p.add_argument("--json", action="store_true", help="one JSON object per file (jsonl) instead of text lines")
    p.add_argument("--strings", action="store_true", help="units as <|audio_i|> strings (the training data's form)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="segments padded alike, as the reference batches them (changes the last token of a "
                        "segment at most; keep 128 for the reference's units)")
    p.add_argument("--chunk", type=int, default=8, help="segments run at once (memory only; units do not change)")
    p.add_argument("--device", default="cpu", help="PyTorch device for a released folder (cpu, cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def audio_files(paths: list[Path]) -> list[Path]:
    """Files as given; folders expanded to their audio files (recursively, sorted)."""
    from opens2s_edge.cli import UserError

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise UserError(f"folder {path} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise UserError(f"audio {path} does not exist")
    return files


def open_tokenizer(folder: Path, device: str):
    """The ONNX tokenizer for a bundle (torch is never imported), the PyTorch one for a released folder."""
    from opens2s_edge.runtime import speech_tokenizer as st

    if (folder / "manifest.json").is_file():
        return st.OnnxSpeechTokenizer(folder)
    from .speech_tokenizer import open_speech_tokenizer

    return open_speech_tokenizer(folder, device)


def main(args: argparse.Namespace) -> int:
    from opens2s_edge.cli import UserError
    from opens2s_edge.runtime import speech_tokenizer as st
    from opens2s_edge.runtime.audio import AudioInputError

    if args.batch_size < 1 or args.chunk < 1:
        raise UserError("--batch-size and --chunk must be at least 1")
    files = audio_files(args.audio)
    try:
        for path in files:  # every file's header before the model loads or anything runs
            st.check_audio_file(path)
        tokenizer = open_tokenizer(args.tokenizer, args.device)
    except (AudioInputError, st.SpeechTokenizerError) as exc:
        raise UserError(str(exc)) from exc

    def log(line: str) -> None:
        if not args.quiet:
            print(f"[tokenize] {line}", file=sys.stderr, flush=True)

    log(f"{len(files)} file(s), tokenizer {tokenizer.name} ({tokenizer.source}), {tokenizer.rate_hz:g} Hz units")
    read: dict[int, st.AudioInput] = {}

    def inputs():
        for i, path in enumerate(files):
            item = st.read_audio(path, report=False)
            for note in item.notes:
                log(f"{path}: {note}")
            read[i] = item
            yield item.wav

    def progress(segments: int, done: int) -> None:
        log(f"{done}/{len(files)} files, {segments} segments")

    try:
        for index, units in st.iter_tokenize(tokenizer.run_batch, inputs(), tokenizer.structure, tokenizer.features,
                                             args.batch_size, args.chunk, on_batch=progress):
            item = read.pop(index)
            text = st.units_to_strings(units) if args.strings else " ".join(map(str, units))
            if args.json:
                row = {"audio": item.name, "units": units, "n_units": len(units),
                       "seconds": round(item.wav.size / st.SAMPLE_RATE, 4), "sample_rate": item.sample_rate,
                       "channels": item.channels, "resampled": item.resampled, "notes": item.notes,
                       "tokenizer": tokenizer.name, "tokenizer_source": tokenizer.source}
                if args.strings:
                    row["speech_units"] = text
                print(json.dumps(row), flush=True)
            else:
                print(f"{item.name}\t{text}", flush=True)
    except (AudioInputError, st.SpeechTokenizerError) as exc:
        raise UserError(str(exc)) from exc
    return 0
