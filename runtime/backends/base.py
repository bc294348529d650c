"""The backend interface: run a named engine (``dit``, ``drafter``, ``vae_decoder``) on named arrays or bound buffers.

Samplers only ever talk to this interface, so ONNX Runtime, TensorRT and torch backends drive
the same sampling code. Two ways to call an engine:

* ``run(engine, inputs)``: numpy in, numpy out (benchmarks' cost curves, checks, simple tools);
* ``bind(engine, inputs, outputs, lane)``: the FREE round binds its workspace's buffers by name
  once; ``BoundEngine.run(rows)`` then runs the engine on the first ``rows`` rows of every bound
  buffer, in the lane's order (on a GPU: enqueued on the lane's CUDA stream, no host staging).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from freedit.runtime.contract import DecoderInfo, ModelInfo, input_names


class BoundEngine:
    """An engine bound to buffers by name. An engine that cannot be captured into a CUDA graph
    raises round_device.CaptureUnsupported when its stream is capturing (the phase then runs plainly)."""

    def run(self, rows: int) -> None:
        raise NotImplementedError


def host_array(buffer) -> np.ndarray:
    """A numpy view of a bound buffer: a numpy array itself, or device memory that is host memory
    (the kernels' host emulation)."""
    return buffer if isinstance(buffer, np.ndarray) else buffer.host()


class HostBoundEngine(BoundEngine):
    """The generic binding for backends that compute on host arrays (``run``): views of the first
    rows in, outputs copied into the bound buffers. On a device lane (the emulation) the call is a
    host function in stream order, so it keeps its place among the kernels, captured graphs too."""

    def __init__(self, backend: "Backend", engine: str, inputs: dict, outputs: dict, lane):
        self.backend, self.engine, self.lane = backend, engine, lane
        self.inputs = {n: host_array(b) for n, b in inputs.items()}
        self.outputs = {n: host_array(b) for n, b in outputs.items()}

    def _call(self, rows: int) -> None:
        out = self.backend.run(self.engine, {n: a[:rows] for n, a in self.inputs.items()})
        for name, dst in self.outputs.items():
            dst[:rows] = out[name]

    def run(self, rows: int) -> None:
        stream = getattr(self.lane, "stream", None)
        if stream is None:
            self._call(rows)
        else:
            stream.launch_host_func(lambda: self._call(rows))


class Backend(ABC):
    name: str = "backend"
    #: where the engines compute: "host" (numpy arrays, or the emulation's host-backed buffers) or "cuda"
    memory: str = "host"

    @abstractmethod
    def engines(self) -> tuple[str, ...]:
        """Names of the engines this backend has loaded."""

    @abstractmethod
    def info(self, engine: str) -> ModelInfo | DecoderInfo:
        """The model description read from the engine's metadata (DecoderInfo for the ``vae_decoder``)."""

    def inputs(self, engine: str) -> tuple[str, ...]:
        """The inputs ``engine`` takes: its contract's, plus the optional ones it has (runtime/contract.py).
        A backend that cannot tell takes the contract's alone."""
        return input_names(engine, ())

    @abstractmethod
    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one engine call; inputs and outputs are named per the ONNX contract."""

    def max_rows(self, engine: str) -> int | None:
        """The most rows one call may have (a TensorRT profile's maximum); None = no limit."""
        return None

    def bind(self, engine: str, inputs: dict, outputs: dict, lane) -> BoundEngine:
        """Bind buffers by tensor name (see the module docstring)."""
        return HostBoundEngine(self, engine, inputs, outputs, lane)

    def device_memory_bytes(self) -> int | None:
        """Peak GPU memory this backend has held, where it can tell (None on the CPU)."""
        return None
