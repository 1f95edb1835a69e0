"""TensorRT engine sets in a bundle: where they are recorded, which one fits this machine, and why the others do not.

A TensorRT plan file is only valid for the TensorRT version and the GPU (compute capability) it was built with, so
a bundle may carry several engine sets side by side, one folder each under `engines/`, keyed by GPU, TensorRT
version and precision. The manifest lists them:

    manifest["engines"][key] = {
        "dir": "engines/<key>",
        "gpu": {"name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"},
        "tensorrt": "10.3.0", "precision": "fp16", "form": "classic", "built": "2026-01-31T12:00:00+00:00",
        "graphs": {"llm": {"file": "engines/<key>/llm.plan",
                           "profiles": [{"name": "prefill", "shapes": {"inputs_embeds": [min, opt, max], ...}},
                                        {"name": "decode", "shapes": {...}}]}, ...},
    }

and every plan file is hashed under manifest["files"] like any other bundle file, so `load_bundle` verifies it.

Torch-free and tensorrt-free: the runtime imports this to choose an engine set before it touches TensorRT, and the
builder (export/trt_build.py) imports it to record a new set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .bundle import MANIFEST, Bundle, BundleError, sha256_file
from .files import write_text_atomic

ENGINES_DIR = "engines"
PLAN_SUFFIX = ".plan"
# When several sets fit this GPU and TensorRT and no precision is asked for, the first of these present wins:
# fp16 is the precision every engine GPU runs natively and the one the export verifies most tightly.
PRECISION_PREFERENCE = ("fp16", "bf16", "int4-weight", "int8", "fp8", "fp32")


class EngineMismatch(BundleError):
    """No engine set in the bundle fits this GPU / TensorRT version / precision; the message says why each does not."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "major.minor", e.g. "8.7" for Jetson Orin, "8.9" for RTX 40xx

    @property
    def slug(self) -> str:
        """The GPU part of an engine key: lowercased name, non-alphanumerics as '-', plus `-sm<major><minor>`."""
        major, minor = _capability(self.compute_capability)
        return f"{_name_slug(self.name)}-sm{major}{minor}"

    def to_json(self) -> dict:
        return {"name": self.name, "compute_capability": self.compute_capability}


def _name_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")


def _capability(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"compute capability must look like '8.7', got {text!r}")
    return int(match.group(1)), int(match.group(2))


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.15.1.29' -> (10, 15, 1, 29); non-numeric tails ('10.3.0.post1') are ignored."""
    parts = []
    for piece in str(version).split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def engine_key(gpu: GpuInfo, trt_version: str, precision: str) -> str:
    return f"{gpu.slug}-trt{trt_version}-{precision}"


@dataclass
class EngineSet:
    """One engine set of a bundle: `root` is the bundle folder, `entry` its manifest["engines"][key] record."""

    key: str
    root: Path
    entry: dict

    @property
    def precision(self) -> str:
        return self.entry["precision"]

    @property
    def graphs(self) -> list[str]:
        return list(self.entry.get("graphs", {}))

    def _graph(self, name: str) -> dict:
        graphs = self.entry.get("graphs", {})
        if name not in graphs:
            raise EngineMismatch(
                f"engine set {self.key} has no engine for graph {name!r} (has: {', '.join(graphs) or 'none'}); "
                f"build it with: opens2s-edge build {self.root} --precision {self.precision} --graphs {name}")
        return graphs[name]

    def graph_path(self, name: str) -> Path:
        return self.root / self._graph(name)["file"]

    def profiles(self, name: str) -> list[dict]:
        """The optimization profiles of a graph's engine, in TensorRT's profile index order."""
        return list(self._graph(name)["profiles"])


def _why_not(entry: dict, gpu: GpuInfo, trt_version: str, precision: str | None) -> list[str]:
    reasons = []
    built_gpu = entry.get("gpu", {})
    if _name_slug(built_gpu.get("name", "")) != _name_slug(gpu.name):
        reasons.append(f"built for another GPU ({built_gpu.get('name')}, this is {gpu.name})")
    if built_gpu.get("compute_capability") != gpu.compute_capability:
        reasons.append(f"built for compute capability {built_gpu.get('compute_capability')}, "
                       f"this GPU has {gpu.compute_capability}")
    if entry.get("tensorrt") != trt_version:
        reasons.append(f"built with TensorRT {entry.get('tensorrt')}, this is TensorRT {trt_version}: a plan file "
                       "is only valid for the TensorRT version and GPU it was built with")
    if precision is not None and entry.get("precision") != precision:
        reasons.append(f"precision {entry.get('precision')}, {precision} was asked for")
    return reasons


