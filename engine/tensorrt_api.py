"""Which TensorRT: ``tensorrt`` where installed (the full SDK, builds for the GPU it runs on), else
``tensorrt_rtx`` (TensorRT for RTX: builds ahead of time on any machine, GPU or not, for chosen
compute capabilities). Both are strongly typed here: precision comes from the ONNX graph.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from freedit.errors import BuildError

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINT = ("install one: `pip install 'freedit[tensorrt-rtx]'` (TensorRT-RTX, builds without a GPU) or "
                "`pip install 'freedit[tensorrt]'` (full TensorRT, needs an NVIDIA GPU to build)")


@dataclass(frozen=True)
class TensorRT:
    module: ModuleType
    kind: str  # "tensorrt" or "tensorrt-rtx"

    @property
    def version(self) -> str:
        return self.module.__version__

    @property
    def is_rtx(self) -> bool:
        return self.kind == "tensorrt-rtx"

    def describe(self) -> str:
        return f"{self.module.__name__} {self.version}"


def load_tensorrt(prefer: str = "auto") -> TensorRT:
    """``prefer``: "auto" (tensorrt, then tensorrt-rtx), "tensorrt" or "tensorrt-rtx"."""
    if prefer not in ("auto", *MODULES):
        raise BuildError(f"unknown builder {prefer!r}; choose auto, tensorrt or tensorrt-rtx")
    kinds = list(MODULES) if prefer == "auto" else [prefer]
    failures = []
    for kind in kinds:
        try:
            return TensorRT(importlib.import_module(MODULES[kind]), kind)
        except ImportError as exc:  # also a wheel whose shared libraries are missing
            failures.append(f"{MODULES[kind]}: {exc}")
    raise BuildError(f"no TensorRT found ({'; '.join(failures)}); {INSTALL_HINT}")
