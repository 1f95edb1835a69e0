"""Bundle ONNX graphs -> TensorRT engines, written into the bundle as one engine set (runtime/engines.py).

The steps, in the order `opens2s-edge build` runs them:
1. `plan_build` (no TensorRT needed): the bundle loads and verifies; the precision fits the bundle's dtype; the
   target fits the graphs' form and the GPU; every graph passes the TensorRT readiness check (checks.py); the
   optimization profiles are derived from the manifest (trt_profiles.py).
2. `import_tensorrt`: TensorRT's Python package, or an error that says how to install it.
3. `build_engines`: for quantized precisions, ModelOpt quantizes the chosen graphs (quantize.py) first; then each
   graph is parsed by TensorRT's ONNX parser into a network, given its profiles, and built into a plan, one
   progress line per graph. Plans are written into a temporary folder inside BUNDLE/engines/, renamed into
   place, and only then recorded in the manifest (runtime/engines.record_engine_set).

Why strongly typed networks: the bundle's graphs already carry their dtypes, including the fp32 islands of fp16/bf16
exports (normalization statistics, softmax, the flow's speaker entry; see export/README.md). A strongly typed
network keeps exactly those types. The classic alternative, an fp32 network built with the FP16 flag, lets TensorRT
pick fp16 anywhere, which is what gives CosyVoice's flow NaN or silence (CosyVoice issues 1113, 1114, 1460).
Quantized graphs (Q/DQ from ModelOpt) are built strongly typed too, as TensorRT 10's documentation asks for explicit
quantization ("precision-control build flags are not required and should not be specified"); `weakly_typed` is
an opt-in for int8/fp8 only, for a TensorRT 10 release that rejects a Q/DQ graph in strongly typed mode: the old
documented recipe of INT8/FP8 plus FP16/BF16 flags.

TensorRT versions (`builder_settings`, keyed on the version string, so it is tested without TensorRT): 10.x takes
the STRONGLY_TYPED network creation flag; 11 removed weakly typed networks, the FP16/BF16/INT8/FP8/INT4/FP4 builder
flags and implicit INT8 calibration, its networks are strongly typed by default, and `--weakly-typed` is refused
there (`RemovedInTensorRT11`) with what to do instead. The readiness check uses the support list of the TensorRT the
engines are for (export/checks.py `release_for`): the installed one, or JetPack 6.2's 10.3 for `--target orin`
without one, or `--tensorrt-version` for a dry run.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from opens2s_edge.runtime.bundle import Bundle, BundleError, load_bundle
from opens2s_edge.runtime.engines import (
    ENGINES_DIR,
    PLAN_SUFFIX,
    EngineSet,
    GpuInfo,
    detect_gpu,
    engine_key,
    record_engine_set,
    staging_dir,
    version_tuple,
)
from opens2s_edge.runtime.files import atomic_file
from opens2s_edge.runtime.token2wav_stream import StreamConfig

from .checks import TensorRTRelease, UnsupportedTensorRT, opset_notes, release_for, tensorrt_readiness
from .trt_profiles import Profile, derive_profiles, stream_record

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4-weight")
QUANTIZED = ("fp8", "int8", "int4-weight")
TARGETS = ("auto", "orin", "rtx")
# TensorRT's ONNX parser gained the opset-23/24 Attention and TensorScatter the modern form uses in 10.15;
# JetPack 6.2 ships 10.3.
MODERN_MIN_TENSORRT = (10, 15)
# FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards; Orin is 8.7. bf16 needs Ampere (8.0) onwards.
FP8_MIN_CAPABILITY = (8, 9)
BF16_MIN_CAPABILITY = (8, 0)
# The graphs each quantized precision quantizes: where the weights and the time are. The token2wav graphs stay at
# the bundle's dtype (the flow/estimator are the NaN-prone ones, HiFT carries a running phase), and so do the two
# small projections.
QUANTIZED_GRAPHS = {
    "int8": ("audio_encoder", "llm", "tts_lm"),
    "fp8": ("audio_encoder", "llm", "tts_lm"),
    "int4-weight": ("llm", "tts_lm"),  # weight-only: pays off where decoding is memory-bound
}
INSTALL_HINT = (
    "TensorRT's Python package is not importable here. On Jetson it comes with JetPack (`sudo apt install "
    "nvidia-jetpack`, then use the system python3 or a venv made with --system-site-packages); on a desktop "
    "install it from NVIDIA's package index: `pip install tensorrt --extra-index-url https://pypi.nvidia.com` "
    "(PyPI's `tensorrt` only fetches from there), plus `pip install cuda-python`. "
    "`opens2s-edge build BUNDLE --dry-run` checks the bundle and prints the profiles without TensorRT.")


# JetPack 6.2 (Jetson Orin) ships TensorRT 10.3: what `--target orin` assumes when no TensorRT is installed here.
JETPACK6_TENSORRT = "10.3"
# Builder flags TensorRT 11 removed (weak typing and its precision switches).
REMOVED_IN_11 = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                 "PREFER_PRECISION_CONSTRAINTS")


class BuildError(RuntimeError):
    """The engines cannot be built as asked; the message says why and what to do instead."""


class RemovedInTensorRT11(BuildError):
    """An option that needs what TensorRT 11 removed (weakly typed networks, precision builder flags)."""


@dataclass(frozen=True)
class BuilderSettings:
    """How one graph is handed to TensorRT: network creation flags, builder flags to set and to clear (by name, as
    attributes of trt.NetworkDefinitionCreationFlag / trt.BuilderFlag)."""

    strongly_typed: bool
    creation_flags: tuple[str, ...] = ()
    set_flags: tuple[str, ...] = ()
    clear_flags: tuple[str, ...] = ()


def tensorrt_major(version: str | None) -> int | None:
    return None if version is None else version_tuple(version)[0]


def builder_settings(trt_version: str, precision: str, weakly_typed: bool = False, bundle_dtype: str = "fp16",
                     fp32: bool = False) -> BuilderSettings:
    """The flags for TensorRT `trt_version` (pure: tested on version strings). 10.x: strongly typed through the
    STRONGLY_TYPED creation flag (or weakly typed with precision flags when asked, int8/fp8 only); 11: strongly typed
    is the default and the only mode, so no creation flag and no precision flag. `fp32`: TF32 cleared (an fp32
    engine is asked for fp32 accuracy)."""
    strongly_typed, flags = network_typing(precision, weakly_typed, bundle_dtype, trt_version)
    major = tensorrt_major(trt_version)
    creation = ("STRONGLY_TYPED",) if strongly_typed and major is not None and major < 11 else ()
    return BuilderSettings(strongly_typed, creation, tuple(flags), ("TF32",) if fp32 else ())


def capability_tuple(gpu: GpuInfo) -> tuple[int, int]:
    major, minor = gpu.compute_capability.split(".")
    return int(major), int(minor)


def is_orin(gpu: GpuInfo) -> bool:
    return "orin" in gpu.name.lower() or capability_tuple(gpu) == (8, 7)


def export_command(manifest: dict, root: Path, dtype: str, form: str) -> str:
    """The `opens2s-edge export` line that rewrites this bundle with another dtype / form."""
    source = manifest.get("source", {})
    suffix = f"-{dtype}" if dtype != manifest.get("dtype") else f"-{form}"
    return (f"opens2s-edge export --checkpoint {source.get('checkpoint', 'CHECKPOINT')} "
            f"--decoder {source.get('decoder', 'DECODER')} --out {root}{suffix} --dtype {dtype} --form {form} "
            f"--max-context {manifest.get('llm', {}).get('max_context', 2048)} "
            f"--max-audio-seconds {manifest.get('audio', {}).get('max_seconds', 30)}")


def check_precision(manifest: dict, root: Path, precision: str) -> None:
    """fp32/fp16/bf16 engines are built from a bundle exported in that dtype: the strongly typed network takes the
    graph's own types, so the dtype is chosen at export (with its fp32 islands), not at build."""
    if precision not in PRECISIONS:
        raise BuildError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = manifest.get("dtype")
    if precision in QUANTIZED or precision == dtype:
        return
    raise BuildError(
        f"--precision {precision} needs a bundle exported with --dtype {precision}, but {root} is {dtype}: TensorRT "
        "builds the graphs strongly typed, in the types they were exported with (the fp32 normalization islands "
        f"included). Export one with:\n  {export_command(manifest, root, precision, manifest.get('form', 'classic'))}")


