"""Timing utilities shared by every benchmark: percentiles, run-to-run spread, peak memory, machine description,
and running one peer in a fresh process so its memory peak and thread settings are its own.
"""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

LIBRARIES = ("numpy", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-genai", "onnxruntime-gpu",
             "optimum-onnx", "tensorrt", "matplotlib", "psutil", "opens2s-edge")


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p90/p99, mean, min, max and the run-to-run spread of repeated measurements.

    `spread` is (max - min) / p50: how far apart the fastest and slowest run were, relative to the typical one.
    `cv` is the coefficient of variation (std / mean). Both are None for fewer than two runs.
    """
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None,
                "spread": None, "cv": None}
    p50, p90, p99 = (float(np.percentile(v, q)) for q in (50, 90, 99))
    many = v.size > 1
    return {"n": int(v.size), "p50": p50, "p90": p90, "p99": p99, "mean": float(v.mean()), "min": float(v.min()),
            "max": float(v.max()), "spread": float((v.max() - v.min()) / p50) if many and p50 else None,
            "cv": float(v.std(ddof=1) / v.mean()) if many and v.mean() else None}


def repeat(fn: Callable[[], Any], runs: int, warmup: int = 1) -> tuple[list[float], list[Any]]:
    """Call `fn` `warmup` times untimed (allocators, kernels, caches), then `runs` times timed."""
    for _ in range(warmup):
        fn()
    seconds, results = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        results.append(fn())
        seconds.append(time.perf_counter() - t0)
    return seconds, results


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    On Linux this is VmHWM, the high-water mark of the process's own address space: ru_maxrss is not usable in a
    spawned child, because exec carries the parent's peak over into it. Elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Highest RSS seen while a block runs, sampled every `interval` s on a thread: the peak of one phase
    (ru_maxrss only ever grows over the whole process, so it cannot isolate a phase)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def device_memory() -> dict[str, Any] | None:
    """Peak device memory of this process where a GPU backend ran: torch's CUDA allocator peak if torch used the
    GPU, else the used memory nvidia-smi reports for the device (which includes other processes). None without
    a GPU."""
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return {"source": "torch.cuda.max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    smi = _nvidia_smi("memory.used")
    if smi:
        return {"source": "nvidia-smi memory.used (whole device)", "bytes": int(float(smi[0]) * (1 << 20))}
    return None


def _nvidia_smi(field: str) -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def process_rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of any process by pid (Linux VmRSS), for watching another process (a server) over time."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


def open_fds(pid: int | str = "self") -> int:
    """Open file descriptors of a process by pid (Linux)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def _total_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores the process may use, RAM, GPU, OS, Python, libraries."""
    gpus = _nvidia_smi("name,memory.total,driver_version")
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": _total_ram(),
        "gpu": gpus or None,
        "onnxruntime_providers": providers,
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
    }


def _child(fn: Callable[..., dict], args: tuple, conn: Any) -> None:
    try:
        result = fn(*args)
        result.setdefault("memory", {})
        result["memory"]["peak_rss_bytes"] = peak_rss_bytes()
        result["memory"]["device"] = device_memory()
        conn.send(("ok", result))
    except BaseException as exc:  # the parent reports any failure of a peer with its message
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"))
    finally:
        conn.close()


class PeerFailed(RuntimeError):
    """A peer raised in its own process; the message carries its error and traceback."""


def run_isolated(fn: Callable[..., dict], *args: Any, timeout: float | None = None) -> dict:
    """Run `fn(*args)` (a module-level function returning a JSON-able dict) in a fresh spawned process.

    Each peer gets its own process so that its peak RSS is its own, a library's global state (thread pools,
    allocator caches) cannot carry over into the next peer, and a crash of one peer does not end the benchmark.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise PeerFailed(f"no result within {timeout} s")
        status, payload = parent.recv()
    except EOFError as exc:
        proc.join(5)
        raise PeerFailed(f"the peer's process died (exit code {proc.exitcode})") from exc
    finally:
        if proc.is_alive():
            proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join()
    if status != "ok":
        raise PeerFailed(payload)
    return payload
