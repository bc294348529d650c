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

from freedit.runtime.backends.base import Backend
from freedit.runtime.decode import DECODER, check_decode_batch, check_decoder_matches, decode_latents, is_latent
from freedit.runtime.budget import check_fits, sampling_bytes
from freedit.runtime.limits import (MAX_BATCH_SIZE, MAX_CFG_SCALE, MAX_IMAGES, MAX_PIPELINE_JSON_BYTES, MAX_RELAX,
                                    MAX_THREADS, MAX_WINDOW, check_int, check_number, is_int)
from freedit.runtime.images import make_grid, to_uint8
from freedit.runtime.contract import DRAFT_GUIDANCE, ContractError
from freedit.runtime.overlap import Timeline
from freedit.runtime.round import ENGINE_IO, RELAX_SCORES, VERIFIERS, RoundRunner, RoundSettings, RoundSpec, check_capacity
from freedit.runtime.schedule import NUM_TRAIN_TIMESTEPS, Schedule

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
    if isinstance(steps, bool) or steps is None or (isinstance(steps, str) and not steps.strip()) \
            or not isinstance(steps, (str, int, np.integer)):
        raise ValueError(f"steps must be a positive step count such as 250 or a spacing such as 'ddim50', got {steps!r}")
    if isinstance(steps, (int, np.integer)):
        if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {steps}")
        return str(int(steps))
    if not steps.isascii():
        raise ValueError(f"steps must be written with ASCII digits (e.g. 250 or 'ddim50'), got {steps!r}")
    Schedule.create(steps)  # raises a ValueError that says what is wrong with the spacing
    return str(steps)


def _check_checkpoints(value) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"must be an object of file names such as {{\"dit\": \"dit.safetensors\"}}, got {value!r}")
    unknown = sorted(set(value) - {"dit", "drafter", DECODER})
    if unknown:
        raise ValueError(f"unknown engine(s) {unknown}; expected 'dit', 'drafter' and '{DECODER}'")
    for name in value.values():  # plain names: a model folder must not point outside itself
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain file name inside the model folder")
    return value


def _check_sampler(value) -> str:
    if not isinstance(value, str) or value not in SAMPLERS:
        raise ValueError(f"must be one of {', '.join(SAMPLERS)}, got {value!r}")
    return value


def check_relax_score(value) -> str:
    if not isinstance(value, str) or value not in RELAX_SCORES:
        raise ValueError(f"unknown relax score {value!r}; choose one of {', '.join(RELAX_SCORES)}")
    return value


def check_verifier(value, relax: float = 0.0) -> str:
    """A verifier name; block verification is exact-only, so it is refused beside relax > 0."""
    if not isinstance(value, str) or value not in VERIFIERS:
        raise ValueError(f"unknown verifier {value!r}; choose one of {', '.join(VERIFIERS)}")
    if value == "block" and relax > 0:
        raise ValueError("block verification is exact-only: it does not combine with free-relax; use "
                         "verifier 'step' for relax")
    return value


def check_draft_guidance(value) -> str:
    if not isinstance(value, str) or value not in DRAFT_GUIDANCE:
        raise ValueError(f"unknown draft guidance {value!r}; choose one of {', '.join(DRAFT_GUIDANCE)}")
    return value


def draft_guidance_applies(sampler: str, cfg_scale: float) -> bool:
    """Only guided drafts of the learned drafter have a guidance rule to choose (frozen drafts copy the parent)."""
    return sampler in ("free", "free-relax") and float(cfg_scale) != 1.0


def resolve_verifier(requested, default: str, relax: float) -> str:
    """The verifier of a call: the one asked for (checked), else the model's default, except that
    relax (exact-only block verification does not combine with it) falls back to "step"."""
    if requested is not None:
        return check_verifier(requested, relax)
    return "step" if relax > 0 else check_verifier(default)