def graph_forms(manifest: dict, graphs: list[str]) -> dict[str, str]:
    return {g: manifest["graphs"][g].get("form", manifest.get("form", "classic")) for g in graphs}


def check_target(target: str, forms: dict[str, str], precision: str, gpu: GpuInfo | None,
                 trt_version: str | None, manifest: dict | None = None, root: Path | None = None) -> str:
    """The resolved target ('orin' or 'rtx', 'unknown' for auto without a GPU), or BuildError when the bundle's form,
    the precision or the GPU does not fit it. Pure: the GPU and TensorRT version are passed in."""
    if target not in TARGETS:
        raise BuildError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "auto":
        resolved = "unknown" if gpu is None else ("orin" if is_orin(gpu) else "rtx")
    else:
        resolved = target
        if gpu is not None and is_orin(gpu) != (target == "orin"):
            raise BuildError(f"--target {target}, but this GPU is {gpu.name} (compute capability "
                             f"{gpu.compute_capability}): a TensorRT engine runs only on the GPU it is built on, so "
                             "build on the target device itself (or pass --target auto)")
    modern = sorted(g for g, f in forms.items() if f == "modern")
    fix = "; re-export with --form classic"
    if manifest is not None and root is not None:
        fix += f":\n  {export_command(manifest, root, manifest.get('dtype', 'fp16'), 'classic')}"
    if modern and trt_version is not None and version_tuple(trt_version)[:2] < MODERN_MIN_TENSORRT:
        raise BuildError(
            f"graphs {', '.join(modern)} use the modern form (opset 23/24 Attention, TensorScatter, RMSNormalization, "
            f"RotaryEmbedding), which TensorRT {trt_version} cannot parse: it needs TensorRT >= "
            f"{'.'.join(map(str, MODERN_MIN_TENSORRT))}{fix}")
    if modern and resolved == "orin" and trt_version is None:
        raise BuildError(
            f"--target orin: graphs {', '.join(modern)} use the modern form, but JetPack 6.2 ships TensorRT 10.3, "
            "which predates the opset 23/24 Attention and TensorScatter ops (a JetPack 7 Orin with TensorRT >= 10.15 "
            f"takes them: build there with --target auto){fix}")
    capability = capability_tuple(gpu) if gpu is not None else None
    if precision == "fp8" and (resolved == "orin" or (capability is not None and capability < FP8_MIN_CAPABILITY)):
        where = f"{gpu.name} is compute capability {gpu.compute_capability}" if gpu else "Jetson Orin is 8.7"
        raise BuildError(f"--precision fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper and "
                         f"later); {where}. Use int8 or int4-weight instead")
    if precision == "bf16" and capability is not None and capability < BF16_MIN_CAPABILITY:
        raise BuildError(f"--precision bf16 needs compute capability >= 8.0; {gpu.name} is {gpu.compute_capability}")
    return resolved


