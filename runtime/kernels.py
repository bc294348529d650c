"""ctypes binding of the freedit CUDA kernels library (runtime/csrc, docs/KERNELS.md); no torch.

The library (``libfreedit_kernels.so``) is searched in (a) ``$FREEDIT_KERNELS_LIB``, (b) the
installed package's ``freedit/runtime/lib/``, (c) ``build/kernels/`` under the repository root.
``load(emulated=True)`` loads the host emulation of the same sources instead
(``libfreedit_kernels_emu.so``: ``$FREEDIT_KERNELS_EMU_LIB``, the package, ``build/kernels-emu/``;
:func:`build_emulated` builds it with the host compiler): same ABI, device memory is host memory,
every block and thread of a launch runs on host threads (docs/KERNELS.md, "Host emulation").
Every wrapper takes device arrays: any object with ``__cuda_array_interface__`` (cupy, numba,
torch) or a :class:`DeviceArray`, outputs included (the caller allocates; nothing here allocates
or synchronises). Shapes, dtypes, contiguity, null pointers and (where the driver can tell) host
pointers are refused with ``ValueError``/``TypeError`` before anything reaches CUDA; a nonzero
CUDA return code raises :class:`CudaError` with ``cudaGetErrorString``'s text.

``python -m freedit.runtime.kernels --selftest [--emulated]`` runs every kernel against the numpy
oracle (runtime/noise.py, ops.py, coupling.py) on a GPU (or the emulation) and prints a JSON
summary (buffers through the library's own freedit_rt_* entry points, so it runs under
compute-sanitizer without cupy, torch or cuda-python).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from freedit.errors import FreeditError

#: The ABI this binding speaks (FREEDIT_KERNELS_ABI_VERSION in runtime/csrc/freedit_kernels.h).
ABI_VERSION = 6
LIB_NAME = "libfreedit_kernels.so"
ENV_LIB = "FREEDIT_KERNELS_LIB"
_REPO_ROOT = Path(__file__).resolve().parents[1]

EMU_LIB_NAME = "libfreedit_kernels_emu.so"
EMU_PROBES_NAME = "libfreedit_emulation_probes.so"
ENV_EMU_LIB = "FREEDIT_KERNELS_EMU_LIB"

BUILD_HELP = (
    "to build it, run from the repository root\n"
    "    cmake -S . -B build/kernels -DCMAKE_BUILD_TYPE=Release\n"
    "    cmake --build build/kernels -j2\n"
    "(add -DCMAKE_CUDA_ARCHITECTURES=90 or similar for one GPU only), or reinstall with nvcc and cmake on PATH "
    "(`pip install .` builds it into freedit/runtime/lib/), or point FREEDIT_KERNELS_LIB at the .so"
)

EMU_BUILD_HELP = (
    "to build the host emulation (g++ and cmake, no CUDA), run from the repository root\n"
    "    cmake -S . -B build/kernels-emu -DFREEDIT_KERNELS_EMULATION=ON\n"
    "    cmake --build build/kernels-emu -j2\n"
    "(or call freedit.runtime.kernels.build_emulated(folder)), or point FREEDIT_KERNELS_EMU_LIB at the .so"
)

DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
VARIANCE_CODES = {"small": 0, "learned": 1, "large": 2}
CFG_MODE_CODES = {"reference": 0, "all": 1}
_TYPESTRS = {"<f4": "float32", "<f2": "float16", "<f8": "float64", "<i4": "int32", "<u4": "uint32",
             "<i8": "int64", "<u2": "uint16", "|u1": "uint8", "|b1": "bool"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int32": 4, "uint32": 4, "int64": 8,
             "uint16": 2, "uint8": 1, "bool": 1}
_MEMORY_TYPES = {0: "unregistered host memory", 1: "pinned host memory", 2: "device memory", 3: "managed memory"}
_INT_MAX = 2**31 - 1


class KernelsNotFound(FileNotFoundError):
    """libfreedit_kernels.so is not built or not where it is searched."""


class KernelsMismatch(FreeditError, RuntimeError):
    """A library of another ABI version, or without this binding's entry points (a stale build)."""


class CudaError(RuntimeError):
    """A kernel entry point returned a nonzero cudaError_t."""

    def __init__(self, entry: str, code: int, name: str, text: str):
        self.entry, self.code, self.name, self.text = entry, code, name, text
        super().__init__(f"{entry} failed with CUDA error {code} ({name}): {text}")


@dataclass(frozen=True)
class DeviceArray:
    """A dense row-major device buffer: ``ptr`` (an address), ``shape`` and a dtype name.

    For memory that has no ``__cuda_array_interface__`` or whose element type it cannot express
    (bfloat16: ``DeviceArray.of(uint16_array, "bfloat16")``).
    """

    ptr: int
    shape: tuple[int, ...]
    dtype: str
    readonly: bool = False

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if not isinstance(self.ptr, (int, np.integer)) or isinstance(self.ptr, bool):
            raise TypeError(f"DeviceArray.ptr must be an int address, got {type(self.ptr).__name__}")
        object.__setattr__(self, "ptr", int(self.ptr))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * _ITEMSIZE[self.dtype]

    @classmethod
    def of(cls, obj: Any, dtype: str | None = None, name: str = "array") -> DeviceArray:
        """View ``obj`` (a DeviceArray or a ``__cuda_array_interface__`` object) as a DeviceArray,
        optionally reinterpreting its elements as ``dtype`` of the same size (uint16 -> bfloat16)."""
        return _device_array(obj, name, reinterpret=dtype)


def _dtype_name(dtype: Any) -> str:
    text = str(getattr(dtype, "name", dtype)).lower()
    text = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
            "double": "float64", "uint": "uint32"}.get(text, text)
    if text in _TYPESTRS:
        text = _TYPESTRS[text]
    if text not in _ITEMSIZE:
        raise TypeError(f"unsupported dtype {dtype!r}; use one of {', '.join(sorted(_ITEMSIZE))}")
    return text


def _device_array(obj: Any, name: str, reinterpret: str | None = None) -> DeviceArray:
    if isinstance(obj, DeviceArray):
        arr = obj
    else:
        cai = getattr(obj, "__cuda_array_interface__", None)
        if cai is None:
            if isinstance(obj, np.ndarray) or hasattr(obj, "__array_interface__"):
                raise TypeError(f"{name}: got a host (numpy) array; the kernels need device memory: pass a cupy/"
                                f"numba/torch CUDA array or a DeviceArray(ptr, shape, dtype) of device memory")
            raise TypeError(f"{name}: expected a device array (__cuda_array_interface__ or DeviceArray), "
                            f"got {type(obj).__name__}")
        typestr = cai["typestr"]
        shape = tuple(int(d) for d in cai["shape"])
        if typestr in _TYPESTRS:
            dtype = _TYPESTRS[typestr]
        elif typestr == "<V2" and reinterpret == "bfloat16":
            dtype = "uint16"
        else:
            raise TypeError(f"{name}: unsupported element type {typestr!r} in __cuda_array_interface__"
                            " (bfloat16: pass DeviceArray.of(array_of_uint16, 'bfloat16'))")
        strides = cai.get("strides")
        if strides is not None and math.prod(shape) > 1:
            expected, step = [], _ITEMSIZE[dtype]
            for d in reversed(shape):
                expected.append(step)
                step *= d
            expected.reverse()
            if any(s != e for s, e, d in zip(strides, expected, shape) if d != 1):
                raise ValueError(f"{name}: not C-contiguous (strides {tuple(strides)}, shape {shape}); "
                                 "make a contiguous copy first")
        if cai.get("mask") is not None:
            raise ValueError(f"{name}: masked arrays are not supported")
        ptr, readonly = cai["data"]
        arr = DeviceArray(ptr or 0, shape, dtype, bool(readonly))
    if reinterpret is not None:
        target = _dtype_name(reinterpret)
        if target != arr.dtype:
            if _ITEMSIZE[target] != _ITEMSIZE[arr.dtype]:
                raise TypeError(f"{name}: cannot view {arr.dtype} elements as {target}")
            arr = DeviceArray(arr.ptr, arr.shape, target, arr.readonly)
    return arr


# ---- finding and loading the library ------------------------------------------------------------
def _flavour(emulated: bool) -> tuple[str, str, str, str]:
    """(library name, environment variable, build folder, build help) of the CUDA or emulated build."""
    if emulated:
        return EMU_LIB_NAME, ENV_EMU_LIB, "kernels-emu", EMU_BUILD_HELP
    return LIB_NAME, ENV_LIB, "kernels", BUILD_HELP


