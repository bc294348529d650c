"""PyTorch backend (extra `torch`): the DiT and drafter as torch modules, eager or torch.compile'd.

The same contracts as the ONNX graphs (runtime/contract.py): ``dit`` (x, t, y) -> (eps_v, feat),
``drafter`` (feat, x, t, y[, t_feat]) -> (draft_feat, eps_v), ``vae_decoder`` latent -> image
(diffusers' AutoencoderKL, extra `vae`). ``precision``: "fp32", "tf32"
(TensorFloat-32 matrix multiplies on CUDA) or "bf16" (autocast: bf16 matrix multiplies and
attention, fp32 elsewhere); the I/O stays fp32 and every result states the precision.

``run`` takes and returns numpy (host) arrays. ``bind`` works on the round's buffers in place:
device buffers are wrapped as CUDA tensors through ``__cuda_array_interface__`` (no copy), and the
call runs on the lane's stream (``torch.cuda.ExternalStream``); numpy buffers (and the kernels'
host emulation) are wrapped with ``torch.from_numpy``. Torch allocates while it runs, so its calls
are not captured into freedit's CUDA graphs (``compile=True`` with ``mode="reduce-overhead"``
gives torch's own graphs per call instead).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from freedit.errors import BackendUnavailable
from freedit.runtime.backends.base import Backend, BoundEngine
from freedit.runtime.contract import DecoderInfo, ModelInfo

#: Default checkpoint names in a model directory; pipeline.json's "checkpoints" overrides them.
CHECKPOINTS = {"dit": "dit.safetensors", "drafter": "drafter.safetensors", "vae_decoder": "vae"}
PRECISIONS = ("fp32", "tf32", "bf16")


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, dit, drafter=None, device: str = "cpu", compile: bool = False, mode: str | None = None,
                 threads: int | None = None, precision: str = "fp32", vae=None):
        import torch

        if precision not in PRECISIONS:
            raise ValueError(f"unknown torch precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("the torch backend was asked for CUDA, but torch sees no CUDA GPU")
        self.precision = precision
        self.device_id = self.device.index or 0
        self.memory = "cuda" if self.device.type == "cuda" else "host"
        if self.device.type == "cuda":  # TF32 is a process-wide switch in torch
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
        self._modules = {"dit": dit.eval().to(self.device)}
        if drafter is not None:
            drafter.dit.to(self.device)  # the drafter reuses the DiT's embedders and head
            self._modules["drafter"] = drafter.eval().to(self.device)
        cfg = dit.config
        self._info = {"dit": ModelInfo(input_size=cfg.input_size, in_channels=cfg.in_channels, patch_size=cfg.patch_size,
                                       hidden_size=cfg.hidden_size, num_classes=cfg.num_classes,
                                       learn_sigma=cfg.learn_sigma, cfg_mode=cfg.cfg_mode,
                                       fixed_variance=cfg.fixed_variance)}
        self._info["drafter"] = self._info["dit"]
        if vae is not None:
            from freedit.export.vae import VaeDecoderGraph, decoder_metadata

            self._modules["vae_decoder"] = VaeDecoderGraph(vae).eval().to(self.device)
            self._info["vae_decoder"] = DecoderInfo(**decoder_metadata(vae, cfg.input_size))
        self._run = {name: (torch.compile(m, mode=mode, dynamic=True) if compile else m)
                     for name, m in self._modules.items()}
        self._outputs = {"dit": ("eps_v", "feat"), "drafter": ("draft_feat", "eps_v"), "vae_decoder": ("image",)}
        self._inputs = {"dit": ("x", "t", "y"),
                        "drafter": ("feat", "x", "t", "y") + (("t_feat",) if drafter is not None and
                                                               drafter.config.parent_time else ()),
                        "vae_decoder": ("latent",)}
        self.name = f"torch-{self.device.type}" + ("-compiled" if compile else "") + \
            ("" if precision == "fp32" else f"-{precision}")

    @classmethod
    def from_checkpoints(cls, dit_path: str | Path, drafter_path: str | Path | None = None,
                         vae_path: str | Path | None = None, **kwargs) -> "TorchBackend":
        """``vae_path``: a diffusers AutoencoderKL folder (`freedit export --torch-weights` writes ``vae/``)."""
        from freedit.export.checkpoint import load_dit

        dit = load_dit(dit_path)
        drafter = vae = None
        if drafter_path is not None:
            from freedit.export.drafter import load_drafter

            drafter = load_drafter(drafter_path, dit)
        if vae_path is not None:
            from freedit.export.vae import load_vae

            vae = load_vae(str(vae_path))
        return cls(dit, drafter, vae=vae, **kwargs)

    def engines(self) -> tuple[str, ...]:
        return tuple(self._modules)

    def info(self, engine: str) -> ModelInfo | DecoderInfo:
        return self._info[engine]

    def inputs(self, engine: str) -> tuple[str, ...]:
        return self._inputs[engine]

    def device_memory_bytes(self) -> int | None:
        import torch

        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None

    def autocast(self):
        import torch

        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, engine: str, args: list) -> tuple:
        import torch

        with torch.inference_mode(), self.autocast():
            return self._run[engine](*args)

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device) for name in self._inputs[engine]]
        out = self.forward(engine, args)
        return {name: t.float().cpu().numpy() for name, t in zip(self._outputs[engine], out)}

    def bind(self, engine: str, inputs: dict, outputs: dict, lane) -> BoundEngine:
        return _BoundModule(self, engine, inputs, outputs, lane)


class _BoundModule(BoundEngine):
    """Tensors over the round's buffers, made once; a call runs the module on views of the first rows."""

    def __init__(self, backend: TorchBackend, engine: str, inputs: dict, outputs: dict, lane):
        import torch

        self.backend, self.engine = backend, engine
        self.stream = getattr(lane, "stream", None)
        on_gpu = backend.device.type == "cuda"
        if on_gpu and (self.stream is None or isinstance(next(iter(inputs.values())), np.ndarray)):
            raise ValueError("the torch CUDA backend binds device buffers on a device lane (the round's device maths)")

        def tensor(buf):
            if isinstance(buf, np.ndarray):
                return torch.from_numpy(buf)
            if on_gpu:
                return torch.as_tensor(buf, device=backend.device)  # __cuda_array_interface__: no copy
            return torch.from_numpy(buf.host())  # the kernels' host emulation: device memory is host memory

        self.inputs = [tensor(inputs[name]) for name in backend.inputs(engine)]
        self.outputs = [tensor(outputs[name]) for name in backend._outputs[engine]]
        self.torch_stream = torch.cuda.ExternalStream(self.stream.handle) if on_gpu else None

    def _call(self, rows: int) -> None:
        import torch

        with torch.cuda.stream(self.torch_stream) if self.torch_stream is not None else contextlib.nullcontext():
            out = self.backend.forward(self.engine, [t[:rows] for t in self.inputs])
            for dst, src in zip(self.outputs, out):
                dst[:rows].copy_(src)

    def run(self, rows: int) -> None:
        if self.torch_stream is not None:
            if self.stream.capturing():
                from freedit.runtime.round_device import CaptureUnsupported

                raise CaptureUnsupported("torch allocates while it runs; its calls are not captured")
            self._call(rows)
        elif self.stream is not None:  # host emulation: in stream order as a host function
            self.stream.launch_host_func(lambda: self._call(rows))
        else:
            self._call(rows)
