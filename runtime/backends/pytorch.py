"""PyTorch backend (extra `torch`): the DiT and drafter as torch modules, eager or torch.compile'd.

The same contracts as the ONNX graphs (runtime/contract.py): ``dit`` (x, t, y) -> (eps_v, feat),
``drafter`` (feat, x, t, y[, t_feat]) -> (draft_feat, eps_v). Arrays come in and go out as numpy (host);
on a CUDA device they are copied to and from it. ``compile=True`` uses torch.compile; on CUDA with
``mode="reduce-overhead"`` that captures CUDA graphs per input shape.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from freedit.errors import BackendUnavailable
from freedit.runtime.backends.base import Backend
from freedit.runtime.contract import ModelInfo

#: Default checkpoint names in a model directory; pipeline.json's "checkpoints" overrides them.
CHECKPOINTS = {"dit": "dit.safetensors", "drafter": "drafter.safetensors"}


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, dit, drafter=None, device: str = "cpu", compile: bool = False, mode: str | None = None,
                 threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("the torch backend was asked for CUDA, but torch sees no CUDA GPU")
        self._modules = {"dit": dit.eval().to(self.device)}
        if drafter is not None:
            drafter.dit.to(self.device)  # the drafter reuses the DiT's embedders and head
            self._modules["drafter"] = drafter.eval().to(self.device)
        self._run = {name: (torch.compile(m, mode=mode, dynamic=True) if compile else m)
                     for name, m in self._modules.items()}
        self._outputs = {"dit": ("eps_v", "feat"), "drafter": ("draft_feat", "eps_v")}
        self._inputs = {"dit": ("x", "t", "y"),
                        "drafter": ("feat", "x", "t", "y") + (("t_feat",) if drafter is not None and drafter.config.parent_time else ())}
        cfg = dit.config
        self._info = ModelInfo(input_size=cfg.input_size, in_channels=cfg.in_channels, patch_size=cfg.patch_size,
                               hidden_size=cfg.hidden_size, num_classes=cfg.num_classes, learn_sigma=cfg.learn_sigma,
                               cfg_mode=cfg.cfg_mode)
        self.name = f"torch-{self.device.type}" + ("-compiled" if compile else "")

    @classmethod
    def from_checkpoints(cls, dit_path: str | Path, drafter_path: str | Path | None = None, **kwargs) -> "TorchBackend":
        from freedit.export.checkpoint import load_dit

        dit = load_dit(dit_path)
        drafter = None
        if drafter_path is not None:
            from freedit.export.drafter import load_drafter

            drafter = load_drafter(drafter_path, dit)
        return cls(dit, drafter, **kwargs)

    def engines(self) -> tuple[str, ...]:
        return tuple(self._modules)

    def info(self, engine: str) -> ModelInfo:
        return self._info

    def inputs(self, engine: str) -> tuple[str, ...]:
        return self._inputs[engine]

    def device_memory_bytes(self) -> int | None:
        import torch

        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device) for name in self._inputs[engine]]
        with torch.inference_mode():
            out = self._run[engine](*args)
        return {name: t.float().cpu().numpy() for name, t in zip(self._outputs[engine], out)}