def library_candidates(emulated: bool = False) -> list[Path]:
    """Where the library (or its host emulation) is looked for, in order."""
    name, env_var, folder, _ = _flavour(emulated)
    found = []
    env = os.environ.get(env_var)
    if env:
        found.append(Path(env))
    found.append(Path(__file__).resolve().parent / "lib" / name)
    found.append(_REPO_ROOT / "build" / folder / name)
    return found


def find_library(emulated: bool = False) -> Path:
    name, env_var, _, build_help = _flavour(emulated)
    env = os.environ.get(env_var)
    if env:
        path = Path(env)
        if not path.is_file():
            raise KernelsNotFound(f"{env_var}={env} is not a file; unset it or {build_help}")
        return path
    for path in library_candidates(emulated):
        if path.is_file():
            return path
    searched = "\n".join(f"    {p}" for p in library_candidates(emulated))
    what = "host emulation of the kernels library" if emulated else "CUDA kernels library"
    raise KernelsNotFound(f"the freedit {what} ({name}) is not built; searched\n{searched}\n{build_help}")


def load_probes(path: str | os.PathLike) -> ctypes.CDLL:
    """The emulation's probe library (tests and the launch-cost benchmark), with ``.emulation``."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in PROBE_SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    lib.emulation = Emulation(lib)
    return lib


@dataclass(frozen=True)
class EmulatedBuild:
    """What :func:`build_emulated` made: the library, the shim's test probes, the build log."""

    library: Path
    probes: Path
    log: str
    seconds: float


def build_emulated(build_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                   jobs: int | None = None, targets: tuple[str, ...] = ()) -> EmulatedBuild:
    """Configure and build the host emulation (runtime/csrc compiled by the host compiler against
    the CUDA-runtime shim) in ``build_dir``. ``source_dir`` replaces runtime/csrc (a modified
    copy); ``targets`` limits the build (e.g. ``("freedit_kernels_emu",)``). Needs a source
    checkout, cmake and a C++20 compiler; raises KernelsNotFound or RuntimeError (with the log's
    end) otherwise."""
    cmake = shutil.which("cmake")
    if not (_REPO_ROOT / "CMakeLists.txt").is_file():
        raise KernelsNotFound(f"building the emulation needs the source checkout (no CMakeLists.txt in {_REPO_ROOT})")
    if not cmake:
        raise KernelsNotFound(f"cmake is not on PATH; {EMU_BUILD_HELP}")
    build_dir = Path(build_dir)
    configure = [cmake, "-S", str(_REPO_ROOT), "-B", str(build_dir), "-DFREEDIT_KERNELS_EMULATION=ON",
                 "-DCMAKE_BUILD_TYPE=Release"]
    if source_dir is not None:
        configure.append(f"-DFREEDIT_KERNELS_SOURCE_DIR={Path(source_dir).resolve()}")
    build = [cmake, "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 1)]
    if targets:
        build += ["--target", *targets]
    start, log = time.perf_counter(), []
    for command in (configure, build):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        log.append(result.stdout + result.stderr)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(log)[-4000:]}")
    return EmulatedBuild(build_dir / EMU_LIB_NAME, build_dir / EMU_PROBES_NAME, "".join(log),
                         time.perf_counter() - start)


_P, _I, _U, _D, _F, _ULL = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_double, ctypes.c_float, \
    ctypes.c_ulonglong
_SIGNATURES = {
    "freedit_transition": [_P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _P, _P, _P],
    "freedit_cfg_combine": [_P, _I, _I, _I, _I, _I, _F, _I, _P, _P],
    "freedit_philox_bits": [_ULL, _P, _P, _P, _I, _I, _P, _P],
    "freedit_philox_uniform": [_ULL, _P, _P, _P, _I, _I, _P, _P],
    "freedit_philox_normal": [_ULL, _P, _P, _P, _I, _I, _P, _P],
    "freedit_ddpm_step": [_P, _P, _P, _P, _I, _I, _P, _P],
    "freedit_log_ratio": [_P, _P, _P, _P, _P, _I, _I, _P, _P],
    "freedit_accept_window": [_P, _P, _P, _I, _P, _I, _P, _P, _P],
    "freedit_reflect": [_P, _P, _P, _P, _I, _I, _P, _I, _P, _P],
    "freedit_residual": [_P, _P, _P, _P, _I, _I, _P, _I, _ULL, _P, _P, _U, _U, _I, _I, _P, _P, _P, _P],
}
_HOST_SIGNATURES = {
    "freedit_philox_host": [_ULL, _P, _P, _P, _I, _I, _I, _P],
    "freedit_residual_host": [_P, _P, _P, _P, _I, _I, _P, _I, _ULL, _P, _P, _U, _U, _I, _I, _P, _P, _P],
}
_PP, _SZ, _PSZ = ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)
_PI, _PF, _PLL = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_longlong)
#: A host function in stream order (freedit_rt_launch_host_func).
HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
#: The device runtime (runtime/device.py wraps it): memory, streams, events, graphs, counters.
_RUNTIME_SIGNATURES = {
    "freedit_rt_set_device": [_I],
    "freedit_rt_get_device": [_PI],
    "freedit_rt_compute_capability": [_I, _PI, _PI],
    "freedit_rt_mem_get_info": [_PSZ, _PSZ],
    "freedit_rt_malloc": [_PP, _SZ],
    "freedit_rt_free": [_P],
    "freedit_rt_host_alloc": [_PP, _SZ],
    "freedit_rt_host_free": [_P],
    "freedit_rt_memcpy_async": [_P, _P, _SZ, _I, _P],
    "freedit_rt_memset_async": [_P, _I, _SZ, _P],
    "freedit_rt_stream_create": [_PP],
    "freedit_rt_stream_destroy": [_P],
    "freedit_rt_stream_synchronize": [_P],
    "freedit_rt_event_create": [_PP, _I],
    "freedit_rt_event_destroy": [_P],
    "freedit_rt_event_record": [_P, _P],
    "freedit_rt_stream_wait_event": [_P, _P],
    "freedit_rt_event_synchronize": [_P],
    "freedit_rt_event_query": [_P],
    "freedit_rt_event_elapsed_ms": [_PF, _P, _P],
    "freedit_rt_launch_host_func": [_P, HOST_FN, _P],
    "freedit_rt_begin_capture": [_P],
    "freedit_rt_end_capture": [_P, _PP],
    "freedit_rt_is_capturing": [_P, _PI],
    "freedit_rt_graph_launch": [_P, _P],
    "freedit_rt_graph_destroy": [_P],
}
#: The extra entry points of the emulated build (runtime/csrc/emulation/include/freedit_emulation.h).
_EMULATION_SIGNATURES = {
    "freedit_emulation_set_null_launch": ([_I], _I),
    "freedit_emulation_set_schedule": ([_I, _ULL], _I),
    "freedit_emulation_set_threads": ([_I], _I),
    "freedit_emulation_counters": ([_PLL, _PLL, _PLL], None),
    "freedit_emulation_last_error": ([_I], _I),
    "freedit_emulation_last_error_detail": ([], ctypes.c_char_p),
    "freedit_emulation_set_device_count": ([_I], _I),
}
#: The shim's test kernels (runtime/csrc/emulation/probes.cu): each launches once, returns cudaGetLastError().
_SZ_T = ctypes.c_size_t
PROBE_SIGNATURES = {
    "probe_empty": [_U, _U, _P],
    "probe_configured": [_P, _P, _SZ_T, _P],
    "probe_neighbours": [_U, _U, _I, _I, _P],
    "probe_shuffles": [_U, _U, _I, _I, _I, _U, _U, _I, _P],
    "probe_warp_sum": [_U, _U, _P, _P],
    "probe_shared_per_block": [_U, _U, _I, _P],
    "probe_atomics": [_U, _U, _P],
    "probe_counters_size": [],
    "probe_indices": [_P, _P, _P],
    "probe_convert": [_P, _I, _P, _P, _P, _P],
    "probe_barrier_votes": [_U, _P, _I, _P],
    "probe_stuck": [_I, _U, _P],
}
#: Every symbol the library exports (the C ABI).
ENTRY_POINTS = ("freedit_kernels_abi_version", "freedit_error_string", "freedit_error_name", "freedit_device_count",
                "freedit_pointer_memory_type", "freedit_pointer_device", "freedit_launch_count", "freedit_copy_bytes", *_SIGNATURES,
                *_HOST_SIGNATURES, *_RUNTIME_SIGNATURES)


