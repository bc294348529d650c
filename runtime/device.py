"""The device runtime of the kernels library: memory, pinned memory, streams, events, graphs.

Everything goes through the library's own ``freedit_rt_*`` entry points (runtime/csrc/
device_runtime.cu), so the FREE round runs the same Python on a GPU and on the library's host
emulation (runtime/csrc/emulation, where device memory is host memory and every launch runs on
host threads). Handles are plain CUDA handles: TensorRT, ONNX Runtime and torch accept them.
"""
from __future__ import annotations

import ctypes
import math
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np

from freedit.runtime.kernels import HOST_FN, CudaError, Kernels

H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyKind
_NOT_READY = 600  # cudaErrorNotReady


@dataclass(eq=False)
class DeviceBuffer:
    """A dense row-major device allocation (or a view of its first rows)."""

    device: "Device"
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: bool = True

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None}

    def rows(self, n: int) -> "DeviceBuffer":
        """A view of the first ``n`` rows (what an engine call of ``n`` rows reads or writes)."""
        if not 0 <= n <= self.shape[0]:
            raise ValueError(f"{n} rows do not fit a buffer of {self.shape[0]}")
        return DeviceBuffer(self.device, self.ptr, (n, *self.shape[1:]), self.dtype, owner=False)

    def host(self) -> np.ndarray:
        """A numpy view of the memory: only where device memory is host memory (the emulation)."""
        if not self.device.emulated:
            raise RuntimeError("device memory is not host memory on a GPU; copy it with Device.download")
        if self.nbytes == 0:
            return np.empty(self.shape, self.dtype)
        raw = (ctypes.c_char * self.nbytes).from_address(self.ptr)
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.shape)


class Stream:
    def __init__(self, device: "Device", handle: int):
        self.device, self.handle = device, handle

    def synchronize(self) -> None:
        self.device.check(self.device.lib.freedit_rt_stream_synchronize(self.handle), "stream synchronize")

    def wait(self, event: "Event") -> None:
        self.device.check(self.device.lib.freedit_rt_stream_wait_event(self.handle, event.handle), "stream wait event")

    def record(self, event: "Event") -> "Event":
        self.device.check(self.device.lib.freedit_rt_event_record(event.handle, self.handle), "event record")
        return event

    def capturing(self) -> bool:
        flag = ctypes.c_int(0)
        self.device.check(self.device.lib.freedit_rt_is_capturing(self.handle, ctypes.byref(flag)), "is capturing")
        return bool(flag.value)

    def launch_host_func(self, fn) -> None:
        """Run ``fn()`` in stream order (a host node when captured). The callback is kept alive."""
        def trampoline(_data, fn=fn):
            try:
                fn()
            except BaseException as exc:  # a host function cannot raise through CUDA: keep it for the caller
                self.device.host_errors.append(exc)

        cb = HOST_FN(trampoline)
        # alive until it has run: with its graph when captured, else among the most recent ones (a host
        # function on a device lane only occurs in the emulation, which runs it before returning)
        (self.device._capture_keep if self.capturing() else self.device._recent).append(cb)
        self.device.check(self.device.lib.freedit_rt_launch_host_func(self.handle, cb, None), "launch host func")


class Event:
    def __init__(self, device: "Device", handle: int):
        self.device, self.handle = device, handle

    def synchronize(self) -> None:
        self.device.check(self.device.lib.freedit_rt_event_synchronize(self.handle), "event synchronize")

    def done(self) -> bool:
        code = self.device.lib.freedit_rt_event_query(self.handle)
        if code == _NOT_READY:
            return False
        self.device.check(code, "event query")
        return True

    def elapsed_ms(self, since: "Event") -> float:
        ms = ctypes.c_float(0.0)
        self.device.check(self.device.lib.freedit_rt_event_elapsed_ms(ctypes.byref(ms), since.handle, self.handle),
                          "event elapsed time")
        return float(ms.value)


class Graph:
    """An instantiated CUDA graph (cudaGraphExec_t), the host callbacks its host nodes call, and
    what one replay launches and copies (counted at capture)."""

    def __init__(self, device: "Device", handle: int, callbacks: list, work: tuple[int, int, int]):
        self.device, self.handle, self.callbacks, self.work = device, handle, callbacks, work

    def launch(self, stream: Stream) -> None:
        self.device.check(self.device.lib.freedit_rt_graph_launch(self.handle, stream.handle), "graph launch")
        self.device.replayed = tuple(a + b for a, b in zip(self.device.replayed, (1, *self.work)))


