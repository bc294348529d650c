"""The backend interface: run a named engine (``dit``, ``drafter``, ``vae_decoder``) on named arrays.

Samplers only ever talk to this interface, so ONNX Runtime, TensorRT and torch backends drive
the same sampling code.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from freedit.runtime.contract import DecoderInfo, ModelInfo


class Backend(ABC):
    name: str = "backend"

    @abstractmethod
    def engines(self) -> tuple[str, ...]:
        """Names of the engines this backend has loaded."""

    @abstractmethod
    def info(self, engine: str) -> ModelInfo | DecoderInfo:
        """The model description read from the engine's metadata (DecoderInfo for the ``vae_decoder``)."""

    @abstractmethod
    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one engine call; inputs and outputs are named per the ONNX contract."""

    def max_rows(self, engine: str) -> int | None:
        """Most rows one call of ``engine`` may have (a TensorRT profile's top), or None for no limit."""
        return None

    def device_memory_bytes(self) -> int | None:
        """Peak GPU memory this backend has held, where it can tell (None on the CPU)."""
        return None