def select_engine_set(bundle: Bundle, gpu: GpuInfo, trt_version: str, precision: str | None = None) -> EngineSet:
    """The engine set built for this GPU and TensorRT version (and `precision`, if given), or EngineMismatch
    explaining, set by set, why none fits and how to build one."""
    engines = bundle.manifest.get("engines") or {}
    build = (f"opens2s-edge build {bundle.root} --precision {precision or 'fp16'}"
             " (on this machine: engines are built for the GPU and TensorRT version they run on)")
    if not engines:
        raise EngineMismatch(f"bundle {bundle.root} has no TensorRT engines; build them with: {build}")
    fitting = {}
    lines = []
    for key, entry in engines.items():
        reasons = _why_not(entry, gpu, trt_version, precision)
        if reasons:
            lines.append(f"  {key}: " + "; ".join(reasons))
        else:
            fitting[key] = entry
    if not fitting:
        raise EngineMismatch(
            f"no engine set in {bundle.root} fits this machine ({gpu.name}, compute capability "
            f"{gpu.compute_capability}, TensorRT {trt_version}"
            + (f", precision {precision}" if precision else "") + "):\n" + "\n".join(lines)
            + f"\nbuild a matching set with: {build}")
    rank = {p: i for i, p in enumerate(PRECISION_PREFERENCE)}
    key = min(fitting, key=lambda k: (rank.get(fitting[k].get("precision"), len(rank)), k))
    return EngineSet(key, bundle.root, fitting[key])


# -- recording a new set -------------------------------------------------------------------------------
def staging_dir(bundle_root: Path, key: str) -> Path:
    """A fresh temporary folder inside BUNDLE/engines/ (same file system, so the final rename is atomic)."""
    parent = Path(bundle_root) / ENGINES_DIR
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{key}.partial.", dir=parent))


def _write_manifest(root: Path, manifest: dict) -> None:
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def record_engine_set(bundle_root: Path, key: str, entry: dict, staged: Path) -> EngineSet:
    """Move the engine files in `staged` (a folder made by `staging_dir`) to BUNDLE/engines/<key> and record
    `entry` under manifest["engines"][key], hashing every file into manifest["files"]. An existing set of the same
    key is replaced.

    `entry` is the record without "dir" and with each graph's "file" given relative to `staged` (e.g. "llm.plan").
    The manifest never lists a file that is not in place: an old set of the same key is first dropped from the
    manifest, then its folder is swapped for the new one, and only then is the new set written into the manifest.
    """
    root = Path(bundle_root)
    staged = Path(staged)
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    rel_dir = f"{ENGINES_DIR}/{key}"
    final = root / rel_dir
    entry = dict(entry)
    graphs = {}
    for name, graph in entry.get("graphs", {}).items():
        if not (staged / graph["file"]).is_file():
            raise BundleError(f"engine for graph {name!r} is missing from {staged}: {graph['file']}")
        graphs[name] = {**graph, "file": f"{rel_dir}/{graph['file']}"}
    entry.update(dir=rel_dir, graphs=graphs)
    entry.setdefault("built", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    hashed = {f"{rel_dir}/{p.relative_to(staged).as_posix()}": {"sha256": sha256_file(p), "size": p.stat().st_size}
              for p in sorted(staged.rglob("*")) if p.is_file()}

    # 1. forget the old set of this key (its files stay until the new ones are in place)
    trash = None
    if key in manifest.get("engines", {}) or final.exists():
        manifest.get("engines", {}).pop(key, None)
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(rel_dir + "/")}
        _write_manifest(root, manifest)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{key}.old.", dir=final.parent))
            os.replace(final, trash / "set")
    # 2. the new files under their final name (one rename within the engines folder)
    os.replace(staged, final)
    # 3. the manifest that lists them
    manifest.setdefault("engines", {})[key] = entry
    manifest["files"].update(hashed)
    _write_manifest(root, manifest)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return EngineSet(key, root, entry)


# -- this machine ------------------------------------------------------------------------------------------
def detect_gpu(device: int = 0) -> GpuInfo | None:
    """The GPU's name and compute capability through cuda-python (what the TensorRT backend uses), else
    nvidia-smi; None when neither finds a GPU."""
    info = _gpu_from_cuda_python(device)
    return info if info is not None else _gpu_from_nvidia_smi(device)


def _gpu_from_cuda_python(device: int) -> GpuInfo | None:
    try:  # cuda-python >= 12.6 moved the runtime bindings to cuda.bindings; older releases have cuda.cudart
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return None
    err, props = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name.rstrip("\x00").strip(), f"{props.major}.{props.minor}")


def _gpu_from_nvidia_smi(device: int) -> GpuInfo | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--id={device}", "--query-gpu=name,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    name, _, capability = out.strip().rpartition(",")
    try:
        _capability(capability)
    except ValueError:
        return None
    return GpuInfo(name.strip(), capability.strip())