@dataclass
class BuildPlan:
    """What a build will do, worked out before TensorRT is touched (what `--dry-run` prints)."""

    bundle: Bundle
    precision: str
    target: str
    graphs: list[str]
    profiles: dict[str, list[Profile]]
    readiness: dict[str, list[str]]
    quantize: list[str] = field(default_factory=list)  # graphs ModelOpt quantizes first
    stream: StreamConfig = field(default_factory=StreamConfig)
    release: TensorRTRelease = field(default_factory=lambda: release_for(None))  # the support list checked against
    tensorrt: str | None = None  # the version the checks are for (installed, assumed or asked), None: unknown
    notes: dict[str, list[str]] = field(default_factory=dict)  # per graph: opsets outside the documented range

    def lines(self) -> list[str]:
        from .trt_profiles import describe

        m = self.bundle.manifest
        version = f"TensorRT {self.tensorrt}" if self.tensorrt else "TensorRT unknown here"
        out = [f"bundle {self.bundle.root}: dtype {m.get('dtype')}, form {m.get('form')}, "
               f"max context {m.get('llm', {}).get('max_context')}",
               f"precision {self.precision}, target {self.target}",
               f"checked against {version}: the {self.release.name} ONNX support list ({self.release.covers}; "
               f"opsets {self.release.opsets[0]}..{self.release.opsets[1]}), "
               + ("strongly typed networks only" if not self.release.weak_typing else "strongly typed build")]
        if self.quantize:
            out.append(f"quantized with ModelOpt ({self.precision}): {', '.join(self.quantize)}; other graphs at "
                       f"the bundle's dtype")
        out.append("profiles:")
        out += [f"  {line}" for line in describe(self.profiles)]
        out.append("TensorRT readiness:")
        for name in self.graphs:
            problems = self.readiness[name]
            out.append(f"  {name}: " + ("ready" if not problems else f"{len(problems)} problem(s)"))
            out += [f"    {p}" for p in problems]
            out += [f"    note: {n}" for n in self.notes.get(name, [])]
        return out


