"""ONNX Runtime backend: one InferenceSession per engine, contract-checked on load.

``device="cpu"`` (default) runs the CPU provider. ``device="cuda"`` runs the CUDA execution
provider (the `onnxruntime-gpu` wheel) with I/O binding: inputs are copied to the GPU once per
call, outputs are allocated there by ORT and copied back in one go, instead of the per-run host
staging ``session.run`` does. ``io_binding=True`` takes the same path on the CPU (tested here).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from freedit.errors import BackendUnavailable
from freedit.runtime.backends.base import Backend
from freedit.runtime.contract import ContractError, ModelInfo, check_session, input_names

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
