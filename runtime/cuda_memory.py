"""Device memory, pinned host memory, one stream and CUDA graphs, through NVIDIA's cuda-python.

cuda-python is the binding the TensorRT backend uses (pycuda builds only against a full CUDA toolkit; cuda-python
installs from wheels). Its functions return a tuple `(cudaError_t, result...)` instead of raising: `_call` turns a
non-success code into a `CudaError` that names the call and the CUDA error, so a failure is never silent.

Imported only by the TensorRT backend and its tests; nothing here runs at `import opens2s_edge.runtime`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from .onnx_backend import BackendError

INSTALL_CUDA_PYTHON = ("install NVIDIA's cuda-python matching the driver's CUDA major version, e.g. "
                       "`pip install 'cuda-python>=12,<13'` for CUDA 12 (JetPack 6) or `pip install cuda-python` "
                       "for CUDA 13; or `pip install 'opens2s-edge[trt]'`")


class CudaError(BackendError):
    """A CUDA runtime call failed; the message names the call and CUDA's own error name and text."""


def import_cudart() -> ModuleType:
    """The CUDA runtime binding: `cuda.bindings.runtime` (cuda-python >= 12.6) or `cuda.cudart` (older 12.x)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # cuda-python < 12.6 layout
        except ImportError as exc:
            raise BackendError(f"the TensorRT backend needs cuda-python, which is not importable ({exc}); "
                               + INSTALL_CUDA_PYTHON) from exc
    return cudart


class Cuda:
    """The runtime binding plus the helpers everything else here uses. One per backend."""

    def __init__(self, cudart: ModuleType | None = None):
        self.rt = cudart or import_cudart()

    def call(self, what: str, result: Any) -> Any:
        """Unwrap a cuda-python result tuple: raise on an error code, return the value(s) after it."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise CudaError(f"{what} failed: {self.error_text(err)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def error_text(self, err: Any) -> str:
        try:
            name = self.rt.cudaGetErrorName(err)[1].decode()
            text = self.rt.cudaGetErrorString(err)[1].decode()
            return f"{name} ({text})"
        except Exception:  # an unknown code: the number still says something
            return f"CUDA error {int(err)}"

    # -- the device ----------------------------------------------------------------------------------
    def device_count(self) -> int:
        """GPUs the driver sees; 0 when there is no driver or no GPU (cuda-python returns an error then)."""
        err, count = self.rt.cudaGetDeviceCount()
        return int(count) if int(err) == 0 and count else 0

    def device(self, index: int = 0) -> tuple[str, tuple[int, int]]:
        """(name, (major, minor)) of a GPU: what an engine set is keyed by."""
        self.call("cudaSetDevice", self.rt.cudaSetDevice(index))
        prop = self.call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(index))
        name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
        return name, (int(prop.major), int(prop.minor))

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory, as the driver reports them (what benchmarks record)."""
        free, total = self.call("cudaMemGetInfo", self.rt.cudaMemGetInfo())
        return int(free), int(total)

    # -- memory --------------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        return int(self.call(f"cudaMalloc({nbytes})", self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr: int) -> None:
        self.call("cudaFree", self.rt.cudaFree(ptr))

    def malloc_host(self, nbytes: int) -> int:
        return int(self.call(f"cudaMallocHost({nbytes})", self.rt.cudaMallocHost(max(int(nbytes), 1))))

    def free_host(self, ptr: int) -> None:
        self.call("cudaFreeHost", self.rt.cudaFreeHost(ptr))

    def memset(self, ptr: int, nbytes: int, stream: Stream) -> None:
        self.call("cudaMemsetAsync", self.rt.cudaMemsetAsync(ptr, 0, nbytes, stream.handle))

    def h2d(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call("cudaMemcpyAsync(host to device)", self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream.handle))

    def d2h(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call("cudaMemcpyAsync(device to host)", self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream.handle))


class Stream:
    """One CUDA stream: every copy and every engine launch of a backend is ordered on it."""

    def __init__(self, cuda: Cuda):
        self.cuda = cuda
        # Non-blocking: the legacy default stream (which some libraries use) must not serialize with us, and
        # graph capture is not allowed on it.
        flags = cuda.rt.cudaStreamNonBlocking
        self.stream = cuda.call("cudaStreamCreateWithFlags", cuda.rt.cudaStreamCreateWithFlags(flags))
        self.handle = self.stream
        self.ptr = int(self.stream)  # what TensorRT's execute_async_v3 takes

    def sync(self) -> None:
        self.cuda.call("cudaStreamSynchronize", self.cuda.rt.cudaStreamSynchronize(self.stream))

    def destroy(self) -> None:
        self.cuda.call("cudaStreamDestroy", self.cuda.rt.cudaStreamDestroy(self.stream))


class DeviceBuffer:
    """`nbytes` of device memory at a fixed address (engines are bound to addresses, so they never move)."""

    def __init__(self, cuda: Cuda, nbytes: int, zero_on: Stream | None = None):
        self.cuda, self.nbytes = cuda, int(nbytes)
        self.ptr = cuda.malloc(self.nbytes)
        if zero_on is not None:
            cuda.memset(self.ptr, self.nbytes, zero_on)

    def free(self) -> None:
        if self.ptr:
            self.cuda.free(self.ptr)
            self.ptr = 0


class PinnedArray:
    """Page-locked host memory seen as a numpy array. Copies from it are truly asynchronous and, unlike pageable
    memory, may be recorded in a CUDA graph (the graph replays the copy from this same address)."""

    def __init__(self, cuda: Cuda, shape: tuple[int, ...], dtype: np.dtype | type):
        self.cuda = cuda
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.ptr = cuda.malloc_host(nbytes)
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self.array = np.zeros(0)
            self.cuda.free_host(self.ptr)
            self.ptr = 0


class CudaGraph:
    """A captured sequence of stream work (copies + one engine launch), replayed by one `cudaGraphLaunch`.

    `capture(fn)` records what `fn` enqueues on the stream without running it. Capture is thread-local, so other
    threads' CUDA calls are not affected. If the capture breaks (an operation that cannot be captured), the
    capture is ended, the stream is left usable and `CudaError` is raised: the caller falls back to launching
    normally.
    """

    def __init__(self, cuda: Cuda, stream: Stream):
        self.cuda, self.stream = cuda, stream
        self.exec: Any = None

    def capture(self, fn: Callable[[], None]) -> None:
        rt = self.cuda.rt
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.cuda.call("cudaStreamBeginCapture", rt.cudaStreamBeginCapture(self.stream.stream, mode))
        graph = None
        try:
            fn()
        finally:
            # Always end the capture, even if fn raised, or the stream stays unusable.
            err, graph = rt.cudaStreamEndCapture(self.stream.stream)
        if int(err) != 0 or graph is None:
            raise CudaError(f"CUDA graph capture failed: {self.cuda.error_text(err)}")
        try:
            self.exec = self.cuda.call("cudaGraphInstantiate", rt.cudaGraphInstantiate(graph, 0))
        finally:
            rt.cudaGraphDestroy(graph)  # the executable graph keeps what it needs

    def launch(self) -> None:
        self.cuda.call("cudaGraphLaunch", self.cuda.rt.cudaGraphLaunch(self.exec, self.stream.stream))

    def destroy(self) -> None:
        if self.exec is not None:
            self.cuda.rt.cudaGraphExecDestroy(self.exec)
            self.exec = None
