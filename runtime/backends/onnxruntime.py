"""ONNX Runtime backend: one InferenceSession per engine, contract-checked on load.

``device="cpu"`` (default) runs the CPU provider. ``device="cuda"`` runs the CUDA execution
provider (the `onnxruntime-gpu` wheel).

The FREE round binds its buffers (``bind``): one I/O binding per row count, made once, whose
inputs and outputs are the workspace's own memory (device OrtValues on CUDA, host memory on the
CPU), so a call copies nothing. On CUDA the session computes on the lane's stream
(``user_compute_stream``) without a host synchronisation at the end of the run.
``run(engine, inputs)`` keeps the numpy interface; with ``io_binding=True`` it takes the
binding path on numpy inputs (tested on the CPU).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from freedit.errors import BackendUnavailable
from freedit.runtime.backends.base import Backend, BoundEngine
from freedit.runtime.contract import PRECISION_METADATA_KEY, ContractError, ModelInfo, check_session, input_names

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model_files: dict[str, str | Path], providers: list[str] | None = None, threads: int | None = None,
                 device: str = "cpu", device_id: int = 0, io_binding: bool | None = None):
        import onnxruntime as ort

        if device not in PROVIDERS:
            raise ValueError(f"unknown ONNX Runtime device {device!r}; choose {' or '.join(PROVIDERS)}")
        if device == "cuda" and PROVIDERS["cuda"] not in ort.get_available_providers():
            raise BackendUnavailable(f"this onnxruntime ({ort.__version__}) has no CUDA execution provider (it has "
                               f"{', '.join(ort.get_available_providers())}); install `freedit[onnxruntime-gpu]`")
        if providers is None:
            providers = [(PROVIDERS["cuda"], {"device_id": device_id}), PROVIDERS["cpu"]] if device == "cuda" \
                else [PROVIDERS["cpu"]]
        self.device, self.device_id = device, device_id
        self.io_binding = device != "cpu" if io_binding is None else io_binding
        self.name = "onnxruntime" if device == "cpu" else f"onnxruntime-{device}"
        self._sessions, self._info, self._outputs = {}, {}, {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(8, os.cpu_count() or 1)
        options.log_severity_level = 3
        for engine, path in model_files.items():
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"model file {path} for engine '{engine}' does not exist")
            try:
                session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise ContractError(f"{path} is not a loadable ONNX model: {str(exc).splitlines()[0][:200]}") from None
            self._info[engine] = check_session(engine, session, str(path))
            self._sessions[engine] = session
            self._outputs[engine] = [o.name for o in session.get_outputs()]
        self._ort = ort
        self.memory = "cuda" if device == "cuda" else "host"
        meta = self._sessions["dit"].get_modelmeta().custom_metadata_map if "dit" in self._sessions else {}
        self.precision = meta.get(PRECISION_METADATA_KEY, "fp32")  # in the graph (freedit export --precision)
        self._streams: dict[str, int] = {}  # engine -> the CUDA stream its session computes on

    def bind(self, engine: str, inputs: dict, outputs: dict, lane) -> BoundEngine:
        stream = getattr(lane, "stream", None)
        if self.device == "cuda":
            if stream is None:
                raise ValueError("the ONNX Runtime CUDA backend binds device buffers on a device lane")
            if self._streams.setdefault(engine, stream.handle) != stream.handle:
                raise ValueError(f"engine '{engine}' already computes on another CUDA stream")
            self._sessions[engine].set_providers(
                [PROVIDERS["cuda"], PROVIDERS["cpu"]],
                [{"device_id": self.device_id, "user_compute_stream": str(stream.handle)}, {}])
        return _BoundSession(self, engine, inputs, outputs, stream)

    def engines(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    def info(self, engine: str) -> ModelInfo:
        return self._info[engine]

    def inputs(self, engine: str) -> tuple[str, ...]:
        return input_names(engine, [i.name for i in self._sessions[engine].get_inputs()])

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, session = self._outputs[engine], self._sessions[engine]
        if not self.io_binding:
            return dict(zip(names, session.run(names, inputs)))
        binding = session.io_binding()
        for name, value in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:  # ORT allocates each output on the device, sized for this call
            binding.bind_output(name, self.device, self.device_id)
        session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu()))


class _BoundSession(BoundEngine):
    """An I/O binding per row count over the workspace's buffers (numpy or device), made once."""

    def __init__(self, backend: OnnxRuntimeBackend, engine: str, inputs: dict, outputs: dict, stream):
        self.session, self.stream = backend._sessions[engine], stream
        self.device_type = "cuda" if backend.device == "cuda" else "cpu"
        self.device_id = backend.device_id
        self.inputs = {n: _address(b) for n, b in inputs.items()}
        self.outputs = {n: _address(b) for n, b in outputs.items()}
        self.bindings: dict[int, object] = {}
        self.options = backend._ort.RunOptions()
        if self.device_type == "cuda":  # ordered by the stream, not by a host wait
            self.options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def _binding(self, rows: int):
        binding = self.bindings.get(rows)
        if binding is None:
            binding = self.session.io_binding()
            for name, (ptr, dtype, shape) in self.inputs.items():
                binding.bind_input(name, self.device_type, self.device_id, dtype, (rows, *shape[1:]), ptr)
            for name, (ptr, dtype, shape) in self.outputs.items():
                binding.bind_output(name, self.device_type, self.device_id, dtype, (rows, *shape[1:]), ptr)
            self.bindings[rows] = binding
        return binding

    def _call(self, rows: int) -> None:
        self.session.run_with_iobinding(self._binding(rows), self.options)

    def run(self, rows: int) -> None:
        if self.stream is None:
            self._call(rows)
        elif self.device_type == "cpu":  # host memory on a device lane: the kernels' host emulation,
            self.stream.launch_host_func(lambda: self._call(rows))  # in stream order, captured as a host node
        else:
            if self.stream.capturing():
                from freedit.runtime.round_device import CaptureUnsupported

                raise CaptureUnsupported("ONNX Runtime's CUDA provider is not captured into freedit's graphs")
            self._call(rows)


def _address(buffer) -> tuple[int, np.dtype, tuple[int, ...]]:
    if isinstance(buffer, np.ndarray):
        if not buffer.flags.c_contiguous:
            raise ValueError("bound buffers must be C-contiguous")
        return buffer.ctypes.data, buffer.dtype, buffer.shape
    return buffer.ptr, buffer.dtype, buffer.shape