def checked_version(trt_version: str | None, target: str) -> str | None:
    """The TensorRT version the checks are for: the installed (or asked) one, else JetPack 6.2's for Orin, else
    unknown (the 10.15 list, the one export checks against)."""
    if trt_version is not None:
        return trt_version
    return JETPACK6_TENSORRT if target == "orin" else None


def plan_build(bundle_path: Path, precision: str | None = None, target: str = "auto", graphs: list[str] | None = None,
               gpu: GpuInfo | None = None, trt_version: str | None = None, stream: StreamConfig | None = None,
               tsv: Path | None = None, verify: bool = True) -> BuildPlan:
    """Everything that can be checked without TensorRT; raises BuildError (or BundleError) on the first refusal
    except readiness, whose problems are collected per graph (see `require_ready`). `trt_version`: the TensorRT the
    engines are for (the installed one; a dry run may name one); `tsv` overrides its support list."""
    try:
        release = release_for(trt_version)
    except UnsupportedTensorRT as exc:
        raise BuildError(str(exc)) from exc
    bundle = load_bundle(bundle_path, verify=verify)
    manifest = bundle.manifest
    precision = precision or manifest.get("dtype", "fp16")  # default: the precision the bundle was exported in
    check_precision(manifest, bundle.root, precision)
    names = list(manifest["graphs"]) if not graphs else list(graphs)
    unknown = [g for g in names if g not in manifest["graphs"]]
    if unknown:
        raise BuildError(f"--graphs: {', '.join(unknown)} not in the bundle (has: {', '.join(manifest['graphs'])})")
    resolved = check_target(target, graph_forms(manifest, names), precision, gpu, trt_version, manifest, bundle.root)
    version = checked_version(trt_version, resolved)
    release = release_for(version)
    stream = stream or StreamConfig()
    profiles = derive_profiles(manifest, stream, names)
    readiness = {g: tensorrt_readiness(bundle.graph_path(g), tsv, release=release) for g in names}
    notes = {g: n for g in names if (n := opset_notes(bundle.graph_path(g), release))}
    quantize = [g for g in QUANTIZED_GRAPHS.get(precision, ()) if g in names]
    return BuildPlan(bundle, precision, resolved, names, profiles, readiness, quantize, stream, release, version,
                     notes)


def require_ready(plan: BuildPlan) -> None:
    failing = {g: p for g, p in plan.readiness.items() if p}
    if failing:
        detail = "\n".join(f"  {g}: {p}" for g, problems in failing.items() for p in problems)
        raise BuildError(f"not TensorRT-ready, nothing built:\n{detail}")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildError(f"{INSTALL_HINT} ({exc})") from exc
    return trt