class Device:
    """One CUDA device (or the emulation) through a loaded kernels library; owns what it allocates."""

    def __init__(self, kernels: Kernels, device_id: int = 0):
        self.kernels, self.lib, self.device_id = kernels, kernels.lib, int(device_id)
        self.emulated = bool(getattr(kernels, "emulated", False))
        count, code = kernels.device_count()
        if code != 0 or count == 0:
            raise CudaError("cudaGetDeviceCount", code, kernels.error_name(code),
                            f"{kernels.error_string(code)}: no CUDA device for the device round")
        if not 0 <= self.device_id < count:
            raise ValueError(f"device {device_id} does not exist: {count} CUDA device(s) present")
        self.make_current()
        self._buffers: dict[int, DeviceBuffer] = {}
        self._pinned: dict[int, int] = {}
        self._streams: list[Stream] = []
        self._events: list[Event] = []
        self._graphs: list[Graph] = []
        self._recent: deque = deque(maxlen=4096)
        self._capture_keep: list = []
        self._capture_start = (0, 0, 0)
        self._captured = (0, 0, 0)
        self.replayed = (0, 0, 0, 0)  # graph launches, and the kernel launches and bytes inside them
        self.host_errors: list[BaseException] = []

    # -- errors, threads --------------------------------------------------------------------------
    def check(self, code: int, what: str) -> None:
        if code:
            raise CudaError(what, int(code), self.kernels.error_name(code), self.kernels.error_string(code))

    def make_current(self) -> None:
        """cudaSetDevice on the calling thread (each host thread has its own current device)."""
        self.check(self.lib.freedit_rt_set_device(self.device_id), f"cudaSetDevice({self.device_id})")

    def compute_capability(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        self.check(self.lib.freedit_rt_compute_capability(self.device_id, ctypes.byref(major), ctypes.byref(minor)),
                   "compute capability")
        return major.value, minor.value

    def memory_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self.check(self.lib.freedit_rt_mem_get_info(ctypes.byref(free), ctypes.byref(total)), "memory info")
        return free.value, total.value

    def raise_host_errors(self) -> None:
        if self.host_errors:
            exc, self.host_errors = self.host_errors[0], []
            raise exc

    # -- memory -------------------------------------------------------------------------------------
    def alloc(self, shape, dtype) -> DeviceBuffer:
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        ptr = ctypes.c_void_p(0)
        nbytes = max(math.prod(shape) * dtype.itemsize, 1)
        self.check(self.lib.freedit_rt_malloc(ctypes.byref(ptr), nbytes), f"cudaMalloc({nbytes} bytes)")
        buf = DeviceBuffer(self, int(ptr.value), shape, dtype)
        self._buffers[buf.ptr] = buf
        return buf

    def free(self, buf: DeviceBuffer) -> None:
        if buf.owner and self._buffers.pop(buf.ptr, None) is not None:
            self.check(self.lib.freedit_rt_free(buf.ptr), "cudaFree")

    def pinned(self, shape, dtype) -> np.ndarray:
        """A numpy array over pinned (page-locked) host memory, freed with the device."""
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        nbytes = max(math.prod(shape) * dtype.itemsize, 1)
        ptr = ctypes.c_void_p(0)
        self.check(self.lib.freedit_rt_host_alloc(ctypes.byref(ptr), nbytes), f"cudaMallocHost({nbytes} bytes)")
        self._pinned[int(ptr.value)] = nbytes
        raw = (ctypes.c_char * nbytes).from_address(int(ptr.value))
        return np.frombuffer(raw, dtype=dtype, count=math.prod(shape)).reshape(shape)

    def copy(self, dst_ptr: int, src_ptr: int, nbytes: int, kind: int, stream: Stream | None) -> None:
        code = self.lib.freedit_rt_memcpy_async(dst_ptr, src_ptr, nbytes, kind, stream.handle if stream else None)
        self.check(code, "cudaMemcpyAsync")

    def upload(self, host: np.ndarray, buf: DeviceBuffer, stream: Stream | None = None) -> None:
        """Host -> device; synchronous unless ``host`` is pinned and a stream is given."""
        host = np.ascontiguousarray(host, dtype=buf.dtype)
        if host.nbytes > buf.nbytes:
            raise ValueError(f"{host.nbytes} bytes do not fit a buffer of {buf.nbytes}")
        self.copy(buf.ptr, host.ctypes.data, host.nbytes, H2D, stream)
        if stream is None or host.ctypes.data not in self._pinned:
            (stream.synchronize() if stream else self.synchronize())

    def download(self, buf: DeviceBuffer, stream: Stream | None = None) -> np.ndarray:
        out = np.empty(buf.shape, buf.dtype)
        self.copy(out.ctypes.data, buf.ptr, buf.nbytes, D2H, stream)
        (stream.synchronize() if stream else self.synchronize())
        return out

    def synchronize(self) -> None:
        self.check(self.lib.freedit_rt_stream_synchronize(None), "synchronize")

    # -- streams, events, graphs ---------------------------------------------------------------------
    def stream(self) -> Stream:
        handle = ctypes.c_void_p(0)
        self.check(self.lib.freedit_rt_stream_create(ctypes.byref(handle)), "cudaStreamCreate")
        s = Stream(self, int(handle.value))
        self._streams.append(s)
        return s

    def event(self, timing: bool = False) -> Event:
        handle = ctypes.c_void_p(0)
        self.check(self.lib.freedit_rt_event_create(ctypes.byref(handle), int(timing)), "cudaEventCreate")
        e = Event(self, int(handle.value))
        self._events.append(e)
        return e

    def begin_capture(self, stream: Stream) -> None:
        self._capture_keep = []
        self._capture_start = self._library_counters()
        self.check(self.lib.freedit_rt_begin_capture(stream.handle), "cudaStreamBeginCapture")

    def end_capture(self, stream: Stream) -> Graph | None:
        """The instantiated graph, or None (with one warning) when the capture failed."""
        handle = ctypes.c_void_p(0)
        code = self.lib.freedit_rt_end_capture(stream.handle, ctypes.byref(handle))
        work = tuple(b - a for a, b in zip(self._capture_start, self._library_counters()))
        self._captured = tuple(a + b for a, b in zip(self._captured, work))  # recorded, not run: replays count it
        if code or not handle.value:
            warnings.warn(f"CUDA graph capture failed ({self.kernels.error_name(code)}: "
                          f"{self.kernels.error_string(code)}); running plain launches", RuntimeWarning, stacklevel=3)
            return None
        g = Graph(self, int(handle.value), self._capture_keep, work)
        self._capture_keep = []
        self._graphs.append(g)
        return g

    def destroy(self, graph: Graph) -> None:
        if graph in self._graphs:
            self._graphs.remove(graph)
            self.check(self.lib.freedit_rt_graph_destroy(graph.handle), "cudaGraphExecDestroy")

    # -- counters ---------------------------------------------------------------------------------------
    def _library_counters(self) -> tuple[int, int, int]:
        h2d, d2h = ctypes.c_longlong(0), ctypes.c_longlong(0)
        self.lib.freedit_copy_bytes(ctypes.byref(h2d), ctypes.byref(d2h))
        return int(self.lib.freedit_launch_count()), h2d.value, d2h.value

    def counters(self) -> tuple[int, int, int]:
        """(kernel launches, host->device bytes, device->host bytes) since the library was loaded,
        the work of graph replays included (the library counts a graph's work once, at capture)."""
        return tuple(a - c + r for a, c, r in zip(self._library_counters(), self._captured, self.replayed[1:]))

    @property
    def graph_launches(self) -> int:
        return self.replayed[0]

    def allocated_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    def close(self) -> None:
        """Free everything this object allocated (buffers, pinned memory, streams, events, graphs)."""
        try:
            self.synchronize()
        except CudaError:
            pass
        for g in self._graphs:
            self.lib.freedit_rt_graph_destroy(g.handle)
        for e in self._events:
            self.lib.freedit_rt_event_destroy(e.handle)
        for s in self._streams:
            self.lib.freedit_rt_stream_destroy(s.handle)
        for ptr in list(self._buffers):
            self.lib.freedit_rt_free(ptr)
        for ptr in list(self._pinned):
            self.lib.freedit_rt_host_free(ptr)
        self._graphs, self._events, self._streams, self._buffers, self._pinned = [], [], [], {}, {}
        self._recent.clear()
