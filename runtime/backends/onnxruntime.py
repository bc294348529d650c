"""ONNX Runtime backend (CPU by default): one InferenceSession per engine, contract-checked on load."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from freedit.runtime.backends.base import Backend
from freedit.runtime.contract import ContractError, ModelInfo, check_session


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model_files: dict[str, str | Path], providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self._sessions, self._info, self._outputs = {}, {}, {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(8, os.cpu_count() or 1)
        options.log_severity_level = 3
        for engine, path in model_files.items():
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"model file {path} for engine '{engine}' does not exist")
            try:
                session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise ContractError(f"{path} is not a loadable ONNX model: {str(exc).splitlines()[0][:200]}") from None
            self._info[engine] = check_session(engine, session, str(path))
            self._sessions[engine] = session
            self._outputs[engine] = [o.name for o in session.get_outputs()]

    def engines(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    def info(self, engine: str) -> ModelInfo:
        return self._info[engine]

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self._outputs[engine]
        return dict(zip(names, self._sessions[engine].run(names, inputs)))