def _stream_handle(stream: Any) -> int:
    """A cudaStream_t as int from None (legacy default stream), an int, or a cupy/torch/cuda-python stream."""
    if stream is None:
        return 0
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        return int(stream)
    if hasattr(stream, "__cuda_stream__"):  # CUDA stream protocol: (version, handle)
        return int(stream.__cuda_stream__()[1])
    for attribute in ("ptr", "cuda_stream", "handle"):
        value = getattr(stream, attribute, None)
        if isinstance(value, (int, np.integer)):
            return int(value)
    try:
        return int(stream)
    except (TypeError, ValueError):
        raise TypeError(f"stream: expected None, an int handle or a cupy/torch/cuda-python stream, "
                        f"got {type(stream).__name__}") from None


def _int32(value: int, what: str) -> int:
    if value > _INT_MAX:
        raise ValueError(f"{what} = {value} exceeds the kernels' 32-bit sizes ({_INT_MAX})")
    return int(value)


class Emulation:
    """The knobs of the emulated library (``Kernels.emulation``; None on the CUDA build)."""

    SCHEDULES: ClassVar[dict[str, int]] = {"fifo": 0, "lifo": 1, "random": 2, "mixed": 3}

    def __init__(self, lib: ctypes.CDLL):
        """``lib``: any library built with the shim (the kernels, or the shim's test probes)."""
        self.lib = lib
        for name, (argtypes, restype) in _EMULATION_SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype

    def set_null_launch(self, on: bool) -> bool:
        """Launches validated, counted, captured and replayed, but no kernel body runs (host-overhead
        benchmarks). Returns the previous setting."""
        return bool(self.lib.freedit_emulation_set_null_launch(int(bool(on))))

    @contextlib.contextmanager
    def null_launches(self) -> Iterator[None]:
        previous = self.set_null_launch(True)
        try:
            yield
        finally:
            self.set_null_launch(previous)

    def set_schedule(self, policy: str, seed: int = 0x5EED5EED) -> None:
        """The order in which a block's runnable CUDA threads are resumed: 'fifo' (threads run behind
        each other), 'lifo' (a thread runs ahead), 'random' (seeded, at every switch; slower) or
        'mixed' (the default: each block FIFO or LIFO at random). A race between threads of a block
        shows up only in some orders."""
        if policy not in self.SCHEDULES:
            raise ValueError(f"unknown schedule {policy!r}; choose one of {', '.join(self.SCHEDULES)}")
        code = self.lib.freedit_emulation_set_schedule(self.SCHEDULES[policy], int(seed) & 0xFFFFFFFFFFFFFFFF)
        if code:
            raise RuntimeError(f"freedit_emulation_set_schedule returned {code}")

    def set_device_count(self, count: int) -> int:
        """How many devices the emulation reports (default 1); returns the previous count. Device
        memory remembers the current device of the thread that allocated it."""
        previous = self.lib.freedit_emulation_set_device_count(int(count))
        if previous < 0 or int(count) < 1:
            raise ValueError(f"device count must be >= 1, got {count}")
        return previous

    def set_threads(self, threads: int) -> None:
        """Host threads that run blocks, the launching one included (0: the CPU count or $FREEDIT_EMU_THREADS)."""
        if not 0 <= int(threads) <= 1024:
            raise ValueError(f"threads must be in 0..1024, got {threads}")
        self.lib.freedit_emulation_set_threads(int(threads))

    def counters(self) -> dict[str, int]:
        """Work executed since load (null launches excluded, graph replays included)."""
        grids, blocks, threads = ctypes.c_longlong(), ctypes.c_longlong(), ctypes.c_longlong()
        self.lib.freedit_emulation_counters(ctypes.byref(grids), ctypes.byref(blocks), ctypes.byref(threads))
        return {"grids": grids.value, "blocks": blocks.value, "threads": threads.value}

    def last_error(self, reset: bool = True) -> int:
        """cudaGetLastError (or, reset=False, cudaPeekAtLastError) of the calling host thread."""
        return int(self.lib.freedit_emulation_last_error(int(bool(reset))))

    def last_error_detail(self) -> str:
        """Why this host thread's last failed launch failed (a barrier that can never complete, __trap)."""
        return (self.lib.freedit_emulation_last_error_detail() or b"").decode()


