"""TensorRT backend: the plans of an engine directory (engine/directory.py).

Per engine: one execution context with its own device memory, tensors addressed by name,
``execute_async_v3``. The FREE round binds its workspace's device buffers (``bind``): a call sets
the bound addresses and the row count and enqueues on the lane's stream (the drafter's and the
verifier's lanes are separate streams), with no host staging and no synchronisation; the round's
CUDA graphs capture these enqueues. TensorRT's capture rules are kept: a shape is enqueued once
before it is captured (round_device.py's warm-up), and the enqueue after an optimisation-profile
switch is never captured (it raises CaptureUnsupported during a capture, so the phase runs plainly).

``run(engine, inputs)`` (numpy in and out, for cost curves and checks) stages through buffers
allocated once at the profile's largest row count, on the engine's own stream.

Works with ``tensorrt`` and ``tensorrt_rtx`` alike. Needs an NVIDIA GPU and cuda-python; without
them construction fails with one clear error, before anything is loaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from freedit.errors import BackendUnavailable, CapacityError
from freedit.runtime.backends.base import Backend, BoundEngine
from freedit.runtime.contract import CONFIG_METADATA_KEY, DecoderInfo, ModelInfo, input_names

# The contracts' I/O is fp32 / int64 in every precision (runtime/contract.py); these cover it.
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32}


def _check(result):
    """cuda-python returns (err, *values); raise on err, return the values."""
    from cuda.bindings import runtime as rt

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {int(err)}: {rt.cudaGetErrorString(err)[1].decode()}")
    return values[0] if len(values) == 1 else values


class _Engine:
    """One plan: its context, device memory and staging buffers (for ``run``)."""

    def __init__(self, trt, runtime, plan: Path):
        from cuda.bindings import runtime as rt

        # Its own stream: the drafter's and the verifier's calls, made from different host threads
        # (runtime/overlap.py), run concurrently on the GPU.
        self.trt, self.stream = trt, _check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{trt.describe()} could not deserialize {plan}")
        strategy = getattr(trt.module, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:  # own device memory, allocated here, not shared with other contexts
            self.context = self.engine.create_execution_context(strategy.USER_MANAGED)
            size = max(int(getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size), 1)
            self.scratch = _check(rt.cudaMalloc(size))
            if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1; the attribute setter is deprecated
                self.context.set_device_memory(self.scratch, size)
            else:
                self.context.device_memory = self.scratch
        else:
            self.context, self.scratch = self.engine.create_execution_context(), None
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.module.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.max_rows = self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0]
        self.static = {}  # rows -> profile index, for profiles with min = max
        for p in range(1, self.engine.num_optimization_profiles):
            lo, _, hi = self.engine.get_tensor_profile_shape(self.inputs[0], p)
            if lo[0] == hi[0]:
                self.static[lo[0]] = p
        kinds = {n: self.engine.get_tensor_dtype(n).name for n in self.names}
        unsupported = {n: k for n, k in kinds.items() if k not in _NP}
        if unsupported:
            raise RuntimeError(f"{plan}: I/O tensors of unsupported type {unsupported}; re-export with `freedit export`")
        self.dtypes = {n: _NP[k] for n, k in kinds.items()}
        self.buffers, self.row_bytes = {}, {}
        for n in self.names:  # one buffer per tensor at the dynamic profile's largest shape
            shape = self._shape_at(n, self.max_rows)
            self.row_bytes[n] = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(self.dtypes[n]).itemsize
            self.buffers[n] = _check(rt.cudaMalloc(max(self.row_bytes[n] * self.max_rows, 1)))
            self.context.set_tensor_address(n, self.buffers[n])  # fixed for the engine's lifetime
        self.profile = 0
        self.switched = False  # a profile switch happened and no enqueue has followed it yet
        self.bound_addresses = None  # whose addresses the context holds (bound runs set their own)

    def _shape_at(self, name: str, rows: int) -> tuple[int, ...]:
        shape = tuple(self.engine.get_tensor_shape(name))
        return (rows, *shape[1:])

    def select(self, rows: int, stream: int, capturing: bool) -> None:
        """The profile for ``rows`` (a static one where it matches, else the dynamic profile 0)."""
        if rows > self.max_rows:
            raise CapacityError(f"{rows} rows exceed the engine's profile (max {self.max_rows}); rebuild with larger "
                                f"--batch-sizes or --window")
        profile = self.static.get(rows, 0)
        if profile != self.profile or (capturing and self.switched):
            if capturing:  # TensorRT: the enqueue after a profile switch must not be captured
                from freedit.runtime.round_device import CaptureUnsupported

                raise CaptureUnsupported("a TensorRT optimisation-profile switch is followed by an uncaptured enqueue")
            if not self.context.set_optimization_profile_async(profile, stream):
                raise RuntimeError(f"{self.trt.describe()}: cannot select optimisation profile {profile}")
            self.profile, self.switched = profile, True

    def set_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise RuntimeError(f"{self.trt.describe()}: input {name!r} cannot take shape {shape} "
                                   f"(profile {self.profile})")

    def enqueue(self, stream: int) -> None:
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"{self.trt.describe()}: execute_async_v3 failed")
        self.switched = False

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cuda.bindings import runtime as rt

        rows = len(next(iter(inputs.values())))
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host = {n: np.ascontiguousarray(inputs[n], dtype=self.dtypes[n]) for n in self.inputs}
        self.select(rows, self.stream, capturing=False)
        if self.bound_addresses is not None:  # a bound run moved the addresses: back to the staging buffers
            for n in self.names:
                self.context.set_tensor_address(n, self.buffers[n])
            self.bound_addresses = None
        for n in self.inputs:
            _check(rt.cudaMemcpyAsync(self.buffers[n], host[n].ctypes.data, host[n].nbytes, h2d, self.stream))
        self.set_shapes({n: host[n].shape for n in self.inputs})
        self.enqueue(self.stream)
        out = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            out[n] = np.empty(shape, dtype=self.dtypes[n])
            _check(rt.cudaMemcpyAsync(out[n].ctypes.data, self.buffers[n], out[n].nbytes, d2h, self.stream))
        _check(rt.cudaStreamSynchronize(self.stream))
        return {n: v.astype(np.float32, copy=False) for n, v in out.items()}

    def device_bytes(self) -> int:
        size = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size
        return int(size) + sum(self.row_bytes[n] * self.max_rows for n in self.names)


class TensorRTBackend(Backend):
    """Engines from ``freedit build``; refuses stale or foreign plans (engine/directory.open_engines)."""

    name = "tensorrt"

    def __init__(self, model_dir: str | Path, engines_dir: str | Path | None = None, device_id: int = 0,
                 builder: str = "auto"):
        from freedit.engine.builder import device_compute_capability
        from freedit.engine.directory import open_engines
        from freedit.engine.tensorrt_api import load_tensorrt

        cc = device_compute_capability(device_id)
        if cc is None:
            raise BackendUnavailable("the TensorRT backend needs an NVIDIA GPU: cuda-python is missing or "
                               "cudaGetDeviceCount found none (use the onnxruntime or torch backend on a CPU)")
        from cuda.bindings import runtime as rt

        self.trt = load_tensorrt(builder)
        unit = open_engines(Path(model_dir), self.trt, Path(engines_dir) if engines_dir else None, device_cc=cc)
        _check(rt.cudaSetDevice(device_id))
        runtime = self.trt.module.Runtime(self.trt.module.Logger(self.trt.module.Logger.ERROR))
        self._engines = {g: _Engine(self.trt, runtime, plan) for g, plan in unit.plans.items()
                         if g in ("dit", "drafter", "vae_decoder")}
        self._info = {g: ModelInfo.from_json(m.data["onnx"]["config"]) for g, m in unit.manifests.items()
                      if g in self._engines and m.data["onnx"].get("config")}
        if "vae_decoder" in self._engines:  # its manifest carries the decoder's own metadata, not a DiT config
            decoder = unit.manifests["vae_decoder"].data["onnx"].get("decoder")
            if decoder:
                self._info["vae_decoder"] = DecoderInfo.from_json(decoder, str(unit.plans["vae_decoder"]))
        if set(self._info) != set(self._engines):
            raise RuntimeError(f"a manifest in {unit.directory} lacks the model's {CONFIG_METADATA_KEY}")
        self.name = f"tensorrt-{self.trt.kind}"
        self.device_id = device_id

    def engines(self) -> tuple[str, ...]:
        return tuple(self._engines)

    def info(self, engine: str) -> ModelInfo | DecoderInfo:
        return self._info[engine]

    memory = "cuda"

    def inputs(self, engine: str) -> tuple[str, ...]:
        return input_names(engine, self._engines[engine].inputs)

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cuda.bindings import runtime as rt

        _check(rt.cudaSetDevice(self.device_id))  # the current device is per host thread
        return self._engines[engine].run(inputs)

    def max_rows(self, engine: str) -> int | None:
        return int(self._engines[engine].max_rows)

    def bind(self, engine: str, inputs: dict, outputs: dict, lane) -> BoundEngine:
        return _BoundPlan(self._engines[engine], inputs, outputs, lane)

    def device_memory_bytes(self) -> int:
        """Device memory held by this backend: TensorRT scratch + every preallocated I/O buffer
        (all allocated at load time; nothing is allocated while sampling)."""
        return sum(e.device_bytes() for e in self._engines.values())


class _BoundPlan(BoundEngine):
    """A plan's context on the workspace's device buffers, enqueued on the lane's stream."""

    def __init__(self, engine: _Engine, inputs: dict, outputs: dict, lane):
        stream = getattr(lane, "stream", None)
        if stream is None:
            raise ValueError("the TensorRT backend binds device buffers on a device lane (the round's device maths)")
        missing = set(engine.names) - set(inputs) - set(outputs)
        if missing:
            raise ValueError(f"the plan's tensors {sorted(missing)} have no buffer in the round")
        for name, buf in {**inputs, **outputs}.items():
            want = np.dtype(engine.dtypes[name])
            if np.dtype(buf.dtype) != want:
                raise TypeError(f"the plan's tensor {name!r} is {want}, the round's buffer {buf.dtype}: "
                                f"re-export with `freedit export` (fp32/int64 I/O) and rebuild")
        self.engine, self.stream = engine, stream
        self.addresses = {n: b.ptr for n, b in {**inputs, **outputs}.items()}
        self.row_shapes = {n: tuple(b.shape[1:]) for n, b in inputs.items()}
        self.key = id(self)

    def run(self, rows: int) -> None:
        e, handle = self.engine, self.stream.handle
        e.select(rows, handle, capturing=self.stream.capturing())
        if e.bound_addresses != self.key:  # several workspaces share one context: addresses per call
            for name, ptr in self.addresses.items():
                e.context.set_tensor_address(name, ptr)
            e.bound_addresses = self.key
        e.set_shapes({n: (rows, *shape) for n, shape in self.row_shapes.items()})
        e.enqueue(handle)
