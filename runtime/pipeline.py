"""The public API: ``Pipeline.default().generate(class_labels, ...)`` -> images and per-sample stats.

A model directory holds ``dit.onnx`` (the ``dit`` contract), optionally ``drafter.onnx`` and, for
latent DiTs, ``vae_decoder.onnx``, and ``pipeline.json`` (defaults such as the documented CFG
scale); the bundled digits model is one, shipped inside the package.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from freedit.runtime import noise
from freedit.runtime.backends.base import Backend
from freedit.runtime.decode import DECODER, check_decode_batch, check_decoder_matches, decode_latents, is_latent
from freedit.runtime.images import make_grid, to_uint8
from freedit.runtime.overlap import run_overlapped
from freedit.runtime.ragged import SampleState, run_ragged
from freedit.runtime.schedule import NUM_TRAIN_TIMESTEPS, Schedule
from freedit.runtime.sequential import SequentialSampler
from freedit.runtime.speculative import FeatureDrafter, FrozenDrafter, SpeculativeSampler
from freedit.runtime.contract import ContractError
from freedit.runtime.target import GuidedModel

SAMPLERS = ("free", "free-relax", "frozen", "sequential", "ddim")
SPECULATIVE = ("free", "free-relax", "frozen")
#: Backends by name: ONNX Runtime (CPU; CUDA with onnxruntime-gpu), PyTorch (extra `torch`; eager or
#: compiled, CPU or CUDA) and TensorRT (plans from `freedit build`, GPU only).
BACKENDS = ("onnxruntime", "onnxruntime-cuda", "torch", "torch-compiled", "torch-cuda", "torch-cuda-compiled", "tensorrt")


def default_model_dir() -> Path:
    return Path(str(resources.files("freedit.runtime") / "assets" / "digits"))


class NoDecoderError(ValueError):
    """Images asked of a latent DiT whose model directory has no VAE decoder."""


@dataclass
class GenerationResult:
    samples: np.ndarray  # [N, C, H, W] float32 in the model's space: [-1, 1] pixels, or a latent DiT's latents
    labels: np.ndarray
    stats: list[dict]
    settings: dict
    seconds: float
    summary: dict = field(default_factory=dict)
    timeline: list[dict] | None = None  # phase events when micro-batches overlapped (runtime/overlap.py)
    decoded: np.ndarray | None = None  # latent DiTs: uint8 RGB [N, H, W, 3] from the model's vae_decoder
    latent: bool = False  # samples are latents (images come from the decoder)

    @property
    def images(self) -> np.ndarray:
        """uint8 images: [N, H, W] for grey pixel models, [N, H, W, 3] for RGB and decoded latent models."""
        if self.decoded is not None:
            return self.decoded
        if self.latent:
            raise NoDecoderError(f"{self.settings.get('model') or 'this model'} is a latent DiT without a decoded "
                                 f"image: export its vae_decoder.onnx (`freedit export --vae ...`) or use .latents")
        return to_uint8(self.samples)

    @property
    def latents(self) -> np.ndarray | None:
        """The sampler's final latents [N, C, h, w] (latent DiTs), as the decoder received them."""
        return self.samples if self.latent else None

    def grid(self, ncol: int | None = None, scale: int = 4) -> np.ndarray:
        return make_grid(self.images, ncol or min(len(self.samples), 10), scale=scale)


def _check_steps(steps) -> str:
    if isinstance(steps, bool) or steps is None:
        raise ValueError(f"steps must be a positive step count such as 250 or a spacing such as 'ddim50', got {steps!r}")
    if isinstance(steps, (int, np.integer)):
        if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {steps}")
        return str(int(steps))
    Schedule.create(steps)  # raises a ValueError that says what is wrong with the spacing
    return str(steps)