def network_typing(precision: str, weakly_typed: bool = False, bundle_dtype: str = "fp16",
                   trt_version: str | None = None) -> tuple[bool, list[str]]:
    """(strongly typed?, builder flags). See the module docstring for why. `trt_version`: the TensorRT the engines
    are built with; weak typing is refused on 11, which removed it."""
    if not weakly_typed:
        return True, []
    major = tensorrt_major(trt_version)
    if major is not None and major >= 11:
        raise RemovedInTensorRT11(
            f"--weakly-typed needs weakly typed networks and the {precision.upper()}/FP16 builder flags, which "
            f"TensorRT {trt_version} no longer has (TensorRT 11 builds strongly typed networks only, precision coming "
            f"from the graph's own types and explicit Q/DQ). Build without --weakly-typed: `--precision {precision}` "
            "quantizes with ModelOpt into Q/DQ and builds that strongly typed; if TensorRT rejects the Q/DQ graph, "
            "its parser error names the node to fix")
    if precision not in ("int8", "fp8"):
        raise BuildError(f"weakly typed builds are only for int8/fp8 Q/DQ graphs; --precision {precision} is built "
                         "strongly typed (an fp16 flag on a weakly typed network is what gives the flow NaN)")
    high = {"fp16": "FP16", "bf16": "BF16"}.get(bundle_dtype)
    return False, [f for f in (precision.upper(), high) if f]


