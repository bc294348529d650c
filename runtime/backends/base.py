"""The backend interface: run a named engine (``dit``, ``drafter``) on named arrays.

Samplers only ever talk to this interface, so ONNX Runtime, TensorRT and torch backends drive
the same sampling code.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from freedit.runtime.contract import ModelInfo, input_names


class Backend(ABC):
    name: str = "backend"

    @abstractmethod
    def engines(self) -> tuple[str, ...]:
        """Names of the engines this backend has loaded."""

    @abstractmethod
    def info(self, engine: str) -> ModelInfo:
        """The model description read from the engine's metadata."""

    def inputs(self, engine: str) -> tuple[str, ...]:
        """The inputs ``engine`` takes: its contract's, plus the optional ones it has (runtime/contract.py).
        A backend that cannot tell takes the contract's alone."""
        return input_names(engine, ())

    @abstractmethod
    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one engine call; inputs and outputs are named per the ONNX contract."""

    def device_memory_bytes(self) -> int | None:
        """Peak GPU memory this backend has held, where it can tell (None on the CPU)."""
        return None