#: pipeline.json: key -> check of its value (the model's defaults; ``checkpoints`` names the weights
#: files of the torch backend inside the model folder).
DEFAULTS_SCHEMA = {
    "sampler": _check_sampler,
    "steps": _check_steps,
    "cfg_scale": lambda v: check_number("cfg scale", v, 0.0, MAX_CFG_SCALE),
    "batch_size": lambda v: check_int("batch size", v, 1, MAX_BATCH_SIZE),
    "window": lambda v: check_int("window length L", v, 1, MAX_WINDOW),
    "relax": lambda v: check_number("relax lambda", v, 0.0, MAX_RELAX),
    "relax_score": check_relax_score,
    "verifier": check_verifier,
    "draft_guidance": check_draft_guidance,
    "decode_batch_size": check_decode_batch,
    "checkpoints": _check_checkpoints,
}


def read_defaults(path: Path) -> dict:
    """A model folder's pipeline.json, checked key by key; ContractError naming the file and the key."""
    file = Path(path) / "pipeline.json"
    if not file.exists():
        return {}
    if not file.is_file():
        raise ContractError(f"{file} is not a regular file")
    size = file.stat().st_size
    if size > MAX_PIPELINE_JSON_BYTES:
        raise ContractError(f"{file} is {size:,} bytes; a pipeline.json holds a few defaults (at most "
                            f"{MAX_PIPELINE_JSON_BYTES:,} bytes)")
    try:
        data = json.loads(file.read_bytes())
    except RecursionError:
        raise ContractError(f"{file} is nested too deeply to be a pipeline.json") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ContractError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ContractError(f"{file} must hold a JSON object of defaults, got {type(data).__name__}")
    unknown = sorted(set(data) - set(DEFAULTS_SCHEMA))
    if unknown:
        raise ContractError(f"{file}: unknown key(s) {unknown}; known: {', '.join(DEFAULTS_SCHEMA)}")
    for key, check in DEFAULTS_SCHEMA.items():
        if key in data:
            try:
                check(data[key])
            except ValueError as exc:
                raise ContractError(f"{file}: {key!r}: {exc}") from None
    return data


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
                         "batch_size": 64, "window": 6, "relax": 0.5, "relax_score": "gap", "verifier": "step",
                         "draft_guidance": "parent", "decode_batch_size": 4, **(defaults or {})}
        self.source = source
        self._context = None  # the round's maths and workspaces, allocated on first use

    @classmethod
    def from_directory(cls, path: str | Path, backend: str = "onnxruntime", threads: int | None = None,
                       precision: str | None = None, device_id: int = 0) -> "Pipeline":
        """The model folder ``path`` on ``backend``. ``precision`` chooses the torch backends' compute
        precision (fp32, tf32, bf16); ONNX Runtime and TensorRT run the precision in the graph.
        ``device_id``: the GPU of the GPU backends."""
        path = Path(path)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
        if threads is not None:
            check_int("threads", threads, 1, MAX_THREADS)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        dit = path / "dit.onnx"
        if not dit.is_file():
            raise FileNotFoundError(f"{path} has no dit.onnx; export one with `freedit export` (or reinstall freedit "
                                    f"for the bundled model)")
        defaults = read_defaults(path)
        if precision is not None and not backend.startswith("torch"):
            raise ValueError(f"--precision chooses the torch backends' precision; {backend} runs the precision the "
                             f"graph was exported with (freedit export --precision)")
        pipe = cls(_make_backend(backend, path, defaults, threads, precision or "fp32", device_id), defaults,
                   source=str(path))
        probe_engines(pipe.backend, str(path))
        return pipe

    @classmethod
    def default(cls, backend: str = "onnxruntime", threads: int | None = None) -> "Pipeline":
        """The bundled digits DiT, run with ONNX Runtime on the CPU."""
        return cls.from_directory(default_model_dir(), backend=backend, threads=threads)

    def resolve(self, sampler: str | None = None, steps=None, cfg_scale: float | None = None,
                batch_size: int | None = None, window: int | None = None, relax: float | None = None) -> dict:
        """Settings with the model's defaults in place of None (relax is 0 unless the sampler is free-relax)."""
        d = self.defaults
        sampler = d["sampler"] if sampler is None else sampler
        return dict(sampler=sampler, steps=d["steps"] if steps is None else steps,
                    cfg_scale=d["cfg_scale"] if cfg_scale is None else cfg_scale,
                    batch_size=d["batch_size"] if batch_size is None else batch_size,
                    window=d["window"] if window is None else window,
                    relax=(d["relax"] if relax is None else relax) if sampler == "free-relax" else 0.0)

    def validate(self, class_labels: Sequence[int], sampler: str, steps, cfg_scale: float, seed: int,
                 batch_size: int, window: int = 6, relax: float = 0.0, extra_bytes: int = 0) -> tuple[np.ndarray, str]:
        """Check every argument before any sampling starts; raise ValueError saying what to change.

        The estimated memory of the call (plus ``extra_bytes`` the caller will need, such as written
        images) must fit what this machine has (runtime/budget.py)."""
        labels = list(class_labels)
        if len(labels) > MAX_IMAGES:
            raise ValueError(f"at most {MAX_IMAGES:,} class labels (images) per call, got {len(labels):,}")
        if not all(is_int(v) for v in labels):
            raise ValueError(f"class labels must be integers, got {[v for v in labels if not is_int(v)][:5]}")
        labels = np.asarray(labels)
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
        window = check_int("window length L", window, 1, MAX_WINDOW)
        relax = check_number("relax lambda", relax, 0.0, MAX_RELAX)
        cfg_scale = check_number("cfg scale", cfg_scale, 0.0, MAX_CFG_SCALE, " (1 = no guidance)")
        if not is_int(seed) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if not is_int(batch_size) or not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch size must be a positive integer <= {MAX_BATCH_SIZE:,}, got {batch_size!r}")
        spacing = _check_steps(steps)
        if sampler == "ddim" and not spacing.startswith("ddim") and not spacing.isdigit():
            raise ValueError("the ddim sampler takes a step count (e.g. 50) or 'ddimN'")
        num_steps = Schedule.create(f"ddim{spacing}" if sampler == "ddim" and spacing.isdigit() else spacing).num_steps
        on_gpu = "cuda" in self.backend.name or "tensorrt" in self.backend.name
        check_fits(sampling_bytes(self.info, len(labels), num_steps, int(batch_size),
                                  window if sampler in SPECULATIVE else 0, cfg_scale != 1.0, not on_gpu) + extra_bytes,
                   f"sampling {len(labels):,} images at batch size {batch_size}")
        return labels.astype(np.int64), spacing

    def generate(self, class_labels: Sequence[int], sampler: str | None = None, steps=None,
                 cfg_scale: float | None = None, seed: int = 0, batch_size: int | None = None, window: int | None = None,
                 relax: float | None = None, progress: bool = False, micro_batches: int = 1,
                 window_schedule=None, maths: str = "auto", graphs: bool | None = None, decode: bool = True,
                 decode_batch_size: int | None = None, relax_score: str | None = None,
                 verifier: str | None = None, draft_guidance: str | None = None) -> GenerationResult:
        """Sample one image per class label. Same seed, same backend => same images, whatever the batch size.

        ``sampler``: "free" (lossless, the default when a drafter is present), "free-relax" (tempered
        accept test, ``relax`` = lambda, ``relax_score`` = what u measures: "gap"
        or "variance", DESIGN §3.4), "frozen" (training-free drafter), "sequential" (DDPM), "ddim".
        ``verifier``: how a window is verified, "step" (up to the first rejection) or "block" (the
        whole window jointly: as exact, commits at least as much; DESIGN §3.3.1); default: the
        model's for lossless samplers, "step" for free-relax. ``window`` is FREE's draft length L.
        ``draft_guidance`` (guided FREE): "parent" drafts the conditional row only and takes the
        guidance gap (cond - null output) of the last verified state; "drafter" drafts both rows
        (DESIGN §3.1); default: the model's. Either is exact.
        ``micro_batches`` > 1 (speculative samplers) keeps that many batches of ``batch_size`` in
        flight, one drafting while another verifies.
        ``window_schedule``: L per respaced step (e.g. runtime/adaptive.py's choice) instead of one L.
        ``maths``: where the round's maths runs: "numpy" (host), "device" (the CUDA kernels; on a
        machine without a GPU, their host emulation), "auto" (device for GPU backends, else numpy).
        ``graphs``: replay repeated round shapes from CUDA graphs (device maths; default on).
        Latent DiTs with a ``vae_decoder`` decode the final latents (``decode=False`` skips it),
        ``decode_batch_size`` latents per decoder call; ``.latents`` keeps them either way.
        """
        settings = self.resolve(sampler, steps, cfg_scale, batch_size, window, relax)
        sampler, steps, cfg_scale, batch_size, window, relax = settings.values()
        labels, spacing = self.validate(class_labels, seed=seed, **settings)
        cfg_scale, relax = float(cfg_scale), float(relax)  # checked real numbers (bools and strings refused)
        relax_score = check_relax_score(self.defaults["relax_score"] if relax_score is None else relax_score)
        verifier = resolve_verifier(verifier, self.defaults["verifier"], relax)
        draft_guidance = check_draft_guidance(self.defaults["draft_guidance"] if draft_guidance is None
                                              else draft_guidance)
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, (int, np.integer)) or micro_batches < 1:
            raise ValueError(f"micro batches must be an integer >= 1, got {micro_batches!r}")
        if micro_batches > 1 and sampler not in SPECULATIVE:
            raise ValueError(f"micro batches overlap drafting with verification; sampler {sampler!r} does not draft")
        if maths not in MATHS:
            raise ValueError(f"unknown maths {maths!r}; choose one of {', '.join(MATHS)}")
        decode = bool(decode) and self.decoder is not None
        decode_batch_size = check_decode_batch(self.defaults["decode_batch_size"] if decode_batch_size is None
                                               else decode_batch_size)
        if sampler == "ddim" and spacing.isdigit():
            spacing = f"ddim{spacing}"
        schedule = Schedule.create(spacing)
        speculative = sampler in SPECULATIVE
        if window_schedule is not None:
            window_schedule = _check_window_schedule(window_schedule, schedule.num_steps)
        window = int(window) if speculative else 0
        longest = int(window_schedule.max(initial=0)) if window_schedule is not None else window
        micro_batches = int(min(micro_batches, len(labels)))
        slots = int(min(batch_size, -(-len(labels) // micro_batches)))
        drafter = ("frozen" if sampler == "frozen" else "free") if speculative else None
        spec = RoundSpec(self.info, slots=slots, max_window=longest if speculative else 0, guided=cfg_scale != 1.0,
                         drafter=drafter, t_feat=drafter == "free" and "t_feat" in self.backend.inputs("drafter"),
                         parent_guidance=draft_guidance_applies(sampler, cfg_scale) and draft_guidance == "parent",
                         fixed_variance=self.info.fixed_variance)
        settings = RoundSettings(schedule, int(seed), cfg_scale, window if window_schedule is None else 0,
                                 window_schedule, relax, ddim=sampler == "ddim", relax_score=relax_score,
                                 verifier=verifier if speculative else "step")
        kind = self._maths_kind(maths)
        check_capacity({e: self.backend.max_rows(e) for e in spec.engine_rows()}, spec, self.source or self.backend.name)
        context = self._round_context(kind, spec, micro_batches)
        if context.device is not None:
            context.device.make_current()  # the current CUDA device is per host thread
        round_maths = context.maths
        for ws in context.workspaces:
            round_maths.configure(ws, settings)
        overlap = micro_batches > 1
        lanes = context.lanes or round_maths.lanes(overlap, timing=False)
        timeline = None
        if overlap:
            timeline = Timeline(reference=lanes[0].mark() if kind == "device" else None)
        n = schedule.num_steps
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(labels) * n, desc=f"{sampler} x{len(labels)}", unit="step", leave=False)
        counted = context.counted
        for c in counted.values():
            c.reset()
        start = time.perf_counter()
        try:
            runner = RoundRunner(round_maths, context.workspaces[:micro_batches], settings, lanes,
                                 capture=kind == "device" and (True if graphs is None else bool(graphs)),
                                 on_progress=bar.update if bar else None, timeline=timeline)
            samples, stats = runner.run(labels)
        finally:
            if bar:
                bar.close()
            if context.lanes is None:
                for lane in lanes:
                    lane.close()
        seconds = time.perf_counter() - start
        for st in stats:
            st["steps"] = n
        settings_out = {"sampler": sampler, "steps": spacing, "num_steps": n, "cfg_scale": cfg_scale, "seed": seed,
                        "batch_size": batch_size, "backend": self.backend.name, "model": self.source, "maths": kind,
                        "precision": getattr(self.backend, "precision", None) or "fp32"}
        if speculative:
            settings_out.update(window=window if window_schedule is None else "schedule", relax=relax,
                                **({"relax_score": relax_score} if relax > 0 else {}), verifier=verifier,
                                **({"draft_guidance": draft_guidance} if draft_guidance_applies(sampler, cfg_scale) else {}),
                                micro_batches=int(micro_batches))
        calls = np.array([s["target_calls"] for s in stats])
        summary = {"images": len(labels), "seconds": seconds, "seconds_per_image": seconds / len(labels),
                   "mean_target_calls": float(calls.mean()), "batched_target_calls": counted["dit"].calls,
                   "nfe_speedup": float(n / calls.mean()),
                   "drafter_calls": counted["drafter"].calls if "drafter" in counted else 0,
                   "target_seconds": counted["dit"].seconds,
                   "drafter_seconds": counted["drafter"].seconds if "drafter" in counted else 0.0}
        if speculative:
            summary.update(speculative_summary(stats))
        device_bytes = self.backend.device_memory_bytes()
        if device_bytes is not None:
            summary["peak_device_mb"] = device_bytes / 2**20
        if timeline is not None:
            summary.update(draft_busy_s=timeline.busy("draft"), verify_busy_s=timeline.busy("verify"),
                           draft_verify_overlap_s=timeline.overlap())
        decoded = None
        if decode:  # latent DiTs: the vae_decoder, in micro-batches (runtime/decode.py)
            start = time.perf_counter()
            decoded = decode_latents(self.backend, samples, decode_batch_size, progress)
            summary.update(decode_seconds=time.perf_counter() - start, decode_batch_size=decode_batch_size)
        return GenerationResult(samples, labels, stats, settings_out, seconds, summary,
                                timeline.to_dict() if timeline is not None else None, decoded, self.latent)

    # -- the round's maths and workspaces, allocated once and reused --------------------------------
    def _maths_kind(self, maths: str) -> str:
        if maths == "auto":
            return "device" if self.backend.memory == "cuda" else "numpy"
        if maths == "numpy" and self.backend.memory == "cuda":
            raise ValueError(f"backend {self.backend.name} computes on the GPU; its round maths is 'device'")
        return maths

    def _round_context(self, kind: str, spec: RoundSpec, micro_batches: int) -> "_RoundContext":
        """Workspaces for ``spec`` (at least ``micro_batches``), reused while the spec is the same."""
        ctx = self._context
        if ctx is not None and ctx.kind == kind and ctx.spec == spec and len(ctx.workspaces) >= micro_batches:
            return ctx
        if ctx is not None:
            ctx.close()
            self._context = None
        self._context = _RoundContext.create(self.backend, kind, spec, micro_batches)
        return self._context

    def close(self) -> None:
        """Free the round's workspaces (device memory included)."""
        if self._context is not None:
            self._context.close()
            self._context = None


MATHS = ("auto", "numpy", "device")


@dataclass
class _RoundContext:
    kind: str
    spec: RoundSpec
    maths: object
    workspaces: list
    lanes: tuple | None  # device lanes live as long as the workspaces (engines are bound to their streams)
    counted: dict
    device: object = None

    @classmethod
    def create(cls, backend: Backend, kind: str, spec: RoundSpec, count: int) -> "_RoundContext":
        device = None
        if kind == "device":
            from freedit.runtime.device import Device
            from freedit.runtime.round_device import DeviceRoundMaths

            device = Device(load_kernels_for(backend), getattr(backend, "device_id", 0) or 0)
            maths = DeviceRoundMaths(device)
            lanes = maths.lanes(overlap=True, timing=True)
        else:
            from freedit.runtime.round_numpy import NumpyRoundMaths

            maths, lanes = NumpyRoundMaths(), None
        try:
            workspaces = [maths.workspace(spec) for _ in range(count)]
            counters = {engine: _CallCounter() for engine in spec.engine_rows()}
            for ws in workspaces:
                for engine in spec.engine_rows():
                    ins, outs = ENGINE_IO[engine]
                    have = backend.inputs(engine)
                    bound = backend.bind(engine, {n: ws[b] for n, b in ins.items() if n in have},
                                         {n: ws[b] for n, b in outs.items()},
                                         (lanes[0] if engine == "drafter" else lanes[1]) if lanes else None)
                    ws.engines[engine] = _CountedBound(bound, counters[engine])
        except BaseException:
            if device is not None:
                device.close()
            raise
        return cls(kind, spec, maths, workspaces, lanes, counters, device)

    def close(self) -> None:
        if self.device is not None:
            self.device.close()


class _CallCounter:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0


class _CountedBound:
    """A bound engine counting its calls and the host seconds they take (on a device lane: the
    time to enqueue; the lanes' busy times come from the timeline)."""

    def __init__(self, bound, counter: _CallCounter):
        self.bound, self.counter = bound, counter

    def run(self, rows: int) -> None:
        t0 = time.perf_counter()
        self.bound.run(rows)
        self.counter.seconds += time.perf_counter() - t0
        self.counter.calls += 1


def load_kernels_for(backend: Backend):
    """The kernels library for the device round: the GPU build for GPU backends, else its host
    emulation (device memory = host memory), which runs the same kernels on the CPU."""
    from freedit.runtime import kernels

    return kernels.load() if backend.memory == "cuda" else kernels.load(emulated=True)


def _check_window_schedule(window_schedule, num_steps: int) -> np.ndarray:
    ws = np.asarray(window_schedule)
    if ws.ndim != 1 or len(ws) != num_steps or ws.dtype.kind not in "iu" or (len(ws) and ws.min() < 0):
        raise ValueError(f"a window schedule needs one integer L >= 0 per step ({num_steps})")
    return ws.astype(np.int64)


def _make_backend(name: str, path: Path, defaults: dict, threads: int | None, precision: str = "fp32",
                  device_id: int = 0) -> Backend:
    """The backend ``name`` for the model directory ``path`` (see BACKENDS)."""
    if name.startswith("onnxruntime"):
        from freedit.runtime.backends.onnxruntime import OnnxRuntimeBackend

        files = {g: path / f"{g}.onnx" for g in ("dit", "drafter", DECODER) if (path / f"{g}.onnx").is_file()}
        return OnnxRuntimeBackend(files, threads=threads, device="cuda" if name.endswith("cuda") else "cpu",
                                  device_id=device_id)
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
        return TorchBackend.from_checkpoints(dit, drafter, vae, device=f"cuda:{device_id}" if "cuda" in name else "cpu",
                                             compile=name.endswith("compiled"), threads=threads,
                                             mode="reduce-overhead" if "cuda" in name else None, precision=precision)
    from freedit.runtime.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(path, device_id=device_id)


def probe_engines(backend: Backend, source: str) -> None:
    """One call per engine with a single row at the null label: a graph whose metadata does not fit it
    (a num_classes beyond its label table, fixed shapes) fails here in one line instead of mid-sampling."""
    info = backend.info("dit")
    x = np.zeros((1, info.in_channels, info.input_size, info.input_size), np.float32)
    feeds = {"x": x, "t": np.full(1, NUM_TRAIN_TIMESTEPS - 1, np.float32), "y": np.full(1, info.null_label, np.int64)}
    want = {"eps_v": (1, info.out_channels, info.input_size, info.input_size),
            "feat": (1, info.num_tokens, info.hidden_size)}
    for engine in ("dit", "drafter"):
        if engine not in backend.engines():
            continue
        if engine == "drafter":
            feeds = {**feeds, "feat": np.zeros(want["feat"], np.float32)}
            if "t_feat" in backend.inputs("drafter"):
                feeds["t_feat"] = feeds["t"]
            want = {"draft_feat": want["feat"], "eps_v": want["eps_v"]}
        try:
            out = backend.run(engine, feeds)
        except Exception as exc:  # the backend's own error types (onnxruntime Fail, TensorRT, torch)
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ContractError(f"{source}: a test call of {engine} with the null label {info.null_label} failed "
                                f"({detail}); its metadata (num_classes {info.num_classes}, input "
                                f"{info.in_channels}x{info.input_size}x{info.input_size}) does not fit the graph - "
                                f"re-export it with `freedit export`") from None
        bad = [f"{k} {tuple(np.shape(out.get(k)))} instead of {v}" for k, v in want.items()
               if tuple(np.shape(out.get(k))) != v]
        if bad:
            raise ContractError(f"{source}: {engine} returned {', '.join(bad)} for one row; its metadata does not "
                                f"fit the graph - re-export it with `freedit export`")


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
