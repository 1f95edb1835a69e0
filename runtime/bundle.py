"""The bundle: the contract between export and runtime. A folder with ONNX graphs (+ external data),
embedding tables (.npy), tokenizer files and `manifest.json`, which lists every file with its sha256.

`load_bundle` refuses a bundle whose format version it does not speak, whose files are missing, or whose
bytes differ from the manifest, and says which file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .manifest import FORMAT_VERSION, GraphEntry, Manifest, ManifestError

MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle is missing, incomplete, tampered with, or of another format version."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    root: Path
    manifest: dict  # the manifest as written: checked where load_bundle reads it; `spec` is its typed view
    _spec: Manifest | None = field(default=None, repr=False, compare=False)

    @property
    def spec(self) -> Manifest:
        """The OpenS2S manifest, typed (a speech-tokenizer bundle has none: BundleError says so)."""
        if self._spec is None:
            try:
                self._spec = Manifest.from_json(self.manifest, str(self.root / MANIFEST))
            except ManifestError as exc:
                raise BundleError(str(exc)) from exc
        return self._spec

    def graph(self, name: str) -> dict:
        graphs = self.manifest["graphs"]
        if name not in graphs:
            raise BundleError(f"bundle {self.root} has no graph {name!r} (has: {', '.join(graphs)})")
        return graphs[name]

    def graph_path(self, name: str) -> Path:
        return self.root / self.graph(name)["file"]

    def array(self, name: str) -> np.ndarray:
        """An array saved by export (embedding tables), memory-mapped: pages load as tokens touch them."""
        arrays = self.manifest["arrays"]
        if name not in arrays:
            raise BundleError(f"bundle {self.root} has no array {name!r}")
        return np.load(self.root / arrays[name]["file"], mmap_mode="r")


def read_manifest(path: str | Path) -> dict:
    """A bundle's manifest, checked for its format version and structure (cheap: no file is hashed)."""
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a bundle folder" if root.exists() else "does not exist"
        raise BundleError(f"bundle folder {root} {what}")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{root} is bundle format version {version!r}; this runtime reads version "
                          f"{FORMAT_VERSION} (re-export with a matching opens2s-edge)")
    try:
        # The parts every bundle has (an OpenS2S bundle's other sections are checked by `Bundle.spec`).
        for name, entry in _section(manifest, "graphs", manifest_path).items():
            GraphEntry.from_json(entry, f"{manifest_path}: graphs.{name}")
        for name, entry in _section(manifest, "files", manifest_path).items():
            if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                    and isinstance(entry.get("sha256"), str)):
                raise ManifestError(f"{manifest_path}: files[{name!r}]: expected {{sha256, size}}, got {entry!r:.60}")
        for name, entry in manifest.get("arrays", {}).items():
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)):
                raise ManifestError(f"{manifest_path}: arrays.{name}: expected an object with a 'file'")
    except ManifestError as exc:
        raise BundleError(str(exc)) from exc
    return manifest


def _section(manifest: dict, key: str, where: Path) -> dict:
    value = manifest.get(key)
    if not isinstance(value, dict) or not value:
        raise ManifestError(f"{where}: {key!r} must be a non-empty object, got {type(value).__name__}")
    return value


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle. `verify=False` skips the sha256 pass (sizes are still checked)."""
    root = Path(path)
    manifest = read_manifest(root)
    manifest_path = root / MANIFEST
    files = manifest["files"]
    for rel, entry in files.items():
        file = root / rel
        if not file.is_file():
            raise BundleError(f"bundle {root} is incomplete: {rel} is missing")
        if file.stat().st_size != entry["size"]:
            raise BundleError(f"bundle file {rel} has {file.stat().st_size} bytes, manifest says {entry['size']}: "
                              "the file was changed or truncated")
        if verify and sha256_file(file) != entry["sha256"]:
            raise BundleError(f"bundle file {rel} does not match its sha256 in the manifest: it was modified")
    referenced = [g["file"] for g in manifest["graphs"].values()]
    referenced += [a["file"] for a in manifest.get("arrays", {}).values()]
    unlisted = [rel for rel in referenced if rel not in files]
    if unlisted:
        raise BundleError(f"{manifest_path} references files it does not hash: {', '.join(unlisted)}")
    return Bundle(root, manifest)