# -- timing cache --------------------------------------------------------------------------------------
def default_timing_cache(gpu: GpuInfo, trt_version: str) -> Path:
    """One cache per GPU and TensorRT version (TensorRT ignores or rejects a cache from another): tactic timings
    are reused by every later build on this machine, whatever the bundle."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "opens2s-edge" / "tensorrt"
    return base / f"{gpu.slug}-trt{trt_version}.timing-cache"


class TimingCache:
    """A persistent ITimingCache: loaded from `path` if present (an unusable file is replaced, with a note), given
    to every builder config, written back atomically after each engine."""

    def __init__(self, config, path: Path, progress: Callable[[str], None]):
        self.path = Path(path)
        data = self.path.read_bytes() if self.path.is_file() else b""
        try:
            self.cache = config.create_timing_cache(data)
        except Exception:  # TensorRT raises its own types for a corrupt or foreign cache blob
            self.cache = None
        if data and self.cache is None:
            progress(f"[build] timing cache {self.path} is not usable with this TensorRT; starting a new one")
            self.cache = config.create_timing_cache(b"")
        elif data:
            progress(f"[build] timing cache loaded from {self.path} ({len(data) / 1e6:.1f} MB)")

    def attach(self, config, progress: Callable[[str], None]) -> None:
        # ignore_mismatch=False: a cache from another GPU/TensorRT is refused by TensorRT, not silently used.
        if not config.set_timing_cache(self.cache, False):
            progress(f"[build] timing cache {self.path} does not match this GPU/TensorRT; not used")

    def save(self, config) -> None:
        data = bytes(config.get_timing_cache().serialize())
        with atomic_file(self.path) as tmp:
            tmp.write_bytes(data)


# -- one engine ----------------------------------------------------------------------------------------
def _creation_flags(trt, settings: BuilderSettings) -> int:
    flags = 0
    for name in settings.creation_flags:
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is None:
            raise BuildError(f"TensorRT {trt.__version__} has no NetworkDefinitionCreationFlag.{name}: strongly typed "
                             "networks need TensorRT >= 10 (JetPack 6 ships 10.3)")
        flags |= 1 << int(flag)
    return flags


def _parse(trt, builder, logger, onnx_path: Path, settings: BuilderSettings):
    network = builder.create_network(_creation_flags(trt, settings))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file reads the external weights (<graph>.onnx.data) from beside the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = getattr(err, "node_name", lambda: "")() or f"#{err.node()}"
            op = getattr(err, "node_operator", lambda: "")()
            errors.append(f"node {node} {f'({op}) ' if op else ''}{err.desc()}")
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n  " + "\n  ".join(errors))
    return network, parser


def _add_profiles(builder, network, config, name: str, profiles: list[Profile]) -> None:
    for p in profiles:
        opt_profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if tensor.name not in p.shapes:
                raise BuildError(f"{name}: TensorRT sees input {tensor.name!r}, which the manifest does not list")
            lo, opt, hi = p.shapes[tensor.name]
            dims = list(tensor.shape)
            if len(dims) != len(lo) or any(d not in (-1, s) for d, s in zip(dims, lo, strict=True)):
                raise BuildError(f"{name}: input {tensor.name!r} is {dims} in TensorRT, {lo} in the manifest")
            if tensor.is_shape_tensor:
                if tensor.name not in p.values:
                    raise BuildError(f"{name}: TensorRT treats {tensor.name!r} as a shape tensor; its value range is "
                                     "unknown (add it to the profile rule in export/trt_profiles.py)")
                vlo, vopt, vhi = p.values[tensor.name]
                opt_profile.set_shape_input(tensor.name, [vlo], [vopt], [vhi])
            if -1 in dims:
                opt_profile.set_shape(tensor.name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)


def build_engine(trt, builder, logger, onnx_path: Path, name: str, profiles: list[Profile], *,
                 settings: BuilderSettings, workspace_gb: float | None = None, timing: TimingCache | None = None,
                 out: Path, progress: Callable[[str], None] = print) -> int:
    """One graph -> one plan file at `out` with its profiles, in profile order; returns its size in bytes."""
    network, _parser = _parse(trt, builder, logger, onnx_path, settings)
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for flag in settings.set_flags:
        value = getattr(trt.BuilderFlag, flag, None)
        if value is None:
            raise RemovedInTensorRT11(f"TensorRT {trt.__version__} has no BuilderFlag.{flag}; build without "
                                      "--weakly-typed (strongly typed, explicit Q/DQ)")
        config.set_flag(value)
    for flag in settings.clear_flags:
        # TF32 is on by default for fp32 tensors on Ampere+: 10-bit mantissas inside matmuls. An fp32 build is asked
        # for fp32 accuracy. (A TensorRT without the flag has nothing to clear.)
        value = getattr(trt.BuilderFlag, flag, None)
        if value is not None:
            config.clear_flag(value)
    if timing is not None:
        timing.attach(config, progress)
    _add_profiles(builder, network, config, name, profiles)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build {name} (see TensorRT's log above)")
    if timing is not None:
        timing.save(config)
    # Written from TensorRT's own buffer: a bytes() copy would hold a second full-size plan in memory (15 GB for
    # the fp16 LLM; on a Jetson that is the GPU's memory too).
    with open(out, "wb") as f:
        f.write(memoryview(serialized))
    size = out.stat().st_size
    del serialized
    return size


# -- the whole set -------------------------------------------------------------------------------------
def build_engines(plan: BuildPlan, trt, gpu: GpuInfo, *, workspace_gb: float | None = None,
                  timing_cache: Path | None = None, force: bool = False, weakly_typed: bool = False,
                  calibration_wavs: list[Path] | None = None,
                  progress: Callable[[str], None] = print) -> EngineSet:
    """Build every graph of `plan` into BUNDLE/engines/<key>/ and record the set in the manifest."""
    require_ready(plan)
    bundle = plan.bundle
    manifest = bundle.manifest
    trt_version = trt.__version__
    key = engine_key(gpu, trt_version, plan.precision)
    existing = manifest.get("engines", {}).get(key)
    again = [g for g in plan.graphs if existing and g in existing.get("graphs", {})]
    if again and not force:
        raise BuildError(f"engine set {key} already has {', '.join(again)}; pass --force to rebuild")
    strongly_typed, flags = network_typing(plan.precision, weakly_typed, manifest.get("dtype", "fp16"), trt_version)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(gpu, trt_version)
    staged = staging_dir(bundle.root, key)
    try:
        sources = {g: bundle.graph_path(g) for g in plan.graphs}
        graph_precision = {g: manifest["graphs"][g].get("dtype", manifest.get("dtype")) for g in plan.graphs}
        if plan.quantize:
            from .quantize import quantize_bundle_graphs

            quantized = quantize_bundle_graphs(bundle, plan.quantize, plan.precision, staged / "quantized",
                                               staged / "calibration.npz", wavs=calibration_wavs, progress=progress)
            sources.update(quantized)
            graph_precision.update(dict.fromkeys(quantized, plan.precision))
            for g, path in quantized.items():
                problems = tensorrt_readiness(path, release=release_for(trt_version))
                if problems:
                    raise BuildError(f"{g} after {plan.precision} quantization is not TensorRT-ready:\n  "
                                     + "\n  ".join(problems))
        builder = trt.Builder(logger)
        timing = None
        entry_graphs = {}
        for i, name in enumerate(plan.graphs, 1):
            t0 = time.perf_counter()
            progress(f"[build] {i}/{len(plan.graphs)} {name}: parsing {sources[name].name} "
                     f"({'strongly typed' if strongly_typed else 'weakly typed ' + '+'.join(flags)}, "
                     f"{len(plan.profiles[name])} profile(s))")
            if timing is None:
                # The cache object outlives the per-graph builder configs: timings found for one graph (the LLM's
                # matmuls) are reused by the next (the TTS LM's).
                timing = TimingCache(builder.create_builder_config(), cache_path, progress)
            settings = builder_settings(trt_version, plan.precision, weakly_typed, manifest.get("dtype", "fp16"),
                                        fp32=graph_precision[name] == "fp32")
            size = build_engine(trt, builder, logger, sources[name], name, plan.profiles[name], settings=settings,
                                workspace_gb=workspace_gb, timing=timing, out=staged / f"{name}{PLAN_SUFFIX}",
                                progress=progress)
            entry_graphs[name] = {"file": f"{name}{PLAN_SUFFIX}", "precision": graph_precision[name],
                                  "profiles": [p.to_json() for p in plan.profiles[name]]}
            progress(f"[build] {i}/{len(plan.graphs)} {name}: built, {size / 1e6:.1f} MB "
                     f"({time.perf_counter() - t0:.1f} s)")
        if timing is not None:
            progress(f"[build] timing cache saved to {cache_path}")
        shutil.rmtree(staged / "quantized", ignore_errors=True)  # the plans hold the quantized weights now
        _keep_other_graphs(existing, plan.graphs, bundle.root, staged, entry_graphs)
        entry = {"gpu": gpu.to_json(), "tensorrt": trt_version, "precision": plan.precision,
                 "form": manifest.get("form", "classic"), "target": plan.target,
                 "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "strongly_typed": strongly_typed, "stream": stream_record(plan.stream), "graphs": entry_graphs}
        engine_set = record_engine_set(bundle.root, key, entry, staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    progress(f"[build] engine set {key} recorded in {bundle.root / 'manifest.json'}")
    return engine_set


def _keep_other_graphs(existing: dict | None, rebuilt: list[str], root: Path, staged: Path, graphs: dict) -> None:
    """A `--graphs` subset rebuild keeps the set's other engines: they are linked (or copied) into the new folder."""
    if not existing:
        return
    for name, graph in existing.get("graphs", {}).items():
        if name in rebuilt:
            continue
        src = root / graph["file"]
        if not src.is_file():
            raise BundleError(f"engine {graph['file']} listed in the manifest is missing")
        dst = staged / src.name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        graphs[name] = {**graph, "file": src.name}


def gpu_or_error() -> GpuInfo:
    gpu = detect_gpu()
    if gpu is None:
        raise BuildError("no CUDA GPU found (cuda-python could not query one and nvidia-smi is absent or sees none); "
                         "install cuda-python (`pip install cuda-python`) and check the driver")
    return gpu


__all__ = ["ENGINES_DIR", "BuildError", "BuildPlan", "BuilderSettings", "RemovedInTensorRT11", "build_engines",
           "builder_settings", "check_precision", "check_target", "checked_version", "import_tensorrt",
           "network_typing", "plan_build"]
