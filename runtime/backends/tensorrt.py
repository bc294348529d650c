"""TensorRT backend: the plans of an engine directory (engine/directory.py) on one CUDA stream.

Per engine: one execution context with its own device memory and its own CUDA stream (so the
drafter and the verifier run concurrently when micro-batches overlap, runtime/overlap.py), tensors bound by name, ``execute_async_v3``. Every
input and output buffer is allocated once, at the largest row count of the engine's dynamic
profile, so nothing is allocated while sampling. Row counts that match a static profile
(`freedit build --static-batches`) run from a CUDA graph captured on first use.

Works with ``tensorrt`` and ``tensorrt_rtx`` alike. Needs an NVIDIA GPU and cuda-python; without
them construction fails with one clear error, before anything is loaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from freedit.errors import BackendUnavailable
from freedit.runtime.backends.base import Backend
from freedit.runtime.contract import CONFIG_METADATA_KEY, ModelInfo, input_names

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
    """One plan: its context, device memory, preallocated I/O buffers and captured graphs."""

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
            size = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size
            self.scratch = _check(rt.cudaMalloc(max(int(size), 1)))
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
        self.graphs = {}  # rows -> instantiated CUDA graph
        self.graphs_warm = set()  # static row counts run once uncaptured (TensorRT initialises lazily)
        self.profile = 0

    def _shape_at(self, name: str, rows: int) -> tuple[int, ...]:
        shape = tuple(self.engine.get_tensor_shape(name))
        return (rows, *shape[1:])

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cuda.bindings import runtime as rt

        rows = len(next(iter(inputs.values())))
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows exceed the engine's profile (max {self.max_rows}); rebuild with larger "
                             f"--batch-sizes or --window")
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host = {n: np.ascontiguousarray(inputs[n], dtype=self.dtypes[n]) for n in self.inputs}
        for n in self.inputs:
            _check(rt.cudaMemcpyAsync(self.buffers[n], host[n].ctypes.data, host[n].nbytes, h2d, self.stream))
        profile = self.static.get(rows, 0)
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, self.stream)
            self.profile = profile
        for n in self.inputs:
            self.context.set_input_shape(n, host[n].shape)
        if rows in self.static and rows in self.graphs:
            _check(rt.cudaGraphLaunch(self.graphs[rows], self.stream))
        elif rows in self.static and rows in self.graphs_warm:
            self.graphs[rows] = self._capture()
            _check(rt.cudaGraphLaunch(self.graphs[rows], self.stream))
        else:
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError(f"{self.trt.describe()}: execute_async_v3 failed")
            if rows in self.static:
                self.graphs_warm.add(rows)  # capture on the second call
        out = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            out[n] = np.empty(shape, dtype=self.dtypes[n])
            _check(rt.cudaMemcpyAsync(out[n].ctypes.data, self.buffers[n], out[n].nbytes, d2h, self.stream))
        _check(rt.cudaStreamSynchronize(self.stream))
        return {n: v.astype(np.float32, copy=False) for n, v in out.items()}

    def _capture(self):
        from cuda.bindings import runtime as rt

        _check(rt.cudaStreamBeginCapture(self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        ok = self.context.execute_async_v3(self.stream)
        graph = _check(rt.cudaStreamEndCapture(self.stream))
        if not ok:
            raise RuntimeError(f"{self.trt.describe()}: execute_async_v3 failed during CUDA graph capture")
        return _check(rt.cudaGraphInstantiate(graph, 0))

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

        cc = device_compute_capability()
        if cc is None:
            raise BackendUnavailable("the TensorRT backend needs an NVIDIA GPU: cuda-python is missing or "
                               "cudaGetDeviceCount found none (use the onnxruntime or torch backend on a CPU)")
        from cuda.bindings import runtime as rt

        self.trt = load_tensorrt(builder)
        unit = open_engines(Path(model_dir), self.trt, Path(engines_dir) if engines_dir else None, device_cc=cc)
        _check(rt.cudaSetDevice(device_id))
        runtime = self.trt.module.Runtime(self.trt.module.Logger(self.trt.module.Logger.ERROR))
        self._engines = {g: _Engine(self.trt, runtime, plan) for g, plan in unit.plans.items()
                         if g in ("dit", "drafter")}
        self._info = {g: ModelInfo.from_json(m.data["onnx"]["config"]) for g, m in unit.manifests.items()
                      if g in self._engines and m.data["onnx"].get("config")}
        if set(self._info) != set(self._engines):
            raise RuntimeError(f"a manifest in {unit.directory} lacks the model's {CONFIG_METADATA_KEY}")
        self.name = f"tensorrt-{self.trt.kind}"

    def engines(self) -> tuple[str, ...]:
        return tuple(self._engines)

    def info(self, engine: str) -> ModelInfo:
        return self._info[engine]

    def inputs(self, engine: str) -> tuple[str, ...]:
        return input_names(engine, self._engines[engine].inputs)

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._engines[engine].run(inputs)

    def device_memory_bytes(self) -> int:
        """Device memory held by this backend: TensorRT scratch + every preallocated I/O buffer
        (all allocated at load time; nothing is allocated while sampling)."""
        return sum(e.device_bytes() for e in self._engines.values())