class Pipeline:
    def __init__(self, backend: Backend, defaults: dict | None = None, source: str = ""):
        self.backend = backend
        self.info = backend.info("dit")
        self.has_drafter = "drafter" in backend.engines()
        if self.has_drafter:
            check_drafter_matches(self.info, backend.info("drafter"), source)
        self.latent = is_latent(self.info.in_channels)
        self.decoder = backend.info(DECODER) if DECODER in backend.engines() else None
        if self.decoder is not None:
            check_decoder_matches(self.info, self.decoder, source)
        self.defaults = {"sampler": "free" if self.has_drafter else "sequential", "steps": 250, "cfg_scale": 1.0,
                         "batch_size": 64, "window": 6, "relax": 0.5, "decode_batch_size": 4, **(defaults or {})}
        self.source = source

    @classmethod
    def from_directory(cls, path: str | Path, backend: str = "onnxruntime", threads: int | None = None) -> "Pipeline":
        path = Path(path)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        dit = path / "dit.onnx"
        if not dit.is_file():
            raise FileNotFoundError(f"{path} has no dit.onnx; export one with `freedit export` (or reinstall freedit "
                                    f"for the bundled model)")
        defaults = json.loads((path / "pipeline.json").read_text()) if (path / "pipeline.json").is_file() else {}
        return cls(_make_backend(backend, path, defaults, threads), defaults, source=str(path))

    @classmethod
    def default(cls, backend: str = "onnxruntime", threads: int | None = None) -> "Pipeline":
        """The bundled digits DiT, run with ONNX Runtime on the CPU."""
        return cls.from_directory(default_model_dir(), backend=backend, threads=threads)

    def validate(self, class_labels: Sequence[int], sampler: str, steps, cfg_scale: float, seed: int,
                 batch_size: int, window: int = 6, relax: float = 0.0) -> tuple[np.ndarray, str]:
        """Check every argument before any sampling starts; raise ValueError saying what to change."""
        labels = np.asarray(list(class_labels))
        if labels.size == 0:
            raise ValueError("no class labels given")
        if labels.dtype.kind not in "iu":
            raise ValueError(f"class labels must be integers, got {list(class_labels)[:5]}")
        bad = sorted({int(v) for v in labels if not 0 <= v < self.info.num_classes})
        if bad:
            raise ValueError(f"unknown class label(s) {bad}; this model has classes 0..{self.info.num_classes - 1}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if sampler in ("free", "free-relax") and not self.has_drafter:
            raise ValueError(f"sampler {sampler!r} needs a drafter: {self.source or 'this model'} has no drafter.onnx "
                             f"(train one with `freedit train-drafter`, or use --sampler frozen or sequential)")
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window length L must be an integer >= 1, got {window!r}")
        if not np.isfinite(relax) or relax < 0:
            raise ValueError(f"relax lambda must be >= 0, got {relax}")
        if not np.isfinite(cfg_scale) or cfg_scale < 0:
            raise ValueError(f"cfg scale must be >= 0 (1 = no guidance), got {cfg_scale}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        spacing = _check_steps(steps)
        if sampler == "ddim" and not spacing.startswith("ddim") and not spacing.isdigit():
            raise ValueError("the ddim sampler takes a step count (e.g. 50) or 'ddimN'")
        return labels.astype(np.int64), spacing

    def generate(self, class_labels: Sequence[int], sampler: str | None = None, steps=None,
                 cfg_scale: float | None = None, seed: int = 0, batch_size: int | None = None, window: int | None = None,
                 relax: float | None = None, progress: bool = False, micro_batches: int = 1,
                 window_schedule=None, decode: bool = True, decode_batch_size: int | None = None) -> GenerationResult:
        """Sample one image per class label. Same seed, same backend => same images, whatever the batch size.

        ``sampler``: "free" (lossless, the default when a drafter is present), "free-relax" (tempered
        accept test, ``relax`` = lambda), "frozen" (training-free drafter), "sequential" (DDPM), "ddim".
        ``window`` is FREE's draft length L. ``micro_batches`` > 1 (speculative samplers) keeps that
        many batches of ``batch_size`` in flight, one drafting while another verifies.
        ``window_schedule``: L per respaced step (e.g. runtime/adaptive.py's choice) instead of one L.
        Latent DiTs with a ``vae_decoder`` decode the final latents (``decode=False`` skips it),
        ``decode_batch_size`` latents per decoder call; ``.latents`` keeps them either way.
        """
        sampler = self.defaults["sampler"] if sampler is None else sampler
        steps = self.defaults["steps"] if steps is None else steps
        cfg_scale = float(self.defaults["cfg_scale"] if cfg_scale is None else cfg_scale)
        batch_size = self.defaults["batch_size"] if batch_size is None else batch_size
        window = self.defaults["window"] if window is None else window
        relax = float(self.defaults["relax"] if relax is None else relax) if sampler == "free-relax" else 0.0
        labels, spacing = self.validate(class_labels, sampler, steps, cfg_scale, seed, batch_size, window, relax)
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, (int, np.integer)) or micro_batches < 1:
            raise ValueError(f"micro batches must be an integer >= 1, got {micro_batches!r}")
        if micro_batches > 1 and sampler not in SPECULATIVE:
            raise ValueError(f"micro batches overlap drafting with verification; sampler {sampler!r} does not draft")
        decode = bool(decode) and self.decoder is not None
        decode_batch_size = check_decode_batch(self.defaults["decode_batch_size"] if decode_batch_size is None
                                               else decode_batch_size)
        if sampler == "ddim" and spacing.isdigit():
            spacing = f"ddim{spacing}"
        schedule = Schedule.create(spacing)
        target = GuidedModel(self.backend, schedule, cfg_scale)
        drafter_model = None
        if sampler in SPECULATIVE:
            if sampler == "frozen":
                drafter = FrozenDrafter()
            else:
                drafter_model = GuidedModel(self.backend, schedule, cfg_scale, engine="drafter")
                drafter = FeatureDrafter(drafter_model)
            impl = SpeculativeSampler(target, drafter, seed, window=window, relax=relax,
                                      window_schedule=window_schedule)
        else:
            impl = SequentialSampler(target, seed, ddim=sampler == "ddim")
        shape = (self.info.in_channels, self.info.input_size, self.info.input_size)
        n = schedule.num_steps
        x_T = noise.normal(seed, np.arange(len(labels)), n, noise.Purpose.INIT, shape)
        states = [SampleState(index=i, label=int(y), x=x_T[i], step=n - 1) for i, y in enumerate(labels)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(labels) * n, desc=f"{sampler} x{len(labels)}", unit="step", leave=False)
        start = time.perf_counter()
        timeline = None
        try:
            if micro_batches > 1:
                done, timeline = run_overlapped(states, batch_size, impl, int(micro_batches),
                                                on_progress=bar.update if bar else None)
            else:
                done = run_ragged(states, batch_size, impl.advance, on_progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        seconds = time.perf_counter() - start
        stats = [{"sample": s.index, "label": s.label, "steps": n, **s.stats} for s in done]
        settings = {"sampler": sampler, "steps": spacing, "num_steps": n, "cfg_scale": cfg_scale, "seed": seed,
                    "batch_size": batch_size, "backend": self.backend.name, "model": self.source}
        if sampler in SPECULATIVE:
            settings.update(window=window if window_schedule is None else "schedule", relax=relax,
                            micro_batches=int(micro_batches))
        calls = np.array([s["target_calls"] for s in stats])
        summary = {"images": len(labels), "seconds": seconds, "seconds_per_image": seconds / len(labels),
                   "mean_target_calls": float(calls.mean()), "batched_target_calls": target.calls,
                   "nfe_speedup": float(n / calls.mean()),
                   "drafter_calls": drafter_model.calls if drafter_model else 0,
                   "target_seconds": target.seconds, "drafter_seconds": drafter_model.seconds if drafter_model else 0.0}
        if sampler in SPECULATIVE:
            summary.update(speculative_summary(stats))
        device_bytes = self.backend.device_memory_bytes()
        if device_bytes is not None:
            summary["peak_device_mb"] = device_bytes / 2**20
        if timeline is not None:
            summary.update(draft_busy_s=timeline.busy("draft"), verify_busy_s=timeline.busy("verify"),
                           draft_verify_overlap_s=timeline.overlap())
        samples = np.stack([s.x for s in done])
        decoded = None
        if decode:  # latent DiTs: the vae_decoder, in micro-batches (runtime/decode.py)
            start = time.perf_counter()
            decoded = decode_latents(self.backend, samples, decode_batch_size, progress)
            summary.update(decode_seconds=time.perf_counter() - start, decode_batch_size=decode_batch_size)
        return GenerationResult(samples, labels, stats, settings, seconds, summary,
                                timeline.to_dict() if timeline is not None else None, decoded, self.latent)


def _make_backend(name: str, path: Path, defaults: dict, threads: int | None) -> Backend:
    """The backend ``name`` for the model directory ``path`` (see BACKENDS)."""
    if name.startswith("onnxruntime"):
        from freedit.runtime.backends.onnxruntime import OnnxRuntimeBackend

        files = {g: path / f"{g}.onnx" for g in ("dit", "drafter", DECODER) if (path / f"{g}.onnx").is_file()}
        return OnnxRuntimeBackend(files, threads=threads, device="cuda" if name.endswith("cuda") else "cpu")
    if name.startswith("torch"):
        from freedit.runtime.backends.pytorch import CHECKPOINTS, TorchBackend

        names = {**CHECKPOINTS, **defaults.get("checkpoints", {})}
        dit = path / names["dit"]
        if not dit.is_file():
            raise FileNotFoundError(f"the torch backend needs the DiT weights {dit} (pipeline.json 'checkpoints' "
                                    f"names them; `freedit export --torch-weights` writes them)")
        drafter = path / names["drafter"] if (path / names["drafter"]).is_file() else None
        vae = None
        if (path / f"{DECODER}.onnx").is_file():  # the torch backend decodes too, with the VAE's own weights
            vae = path / names[DECODER]
            if not (vae / "config.json").is_file():
                raise FileNotFoundError(f"the torch backend needs the VAE weights {vae} to decode this latent DiT "
                                        f"(`freedit export --torch-weights` writes them)")
        return TorchBackend.from_checkpoints(dit, drafter, vae, device="cuda" if "cuda" in name else "cpu",
                                             compile=name.endswith("compiled"), threads=threads,
                                             mode="reduce-overhead" if "cuda" in name else None)
    from freedit.runtime.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(path)


def check_drafter_matches(dit, drafter, source: str) -> None:
    """A drafter exported for another DiT (hidden size, patch grid, channels, classes) is refused up front."""
    fields = ("hidden_size", "num_tokens", "in_channels", "input_size", "num_classes", "learn_sigma")
    diff = [f"{f} {getattr(drafter, f)} vs {getattr(dit, f)}" for f in fields if getattr(drafter, f) != getattr(dit, f)]
    if diff:
        raise ContractError(f"{source}: drafter.onnx was exported for another DiT ({'; '.join(diff)} in the DiT); "
                            f"train and export a drafter for this model")


def speculative_summary(stats: list[dict]) -> dict:
    """Acceptance over all decided draft positions, and per original timestep."""
    decisions = [d for s in stats for d in s.get("decisions", [])]
    drafted = sum(sum(s["drafted"]) for s in stats)
    accepted = sum(sum(s["accepted"]) for s in stats)
    by_step: dict[int, list[int]] = {}
    for step, ok in decisions:
        by_step.setdefault(step, []).append(ok)
    return {"drafted": drafted, "accepted": accepted, "acceptance": accepted / len(decisions) if decisions else float("nan"),
            "decided": len(decisions),
            "acceptance_by_step": {int(k): float(np.mean(v)) for k, v in sorted(by_step.items())},
            "residual_proposals": sum(s["residual_proposals"] for s in stats),
            "residual_cap_hits": sum(s["residual_cap_hits"] for s in stats)}