class Kernels:
    """The loaded library; one method per kernel (see docs/KERNELS.md for the semantics)."""

    def __init__(self, path: str | os.PathLike | None = None, *, emulated: bool = False):
        self.path = Path(path) if path is not None else find_library(emulated)
        build_help = _flavour(emulated or self.path.name == EMU_LIB_NAME)[3]
        try:
            self.lib = ctypes.CDLL(str(self.path))
        except OSError as err:
            raise KernelsNotFound(f"cannot load {self.path}: {err}; {build_help}") from err
        #: True for the host emulation (libfreedit_kernels_emu.so): device memory is host memory.
        self.emulated = hasattr(self.lib, "freedit_emulation_set_null_launch")
        build_help = _flavour(self.emulated)[3]
        missing = [name for name in ENTRY_POINTS if not hasattr(self.lib, name)]
        if missing:
            raise KernelsMismatch(f"{self.path} lacks {', '.join(missing)}: an old or foreign build; {build_help}")
        self.lib.freedit_kernels_abi_version.restype = ctypes.c_int
        self.abi_version = int(self.lib.freedit_kernels_abi_version())
        if self.abi_version != ABI_VERSION:
            raise KernelsMismatch(f"{self.path} has kernels ABI version {self.abi_version}, this binding needs "
                               f"{ABI_VERSION} (a stale build); {build_help}")
        for name in ("freedit_error_string", "freedit_error_name"):
            getattr(self.lib, name).restype = ctypes.c_char_p
            getattr(self.lib, name).argtypes = [ctypes.c_int]
        self.lib.freedit_device_count.argtypes = [ctypes.POINTER(ctypes.c_int)]
        self.lib.freedit_pointer_memory_type.argtypes = [_P, ctypes.POINTER(ctypes.c_int)]
        self.lib.freedit_pointer_device.argtypes = [_P, ctypes.POINTER(ctypes.c_int)]
        for name, argtypes in {**_SIGNATURES, **_HOST_SIGNATURES, **_RUNTIME_SIGNATURES}.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        self.lib.freedit_launch_count.argtypes, self.lib.freedit_launch_count.restype = [], ctypes.c_longlong
        self.lib.freedit_copy_bytes.argtypes, self.lib.freedit_copy_bytes.restype = [_PLL, _PLL], None
        self.emulation = Emulation(self.lib) if self.emulated else None
        self._pointer_queries = True  # off once the driver says it cannot answer (no GPU)

    # ---- helpers -------------------------------------------------------------------------------
    def error_string(self, code: int) -> str:
        return (self.lib.freedit_error_string(int(code)) or b"unknown error").decode()

    def error_name(self, code: int) -> str:
        return (self.lib.freedit_error_name(int(code)) or b"cudaErrorUnknown").decode()

    def device_count(self) -> tuple[int, int]:
        """(number of CUDA devices, cudaError_t of cudaGetDeviceCount)."""
        count = ctypes.c_int(0)
        code = self.lib.freedit_device_count(ctypes.byref(count))
        return count.value, code

    def memory_type(self, ptr: int) -> str | None:
        """What cudaPointerGetAttributes says ``ptr`` is, or None where it cannot tell (no driver)."""
        if not self._pointer_queries:
            return None
        kind = ctypes.c_int(-1)
        code = self.lib.freedit_pointer_memory_type(ctypes.c_void_p(ptr), ctypes.byref(kind))
        if code != 0:
            if code in (35, 100, 999):  # insufficient driver, no device, unknown: cannot tell, stop asking
                self._pointer_queries = False
            return None
        return _MEMORY_TYPES.get(kind.value, f"memory type {kind.value}")

    def _check(self, entry: str, code: int) -> None:
        if code:
            raise CudaError(entry, code, self.error_name(code), self.error_string(code))

    # ---- argument checking ---------------------------------------------------------------------
    def _arg(self, obj: Any, name: str, dtypes: tuple[str, ...], *, out: bool = False, ndim_min: int = 1,
             reinterpret: str | None = None) -> DeviceArray:
        arr = _device_array(obj, name, reinterpret)
        if arr.dtype not in dtypes:
            raise TypeError(f"{name}: dtype {arr.dtype}, expected {' or '.join(dtypes)}")
        if len(arr.shape) < ndim_min:
            raise ValueError(f"{name}: needs at least {ndim_min} dimension(s), got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{name}: empty array (shape {arr.shape})")
        if not arr.ptr:
            raise ValueError(f"{name}: null device pointer")
        if out and arr.readonly:
            raise ValueError(f"{name}: read-only array passed as an output")
        kind = self.memory_type(arr.ptr)
        if kind is not None and kind not in ("device memory", "managed memory"):
            raise ValueError(f"{name}: pointer {arr.ptr:#x} is {kind}, not device memory; copy it to the GPU first")
        if kind == "device memory":
            where, current = ctypes.c_int(-1), ctypes.c_int(-1)
            if (self.lib.freedit_pointer_device(ctypes.c_void_p(arr.ptr), ctypes.byref(where)) == 0
                    and self.lib.freedit_rt_get_device(ctypes.byref(current)) == 0 and where.value != current.value):
                raise ValueError(f"{name}: device memory of GPU {where.value}, but the kernels run on GPU "
                                 f"{current.value} (the current device); copy it there or make GPU {where.value} "
                                 f"current")
        return arr

    @staticmethod
    def _same_shape(reference: DeviceArray, ref_name: str, **others: DeviceArray) -> None:
        for name, arr in others.items():
            if arr.shape != reference.shape:
                raise ValueError(f"{name}: shape {arr.shape} does not match {ref_name} {reference.shape}")

    @staticmethod
    def _rows_vector(arr: DeviceArray, name: str, rows: int, what: str = "rows") -> None:
        if arr.shape != (rows,):
            raise ValueError(f"{name}: shape {arr.shape}, expected ({rows},): one value per {what}")

    # ---- kernels -------------------------------------------------------------------------------
    def transition(self, x, eps_v, steps, table, mean, log_var, *, fixed_variance: str = "small",
                   eps_dtype: str | None = None, stream=None):
        """Posterior mean and log-variance (ops.transition): x [B, C, ...] fp32, eps_v [B, C or 2C, ...]
        fp32/fp16/bf16 (2C: learned sigma), steps [B] int32, table [N, 6] fp32 -> mean, log_var [B, C, ...]."""
        x = self._arg(x, "x", ("float32",), ndim_min=2)
        eps_v = self._arg(eps_v, "eps_v", tuple(DTYPE_CODES), ndim_min=2, reinterpret=eps_dtype)
        steps = self._arg(steps, "steps", ("int32",))
        table = self._arg(table, "table", ("float32",))
        mean = self._arg(mean, "mean", ("float32",), out=True)
        log_var = self._arg(log_var, "log_var", ("float32",), out=True)
        rows, channels = x.shape[0], x.shape[1]
        pixels = math.prod(x.shape[2:])
        if eps_v.shape[0] != rows or eps_v.shape[2:] != x.shape[2:]:
            raise ValueError(f"eps_v: shape {eps_v.shape} does not match x {x.shape} (rows and spatial dims)")
        if eps_v.shape[1] == 2 * channels:
            variance = VARIANCE_CODES["learned"]
        elif eps_v.shape[1] == channels:
            if fixed_variance not in ("small", "large"):
                raise ValueError(f"unknown fixed variance {fixed_variance!r}; choose 'small' or 'large'")
            variance = VARIANCE_CODES[fixed_variance]
        else:
            raise ValueError(f"eps_v: {eps_v.shape[1]} channels, expected {channels} (eps) or {2 * channels} "
                             "(eps and v) for x's channels")
        self._rows_vector(steps, "steps", rows)
        if len(table.shape) != 2 or table.shape[1] != 6:
            raise ValueError(f"table: shape {table.shape}, expected (num_steps, 6) = Schedule.transition_table()")
        self._same_shape(x, "x", mean=mean, log_var=log_var)
        _int32(x.size, "x elements"), _int32(eps_v.size, "eps_v elements")
        self._check("freedit_transition", self.lib.freedit_transition(
            x.ptr, eps_v.ptr, DTYPE_CODES[eps_v.dtype], steps.ptr, table.ptr, table.shape[0], rows, channels, pixels,
            variance, mean.ptr, log_var.ptr, _stream_handle(stream)))
        return mean, log_var

    def cfg_combine(self, eps_v, out, *, channels: int, scale: float, mode: str = "all",
                    eps_dtype: str | None = None, stream=None):
        """CFG (ops.cfg_combine): eps_v [2B, OC, ...] as [cond rows; null rows] -> out [B, OC, ...] fp32."""
        eps_v = self._arg(eps_v, "eps_v", tuple(DTYPE_CODES), ndim_min=2, reinterpret=eps_dtype)
        out = self._arg(out, "out", ("float32",), out=True, ndim_min=2)
        if mode not in CFG_MODE_CODES:
            raise ValueError(f"unknown CFG mode {mode!r}; choose one of {', '.join(CFG_MODE_CODES)}")
        if eps_v.shape[0] % 2:
            raise ValueError(f"eps_v: {eps_v.shape[0]} rows; with CFG the rows are [cond; null], an even count")
        rows = eps_v.shape[0] // 2
        if out.shape != (rows, *eps_v.shape[1:]):
            raise ValueError(f"out: shape {out.shape}, expected {(rows, *eps_v.shape[1:])} (half of eps_v's rows)")
        channels = int(channels)
        if not 0 < channels <= eps_v.shape[1]:
            raise ValueError(f"channels = {channels} must be in 1..{eps_v.shape[1]} (eps_v's channels)")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
        _int32(eps_v.size, "eps_v elements")
        self._check("freedit_cfg_combine", self.lib.freedit_cfg_combine(
            eps_v.ptr, DTYPE_CODES[eps_v.dtype], rows, channels, eps_v.shape[1], math.prod(eps_v.shape[2:]),
            float(scale), CFG_MODE_CODES[mode], out.ptr, _stream_handle(stream)))
        return out

    def _philox(self, entry: str, out_dtype: str, seed: int, sample, step, purpose, out, stream):
        sample = self._arg(sample, "sample", ("int32", "uint32"))
        step = self._arg(step, "step", ("int32", "uint32"))
        purpose = self._arg(purpose, "purpose", ("int32", "uint32"))
        out = self._arg(out, "out", (out_dtype,), out=True, ndim_min=2)
        rows = out.shape[0]
        for name, arr in (("sample", sample), ("step", step), ("purpose", purpose)):
            self._rows_vector(arr, name, rows, "row of out")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        count = _int32(math.prod(out.shape[1:]), "numbers per row")
        _int32(out.size, "out elements")
        self._check(entry, getattr(self.lib, entry)(int(seed) & 0xFFFFFFFFFFFFFFFF, sample.ptr, step.ptr, purpose.ptr,
                                                    rows, count, out.ptr, _stream_handle(stream)))
        return out

    def philox_bits(self, seed: int, sample, step, purpose, out, *, stream=None):
        """Raw Philox words [rows, count] uint32 keyed (seed, sample[r], step[r], purpose[r]) (noise._blocks)."""
        return self._philox("freedit_philox_bits", "uint32", seed, sample, step, purpose, out, stream)

    def philox_uniform(self, seed: int, sample, step, purpose, out, *, stream=None):
        """Uniforms [rows, count] float64, bit-identical to noise.uniform."""
        return self._philox("freedit_philox_uniform", "float64", seed, sample, step, purpose, out, stream)

    def philox_normal(self, seed: int, sample, step, purpose, out, *, stream=None):
        """Normals [rows, *shape] float32 (noise.normal: Box-Muller in double)."""
        return self._philox("freedit_philox_normal", "float32", seed, sample, step, purpose, out, stream)

    def ddpm_step(self, mean, log_var, steps, noise, out, *, stream=None):
        """out = mean + exp(log_var / 2) noise, mean alone on rows at step 0 (ops.ddpm_step)."""
        mean = self._arg(mean, "mean", ("float32",))
        log_var = self._arg(log_var, "log_var", ("float32",))
        noise = self._arg(noise, "noise", ("float32",))
        out = self._arg(out, "out", ("float32",), out=True)
        steps = self._arg(steps, "steps", ("int32",))
        self._same_shape(mean, "mean", log_var=log_var, noise=noise, out=out)
        self._rows_vector(steps, "steps", mean.shape[0])
        _int32(mean.size, "mean elements")
        self._check("freedit_ddpm_step", self.lib.freedit_ddpm_step(
            mean.ptr, log_var.ptr, steps.ptr, noise.ptr, mean.shape[0], mean.size // mean.shape[0], out.ptr,
            _stream_handle(stream)))
        return out

    def log_ratio(self, x, mean_p, log_var_p, mean_q, log_var_q, out, *, stream=None):
        """out [rows] float64 = log q(x) - log p(x) per row (coupling.log_ratio)."""
        x = self._arg(x, "x", ("float32",))
        args = {name: self._arg(a, name, ("float32",)) for name, a in
                (("mean_p", mean_p), ("log_var_p", log_var_p), ("mean_q", mean_q), ("log_var_q", log_var_q))}
        out = self._arg(out, "out", ("float64",), out=True)
        self._same_shape(x, "x", **args)
        self._rows_vector(out, "out", x.shape[0])
        _int32(x.size, "x elements")
        self._check("freedit_log_ratio", self.lib.freedit_log_ratio(
            x.ptr, args["mean_p"].ptr, args["log_var_p"].ptr, args["mean_q"].ptr, args["log_var_q"].ptr, x.shape[0],
            x.size // x.shape[0], out.ptr, _stream_handle(stream)))
        return out

    def accept_window(self, log_r, uniform, windows, accepted, *, gamma=None, reject_row=None, stream=None):
        """Per sample, positions accepted before the first rejection of its window (coupling.accept).

        log_r, uniform, gamma [rows] float64 (rows sample-major: sample s owns windows[s] rows; all
        windows 0 means rows = 0: pass empty arrays or None); windows, accepted, reject_row
        [samples] int32. The windows live on the device, so that they add up to rows is checked
        there: accepted = -1 for every sample when they do not (or one is negative)."""
        windows = self._arg(windows, "windows", ("int32",))
        accepted = self._arg(accepted, "accepted", ("int32",), out=True)
        if len(windows.shape) != 1:
            raise ValueError(f"windows: shape {windows.shape}, expected (samples,): one window length per sample")
        samples = windows.shape[0]
        self._rows_vector(accepted, "accepted", samples, "sample (as windows)")
        if reject_row is not None:
            reject_row = self._arg(reject_row, "reject_row", ("int32",), out=True)
            self._rows_vector(reject_row, "reject_row", samples, "sample (as windows)")
        rows, per_row = None, {}
        for name, obj in (("log_r", log_r), ("uniform", uniform), ("gamma", gamma)):
            if obj is None:
                if name != "gamma":
                    per_row[name] = None
                continue
            arr = _device_array(obj, name)
            if arr.size == 0 and arr.dtype == "float64" and len(arr.shape) == 1:  # no window rows at all
                per_row[name] = None
                rows_here = 0
            else:
                arr = self._arg(arr, name, ("float64",))
                if len(arr.shape) != 1:
                    raise ValueError(f"{name}: shape {arr.shape}, expected (rows,): one value per window position")
                per_row[name] = arr
                rows_here = arr.shape[0]
            if rows is None:
                rows = rows_here
            elif rows_here != rows:
                raise ValueError(f"{name}: {rows_here} window rows but log_r has {rows}; log_r, uniform and gamma "
                                 "need one value per window position each")
        rows = rows or 0
        if rows and (per_row.get("log_r") is None or per_row.get("uniform") is None):
            raise ValueError("log_r and uniform are both needed when the windows have rows")
        _int32(rows, "rows")

        def ptr(name):
            arr = per_row.get(name)
            return arr.ptr if arr is not None else None

        self._check("freedit_accept_window", self.lib.freedit_accept_window(
            ptr("log_r"), ptr("uniform"), ptr("gamma"), rows, windows.ptr, samples, accepted.ptr,
            reject_row.ptr if reject_row is not None else None, _stream_handle(stream)))
        return accepted

    def _index(self, index, out_rows: int, in_rows: int) -> DeviceArray | None:
        if index is None:
            if out_rows != in_rows:
                raise ValueError(f"out has {out_rows} rows but the inputs {in_rows}: pass index (which input row "
                                 "each output row reads) or outputs shaped like the inputs")
            return None
        index = self._arg(index, "index", ("int32",))
        self._rows_vector(index, "index", out_rows, "row of out")
        return index

    def reflect(self, x, mean_p, mean_q, log_var, out, *, index=None, stream=None):
        """Reflection coupling (coupling.reflect): out row i from input row index[i] (identity if None;
        index[i] < 0 leaves out row i as it was)."""
        x = self._arg(x, "x", ("float32",))
        mean_p = self._arg(mean_p, "mean_p", ("float32",))
        mean_q = self._arg(mean_q, "mean_q", ("float32",))
        log_var = self._arg(log_var, "log_var", ("float32",))
        out = self._arg(out, "out", ("float32",), out=True)
        self._same_shape(x, "x", mean_p=mean_p, mean_q=mean_q, log_var=log_var)
        if out.shape[1:] != x.shape[1:]:
            raise ValueError(f"out: shape {out.shape} does not match x {x.shape} after the row axis")
        index = self._index(index, out.shape[0], x.shape[0])
        _int32(max(x.size, out.size), "elements")
        self._check("freedit_reflect", self.lib.freedit_reflect(
            x.ptr, mean_p.ptr, mean_q.ptr, log_var.ptr, x.shape[0], x.size // x.shape[0],
            index.ptr if index is not None else None, out.shape[0], out.ptr, _stream_handle(stream)))
        return out

    def residual(self, mean_p, log_var_p, mean_q, log_var_q, out, proposals, cap_hit, *, seed: int, sample, step,
                 index=None, max_attempts: int | None = None, purpose_z: int | None = None,
                 purpose_u: int | None = None, attempt_shift: int | None = None, stream=None):
        """Residual (q - p)^+ by rejection with keyed proposals (coupling.sample_residual with
        round_numpy.py's residual draw): out [R, ...] fp32, proposals and cap_hit [R] int32; sample,
        step [R] int32/uint32 key output row i; index as for reflect."""
        from freedit.runtime import coupling, noise, round as round_module

        max_attempts = coupling.MAX_RESIDUAL_ATTEMPTS if max_attempts is None else int(max_attempts)
        purpose_z = int(noise.Purpose.RESIDUAL if purpose_z is None else purpose_z)
        purpose_u = int(noise.Purpose.RESIDUAL_ACCEPT if purpose_u is None else purpose_u)
        attempt_shift = round_module.ATTEMPT_SHIFT if attempt_shift is None else int(attempt_shift)
        if not 1 <= max_attempts <= _INT_MAX:
            raise ValueError(f"max_attempts must be in 1..{_INT_MAX}, got {max_attempts}")
        if not 0 <= attempt_shift <= 31:
            raise ValueError(f"attempt_shift must be in 0..31, got {attempt_shift}")
        for name, value in (("purpose_z", purpose_z), ("purpose_u", purpose_u)):
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{name} must fit in 32 bits, got {value}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        mean_p = self._arg(mean_p, "mean_p", ("float32",))
        log_var_p = self._arg(log_var_p, "log_var_p", ("float32",))
        mean_q = self._arg(mean_q, "mean_q", ("float32",))
        log_var_q = self._arg(log_var_q, "log_var_q", ("float32",))
        out = self._arg(out, "out", ("float32",), out=True)
        proposals = self._arg(proposals, "proposals", ("int32",), out=True)
        cap_hit = self._arg(cap_hit, "cap_hit", ("int32",), out=True)
        sample = self._arg(sample, "sample", ("int32", "uint32"))
        step = self._arg(step, "step", ("int32", "uint32"))
        self._same_shape(mean_q, "mean_q", mean_p=mean_p, log_var_p=log_var_p, log_var_q=log_var_q)
        if out.shape[1:] != mean_q.shape[1:]:
            raise ValueError(f"out: shape {out.shape} does not match mean_q {mean_q.shape} after the row axis")
        out_rows = out.shape[0]
        for name, arr in (("proposals", proposals), ("cap_hit", cap_hit), ("sample", sample), ("step", step)):
            self._rows_vector(arr, name, out_rows, "row of out")
        index = self._index(index, out_rows, mean_q.shape[0])
        _int32(max(mean_q.size, out.size), "elements")
        self._check("freedit_residual", self.lib.freedit_residual(
            mean_p.ptr, log_var_p.ptr, mean_q.ptr, log_var_q.ptr, mean_q.shape[0], mean_q.size // mean_q.shape[0],
            index.ptr if index is not None else None, out_rows, int(seed) & 0xFFFFFFFFFFFFFFFF, sample.ptr, step.ptr,
            purpose_z, purpose_u, attempt_shift, max_attempts, out.ptr, proposals.ptr, cap_hit.ptr,
            _stream_handle(stream)))
        return out, proposals, cap_hit


    # ---- host references (numpy in, numpy out; the kernels' own noise and residual code on the CPU) --
    def philox_host(self, seed: int, sample, step, purpose, count: int, kind: str = "bits") -> np.ndarray:
        """[rows, count] raw bits (uint32), uniforms (float64) or normals (float32) computed on the CPU by
        the library's Philox/Box-Muller code: the counter layout checked without a GPU."""
        kinds = {"bits": (0, np.uint32), "uniform": (1, np.float64), "normal": (2, np.float32)}
        if kind not in kinds:
            raise ValueError(f"kind must be one of {', '.join(kinds)}, got {kind!r}")
        keys = [np.ascontiguousarray(np.asarray(a, dtype=np.int64).astype(np.uint32)).reshape(-1)
                for a in (sample, step, purpose)]
        rows = len(keys[0])
        keys = [np.ascontiguousarray(np.broadcast_to(a, (rows,))) for a in keys]
        if rows == 0 or count <= 0:
            raise ValueError(f"need at least one row and count >= 1, got {rows} rows, count {count}")
        code, dtype = kinds[kind]
        out = np.empty((rows, _int32(count, "count")), dtype=dtype)
        self._check("freedit_philox_host", self.lib.freedit_philox_host(
            int(seed) & 0xFFFFFFFFFFFFFFFF, *[a.ctypes.data for a in keys], rows, count, code, out.ctypes.data))
        return out

    def residual_host(self, mean_p, log_var_p, mean_q, log_var_q, *, seed: int, sample, step, index=None,
                      max_attempts: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """freedit_residual's contract on the CPU (host arrays, one attempt at a time): (out, proposals, cap_hit)."""
        from freedit.runtime import coupling, noise, round as round_module

        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in (mean_p, log_var_p, mean_q, log_var_q)]
        if any(a.shape != arrays[2].shape for a in arrays) or arrays[2].ndim < 1 or arrays[2].size == 0:
            raise ValueError("mean_p, log_var_p, mean_q, log_var_q must share one non-empty shape")
        in_rows, per_row = arrays[2].shape[0], arrays[2].size // arrays[2].shape[0]
        idx = None if index is None else np.ascontiguousarray(index, dtype=np.int32)
        out_rows = in_rows if idx is None else len(idx)
        keys = [np.ascontiguousarray(np.asarray(a, dtype=np.int64).astype(np.uint32)) for a in (sample, step)]
        if any(k.shape != (out_rows,) for k in keys):
            raise ValueError(f"sample and step need one key per output row ({out_rows})")
        max_attempts = coupling.MAX_RESIDUAL_ATTEMPTS if max_attempts is None else int(max_attempts)
        out = np.empty((out_rows, *arrays[2].shape[1:]), dtype=np.float32)
        proposals, cap_hit = np.empty(out_rows, dtype=np.int32), np.empty(out_rows, dtype=np.int32)
        self._check("freedit_residual_host", self.lib.freedit_residual_host(
            *[a.ctypes.data for a in arrays], in_rows, per_row, None if idx is None else idx.ctypes.data, out_rows,
            int(seed) & 0xFFFFFFFFFFFFFFFF, keys[0].ctypes.data, keys[1].ctypes.data, int(noise.Purpose.RESIDUAL),
            int(noise.Purpose.RESIDUAL_ACCEPT), round_module.ATTEMPT_SHIFT, max_attempts, out.ctypes.data,
            proposals.ctypes.data, cap_hit.ctypes.data))
        return out, proposals, cap_hit.astype(bool)


_LOADED: dict[str, Kernels] = {}


def load(path: str | os.PathLike | None = None, *, emulated: bool = False) -> Kernels:
    """The library at ``path`` or the first one found (its host emulation if ``emulated``); cached per path."""
    resolved = str(Path(path).resolve() if path is not None else find_library(emulated).resolve())
    if resolved not in _LOADED:
        _LOADED[resolved] = Kernels(resolved, emulated=emulated)
    return _LOADED[resolved]


# ---- GPU checks against the numpy oracle (tests/test_kernels.py and --selftest) -----------------
class LibraryMemory:
    """Device buffers through the library's own freedit_rt_* entry points, so the checks below run on
    the CUDA library and on its host emulation alike (no cupy, torch or cuda-python).

    empty/upload/download as the checks need them (copies on the legacy stream, synchronised);
    everything is freed by close()."""

    def __init__(self, k: Kernels):
        self.k, self._ptrs = k, []

    def _call(self, entry: str, *args) -> None:
        self.k._check(entry, getattr(self.k.lib, entry)(*args))

    def _copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        self._call("freedit_rt_memcpy_async", dst, src, nbytes, kind, None)
        self._call("freedit_rt_stream_synchronize", None)

    def empty(self, shape, dtype: str) -> DeviceArray:
        dtype = _dtype_name(dtype)
        ptr = ctypes.c_void_p()
        self._call("freedit_rt_malloc", ctypes.byref(ptr), max(1, math.prod(shape) * _ITEMSIZE[dtype]))
        self._ptrs.append(ptr.value)
        return DeviceArray(ptr.value, tuple(shape), dtype)

    def upload(self, host: np.ndarray, dtype: str | None = None) -> DeviceArray:
        host = np.ascontiguousarray(host)
        arr = self.empty(host.shape, dtype or host.dtype.name)
        if host.nbytes:
            self._copy(arr.ptr, host.ctypes.data, host.nbytes, 1)
        return arr

    def download(self, arr: DeviceArray) -> np.ndarray:
        host = np.empty(arr.shape, dtype=np.uint16 if arr.dtype == "bfloat16" else np.dtype(arr.dtype))
        if host.nbytes:
            self._copy(host.ctypes.data, arr.ptr, host.nbytes, 2)
        return host

    def close(self):
        for ptr in self._ptrs:
            self.k.lib.freedit_rt_free(ptr)
        self._ptrs.clear()


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _model_output(mem, values: np.ndarray, dtype: str):
    """(device array of ``values`` in ``dtype``, the exact fp32 values the kernel reads)."""
    if dtype == "float32":
        host = values.astype(np.float32)
        return mem.upload(host), host
    if dtype == "float16":
        host = values.astype(np.float16)
        return mem.upload(host), host.astype(np.float32)
    bits = to_bfloat16_bits(values)
    return DeviceArray.of(mem.upload(bits), "bfloat16"), from_bfloat16_bits(bits)


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max(1, max |ref|), NaN-aware (a NaN where ref has none is an infinite error)."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if not np.array_equal(np.isnan(got), np.isnan(ref)):
        return math.inf
    mask = ~np.isnan(ref)
    if not mask.any():
        return 0.0
    return float(np.max(np.abs(got[mask] - ref[mask])) / max(1.0, float(np.max(np.abs(ref[mask])))))


def check_philox(k: Kernels, mem, rng: np.random.Generator) -> dict:
    from freedit.runtime import noise

    seed = int(rng.integers(0, 2**63)) * 2 + 1  # both key words used
    rows = 6
    sample = rng.integers(0, 2**32, rows, dtype=np.uint64).astype(np.uint32)
    step = rng.integers(0, 1000, rows).astype(np.uint32)
    purpose = (rng.integers(1, 7, rows) + (rng.integers(0, 1 << 20, rows) << 8)).astype(np.uint32)
    keys = [mem.upload(a) for a in (sample, step, purpose)]
    result = {}
    for count in (1, 13, 64):
        bits = k.philox_bits(seed, *keys, mem.empty((rows, count), "uint32"))
        uni = k.philox_uniform(seed, *keys, mem.empty((rows, count), "float64"))
        ref_bits = noise._blocks(seed, sample, step, purpose, count)[:, :count]
        ref_uni = noise.uniform(seed, sample, step, purpose, count)
        result[f"bits_identical_{count}"] = bool(np.array_equal(mem.download(bits), ref_bits))
        result[f"uniform_identical_{count}"] = bool(np.array_equal(mem.download(uni).view(np.uint64),
                                                                   ref_uni.view(np.uint64)))
    normal_err, normal_equal = 0.0, 0
    for shape in ((1,), (15,), (3, 5), (4, 8, 8)):
        out = k.philox_normal(seed, *keys, mem.empty((rows, *shape), "float32"))
        got, ref = mem.download(out), noise.normal(seed, sample, step, purpose, shape)
        normal_err = max(normal_err, float(np.max(np.abs(got - ref))))
        normal_equal += int(np.sum(got == ref))
    result.update(normal_max_abs_err=normal_err, normal_exactly_equal=normal_equal)
    result["passed"] = all(v for key, v in result.items() if key.endswith(tuple("0123456789"))
                           and key.startswith(("bits", "uniform"))) and normal_err <= 1e-6
    return result


def check_transition(k: Kernels, mem, rng: np.random.Generator) -> dict:
    from freedit.runtime import ops
    from freedit.runtime.schedule import Schedule

    errors, nan_ok = {}, True
    for spacing in ("50", None):
        sched = Schedule.create(spacing)
        table = mem.upload(sched.transition_table().astype(np.float32))
        n_steps = sched.num_steps
        for dtype in DTYPE_CODES:
            for variance in ("learned", "small", "large"):
                rows, channels, h, w = 6, 4, 5, 7
                x = rng.standard_normal((rows, channels, h, w)).astype(np.float32)
                out_ch = 2 * channels if variance == "learned" else channels
                eps_v = rng.standard_normal((rows, out_ch, h, w))
                if variance == "learned":
                    eps_v[:, channels:] = rng.uniform(-1.0, 1.0, (rows, channels, h, w))
                dev_eps, eps_f32 = _model_output(mem, eps_v, dtype)
                steps = rng.integers(0, n_steps, rows).astype(np.int32)
                steps[:2] = (0, n_steps - 1)
                mean, log_var = mem.empty(x.shape, "float32"), mem.empty(x.shape, "float32")
                fixed = "small" if variance == "learned" else variance
                k.transition(mem.upload(x), dev_eps, mem.upload(steps), table, mean, log_var, fixed_variance=fixed)
                ref_mean, ref_lv = ops.transition(sched, x, eps_f32, steps, fixed)
                key = f"{spacing or 1000}_{dtype}_{variance}"
                errors[key] = max(_rel_err(mem.download(mean), ref_mean), _rel_err(mem.download(log_var), ref_lv))
        # a step outside the table gives NaN, never an out-of-range read
        bad = np.array([n_steps, -1], dtype=np.int32)
        x = rng.standard_normal((2, 4, 2, 2)).astype(np.float32)
        mean, log_var = mem.empty(x.shape, "float32"), mem.empty(x.shape, "float32")
        k.transition(mem.upload(x), mem.upload(x), mem.upload(bad), table, mean, log_var)
        nan_ok &= bool(np.isnan(mem.download(mean)).all() and np.isnan(mem.download(log_var)).all())
    worst = max(errors.values())
    return {"max_rel_err": worst, "errors": errors, "bad_step_nan": nan_ok, "passed": worst <= 1e-5 and nan_ok}


def check_cfg(k: Kernels, mem, rng: np.random.Generator) -> dict:
    from freedit.runtime import ops

    errors, identical = {}, True
    for dtype in DTYPE_CODES:
        for mode in CFG_MODE_CODES:
            for channels, out_ch in ((4, 8), (4, 4), (2, 4), (1, 1)):
                rows, h, w = 5, 3, 4
                scale = float(rng.uniform(1.0, 6.0))
                dev, values = _model_output(mem, rng.standard_normal((2 * rows, out_ch, h, w)), dtype)
                out = k.cfg_combine(dev, mem.empty((rows, out_ch, h, w), "float32"), channels=channels, scale=scale,
                                    mode=mode)
                ref = ops.cfg_combine(values[:rows], values[rows:], scale, channels, mode)
                got = mem.download(out)
                errors[f"{dtype}_{mode}_{channels}_{out_ch}"] = _rel_err(got, ref)
                identical &= bool(np.array_equal(got, ref))
    worst = max(errors.values())
    return {"max_rel_err": worst, "bit_identical": identical, "passed": worst <= 1e-6}


def check_ddpm_step(k: Kernels, mem, rng: np.random.Generator) -> dict:
    from freedit.runtime import ops

    shape = (7, 4, 6, 6)
    mean = rng.standard_normal(shape).astype(np.float32)
    log_var = rng.uniform(-9.0, 0.5, shape).astype(np.float32)
    z = rng.standard_normal(shape).astype(np.float32)
    steps = rng.integers(0, 4, shape[0]).astype(np.int32)
    steps[:2] = (0, 1)
    out = k.ddpm_step(mem.upload(mean), mem.upload(log_var), mem.upload(steps), mem.upload(z),
                      mem.empty(shape, "float32"))
    ref = ops.ddpm_step(mean, log_var, steps, z)
    got = mem.download(out)
    err = _rel_err(got, ref)
    step0 = bool(np.array_equal(got[steps == 0], mean[steps == 0]))
    return {"max_rel_err": err, "step0_is_mean": step0, "passed": err <= 1e-6 and step0}


def _gaussian_pair(rng, shape, spread: np.ndarray):
    """mean/log-var of p, and of q at a per-row distance ``spread`` from p."""
    scale = spread.reshape((-1,) + (1,) * (len(shape) - 1))
    mean_p = rng.standard_normal(shape).astype(np.float32)
    log_var_p = rng.uniform(-3.0, 0.0, shape).astype(np.float32)
    mean_q = (mean_p + scale * rng.standard_normal(shape)).astype(np.float32)
    log_var_q = (log_var_p + scale * rng.standard_normal(shape)).astype(np.float32)
    return mean_p, log_var_p, mean_q, log_var_q


def check_log_ratio(k: Kernels, mem, rng: np.random.Generator) -> dict:
    from freedit.runtime import coupling

    worst = 0.0
    for shape in ((7, 4, 5, 5), (3, 3, 7, 9), (2, 1)):
        gauss = _gaussian_pair(rng, shape, rng.uniform(0.0, 0.5, shape[0]))
        x = (gauss[0] + np.exp(0.5 * gauss[1]) * rng.standard_normal(shape)).astype(np.float32)
        out = k.log_ratio(mem.upload(x), *[mem.upload(a) for a in gauss], mem.empty((shape[0],), "float64"))
        ref = coupling.log_ratio(x, *gauss)
        worst = max(worst, _rel_err(mem.download(out), ref))
    return {"max_rel_err": worst, "passed": worst <= 1e-9}


def _accept_oracle(log_r, uniform, gamma, windows):
    from freedit.runtime import coupling

    accepted, reject_row, offset = [], [], 0
    for w in windows:
        sl = slice(offset, offset + w)
        ok = coupling.accept(log_r[sl], uniform[sl], 1.0 if gamma is None else gamma[sl])
        n = int(w) if ok.all() else int(np.argmin(ok))
        accepted.append(n)
        reject_row.append(offset + n if n < w else -1)
        offset += w
    return np.array(accepted, dtype=np.int32), np.array(reject_row, dtype=np.int32)


def check_accept_window(k: Kernels, mem, rng: np.random.Generator) -> dict:
    result = {}
    for samples in (1, 40, 2600):  # 2600 crosses the kernel's 1024-sample scan chunks
        for with_gamma in (False, True):
            windows = rng.integers(0, 9, samples).astype(np.int32)
            if samples > 1:
                windows[0] = 0
            rows = int(windows.sum())
            log_r = rng.normal(-0.3, 1.5, rows)
            special = rng.random(rows)
            log_r[special < 0.03] = np.nan
            log_r[(special >= 0.03) & (special < 0.05)] = -np.inf
            uniform = rng.random(rows)
            gamma = rng.uniform(0.0, 1.0, rows) if with_gamma else None
            accepted, reject = mem.empty((samples,), "int32"), mem.empty((samples,), "int32")
            dev = (lambda a: mem.upload(a) if a is not None and len(a) else None)
            k.accept_window(dev(log_r), dev(uniform), mem.upload(windows), accepted,
                            gamma=dev(gamma), reject_row=reject)
            ref_acc, ref_rej = _accept_oracle(log_r, uniform, gamma, windows)
            result[f"identical_{samples}_{'gamma' if with_gamma else 'exact'}"] = bool(
                np.array_equal(mem.download(accepted), ref_acc) and np.array_equal(mem.download(reject), ref_rej))
    # windows that do not add up to the rows are flagged on device
    windows = np.array([2, 3], dtype=np.int32)
    accepted = mem.empty((2,), "int32")
    k.accept_window(mem.upload(np.zeros(4)), mem.upload(np.full(4, 0.5)), mem.upload(windows), accepted)
    result["mismatch_flagged"] = bool(np.array_equal(mem.download(accepted), [-1, -1]))
    result["passed"] = all(result.values())
    return result


def check_reflect(k: Kernels, mem, rng: np.random.Generator) -> dict:
    from freedit.runtime import coupling

    shape = (6, 4, 4, 4)
    x = rng.standard_normal(shape).astype(np.float32)
    mean_p = rng.standard_normal(shape).astype(np.float32)
    mean_q = (mean_p + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    mean_q[4] = mean_p[4]  # d = 0: nothing to reflect
    log_var = rng.uniform(-4.0, 0.0, shape).astype(np.float32)
    dev = [mem.upload(a) for a in (x, mean_p, mean_q, log_var)]
    out = k.reflect(*dev, mem.empty(shape, "float32"))
    err = _rel_err(mem.download(out), coupling.reflect(x, mean_p, mean_q, log_var))
    index = np.array([3, -1, 0, 5, 5, 2, 4], dtype=np.int32)
    sentinel = np.full((len(index),) + shape[1:], 7.0, dtype=np.float32)
    out = k.reflect(*dev, mem.upload(sentinel), index=mem.upload(index))
    got, valid = mem.download(out), index >= 0
    ref = coupling.reflect(x[index[valid]], mean_p[index[valid]], mean_q[index[valid]], log_var[index[valid]])
    err = max(err, _rel_err(got[valid], ref))
    untouched = bool(np.all(got[~valid] == 7.0))
    return {"max_rel_err": err, "skipped_rows_untouched": untouched, "passed": err <= 1e-5 and untouched}


def check_residual(k: Kernels, mem, rng: np.random.Generator) -> dict:
    from freedit.runtime import coupling, noise, round as round_module

    shift = round_module.ATTEMPT_SHIFT
    rows, shape = 10, (2, 4, 4)
    seed = int(rng.integers(0, 2**62))
    gauss = _gaussian_pair(rng, (rows, *shape), np.geomspace(0.003, 1.0, rows))
    ids = rng.integers(0, 1000, rows).astype(np.uint32)
    steps = rng.integers(1, 250, rows).astype(np.uint32)
    dev = [mem.upload(a) for a in gauss]

    def oracle(index, max_attempts):
        key_ids, key_steps = ids[: len(index)], steps[: len(index)]
        valid = index >= 0

        def draw(r, attempts):  # round_numpy.py's residual draw, rows r of the valid outputs
            purpose = attempts.astype(np.int64) << shift
            sel = np.flatnonzero(valid)[r]
            return (noise.normal(seed, key_ids[sel], key_steps[sel], noise.Purpose.RESIDUAL + purpose, shape),
                    noise.uniform(seed, key_ids[sel], key_steps[sel], noise.Purpose.RESIDUAL_ACCEPT + purpose, 1)[:, 0])

        picked = [a[index[valid]] for a in gauss]
        return coupling.sample_residual(*picked, draw, max_attempts=max_attempts), valid

    result = {}
    cases = {"all": np.arange(rows, dtype=np.int32), "indexed": np.array([2, -1, 7, 0, 2, 9], dtype=np.int32)}
    for name, index in cases.items():
        for max_attempts in (coupling.MAX_RESIDUAL_ATTEMPTS, 3):
            n_out = len(index)
            out = mem.upload(np.full((n_out, *shape), 7.0, dtype=np.float32))
            props, caps = mem.empty((n_out,), "int32"), mem.empty((n_out,), "int32")
            k.residual(*dev, out, props, caps, seed=seed, sample=mem.upload(ids[:n_out]),
                       step=mem.upload(steps[:n_out]), index=None if name == "all" else mem.upload(index),
                       max_attempts=max_attempts)
            (ref_out, ref_props, ref_caps), valid = oracle(index, max_attempts)
            got_out, got_props, got_caps = mem.download(out), mem.download(props), mem.download(caps)
            tag = f"{name}_{'cap' if max_attempts == 3 else 'full'}"
            result[f"same_attempts_{tag}"] = bool(np.array_equal(got_props[valid], ref_props)
                                                  and np.array_equal(got_caps[valid].astype(bool), ref_caps))
            result[f"skipped_rows_{tag}"] = bool(np.all(got_props[~valid] == 0) and np.all(got_out[~valid] == 7.0))
            result[f"max_rel_err_{tag}"] = _rel_err(got_out[valid], ref_out)
            if max_attempts != 3:
                result[f"proposals_{tag}"] = [int(p) for p in got_props]
    result["passed"] = all(v for key, v in result.items() if key.startswith(("same_", "skipped_"))) and all(
        v <= 1e-5 for key, v in result.items() if key.startswith("max_rel_err"))
    return result


#: name -> check(kernels, memory, rng) -> dict with "passed"
CHECKS: dict[str, Callable[[Kernels, Any, np.random.Generator], dict]] = {
    "philox": check_philox, "transition": check_transition, "cfg_combine": check_cfg, "ddpm_step": check_ddpm_step,
    "log_ratio": check_log_ratio, "accept_window": check_accept_window, "reflect": check_reflect,
    "residual": check_residual,
}


def _device_name() -> str | None:
    """GPU 0's name through cuda-python where it is installed (the library does not report it)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        return None
    err, props = rt.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = props.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\0")


def selftest(k: Kernels | None = None, seed: int = 0, names: list[str] | None = None) -> dict:
    """Run the oracle checks on the GPU (or the host emulation) with the library's own buffers; a
    JSON-able summary."""
    k = k or load()
    count, code = k.device_count()
    summary: dict[str, Any] = {"library": str(k.path), "abi_version": k.abi_version, "emulated": k.emulated,
                               "devices": count}
    if code or not count:
        summary.update(passed=False, error=f"no CUDA GPU: cudaGetDeviceCount returned {code} ({k.error_name(code)})")
        return summary
    mem = LibraryMemory(k)
    try:
        major, minor = ctypes.c_int(), ctypes.c_int()
        k._check("freedit_rt_compute_capability",
                 k.lib.freedit_rt_compute_capability(0, ctypes.byref(major), ctypes.byref(minor)))
        summary["device"] = "host emulation" if k.emulated else _device_name()
        summary["compute_capability"] = f"{major.value}.{minor.value}"
        checks = {}
        for name in names or list(CHECKS):
            try:
                checks[name] = CHECKS[name](k, mem, np.random.default_rng([seed, len(checks)]))
            except Exception as err:  # noqa: BLE001 - report it, go on with the other checks
                checks[name] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
            mem.close()
        summary["checks"] = checks
        summary["passed"] = all(c["passed"] for c in checks.values())
    finally:
        mem.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m freedit.runtime.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--selftest", action="store_true", help="run every kernel against the numpy oracle (GPU)")
    parser.add_argument("--check", action="append", choices=list(CHECKS), help="only these checks (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lib", help=f"library path (default: ${ENV_LIB}, the package, build/kernels)")
    parser.add_argument("--emulated", action="store_true",
                        help=f"the host emulation ({EMU_LIB_NAME}: ${ENV_EMU_LIB}, the package, build/kernels-emu)")
    args = parser.parse_args(argv)
    try:
        k = load(args.lib, emulated=args.emulated)
    except (KernelsNotFound, RuntimeError) as err:
        print(json.dumps({"passed": False, "error": str(err)}, indent=2))
        return 2
    if not args.selftest:
        count, code = k.device_count()
        print(json.dumps({"library": str(k.path), "abi_version": k.abi_version, "devices": count,
                          "cudaGetDeviceCount": f"{code} ({k.error_name(code)})"}, indent=2))
        return 0
    summary = selftest(k, args.seed, args.check)
    print(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
