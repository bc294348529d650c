"""`freedit bench`: every sampler side by side, interleaved in one process, on chosen models and backends.

For each model x backend x batch size x step count x CFG scale, the sampler configurations
(sequential, frozen-target, FREE per L, FREE relax per L and lambda, adaptive window) run in turn,
repeat after repeat, so drift hits all of them equally. A warm-up run per pipeline is excluded.
Per configuration: wall-clock per image (median, p90), serial target calls, NFE speed-up, the
wall-clock speed-up against sequential of the same group (ratio of the reported medians),
drafter vs verifier time, acceptance (overall and by timestep), peak memory, and quality where
a reference exists (digits: FD-digits and class accuracy; ImageNet models: FID/IS against a
user-supplied reference batch). Everything is validated before the first run.
"""
from __future__ import annotations

import datetime as dt
import itertools
import os
import platform
import subprocess
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from freedit.benchmarks import applied_rules
from freedit.runtime.contract import DRAFT_GUIDANCE, VERIFIERS
from freedit.runtime.pipeline import BACKENDS, Pipeline, default_model_dir

SAMPLERS = ("sequential", "frozen", "free", "free-relax", "adaptive")


class BenchError(ValueError):
    """A benchmark request that cannot run; raised before any run starts."""


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["bundled"])  # "bundled", a model dir, "random:DiT-S/2:256"
    backends: list[str] = field(default_factory=lambda: ["onnxruntime"])
    samplers: list[str] = field(default_factory=lambda: list(SAMPLERS))
    windows: list[int] = field(default_factory=lambda: [8])
    relax: list[float] = field(default_factory=lambda: [0.5, 2.0, 8.0])
    batch_sizes: list[int] = field(default_factory=lambda: [64])
    steps: list[int] = field(default_factory=lambda: [250])
    cfg_scales: list[float | None] = field(default_factory=lambda: [None])  # None: the model's default
    n: int = 256  # images per configuration and repeat
    repeats: int = 1
    seed: int = 0
    threads: int | None = None
    quality: bool = True
    reference: str | None = None  # .npz of uint8 images [N, H, W, 3] for FID/IS (ImageNet models)
    adaptive_max_window: int = 8
    pilot_n: int = 32  # images of the pilot FREE run that gives the adaptive policy its acceptance profile
    cost_repeats: int = 5
    draft_guidance: str | None = None  # guided FREE's (pilot included): "parent" or "drafter"; None: the model's
    verifier: str | None = None  # lossless FREE's and frozen's (pilot included); None: the model's (relax: step)

    def validate(self) -> None:
        if not self.models:
            raise BenchError("no model given")
        for model in self.models:
            if model == "bundled" or model.startswith("random:"):
                if model.startswith("random:"):
                    _parse_random(model)
                continue
            if not (Path(model) / "dit.onnx").is_file() and not (Path(model) / "pipeline.json").is_file():
                raise BenchError(f"unknown model {model!r}: not 'bundled', 'random:CONFIG:SIZE' or a model "
                                 f"directory with dit.onnx")
        bad = [b for b in self.backends if b not in BACKENDS]
        if not self.backends or bad:
            raise BenchError(f"unknown backend(s) {bad or '(none given)'}; available: {', '.join(BACKENDS)}")
        bad = [s for s in self.samplers if s not in SAMPLERS]
        if not self.samplers or bad:
            raise BenchError(f"unknown sampler(s) {bad or '(none given)'}; choose from {', '.join(SAMPLERS)}")
        if any(not isinstance(w, int) or w < 1 for w in self.windows) or not self.windows:
            raise BenchError(f"window lengths L must be integers >= 1, got {self.windows}")
        if "free-relax" in self.samplers:
            if not self.relax:
                raise BenchError("free-relax needs at least one lambda (--relax), got an empty list")
            if any(not np.isfinite(x) or x < 0 for x in self.relax):
                raise BenchError(f"relax lambdas must be >= 0, got {self.relax}")
        for name in ("batch_sizes", "steps"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise BenchError(f"{name.replace('_', ' ')} must be integers >= 1, got {values}")
        if any(c is not None and (not np.isfinite(c) or c < 0) for c in self.cfg_scales) or not self.cfg_scales:
            raise BenchError(f"cfg scales must be >= 0, got {self.cfg_scales}")
        for name in ("n", "repeats", "pilot_n", "cost_repeats", "adaptive_max_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BenchError(f"{name.replace('_', ' ')} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.draft_guidance is not None and self.draft_guidance not in DRAFT_GUIDANCE:
            raise BenchError(f"unknown draft guidance {self.draft_guidance!r}; choose from {', '.join(DRAFT_GUIDANCE)}")
        if self.verifier is not None and self.verifier not in VERIFIERS:
            raise BenchError(f"unknown verifier {self.verifier!r}; choose from {', '.join(VERIFIERS)}")
        if self.reference is not None:
            load_reference(self.reference)  # shape and type checked now, not after an hour of sampling


def load_reference(path: str) -> np.ndarray:
    """A reference batch for FID/IS: uint8 images [N, H, W, 3] in an .npz (first array, or 'images')."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"reference batch {p} does not exist")
    try:
        with np.load(p) as data:
            arr = data["images"] if "images" in data.files else data[data.files[0]]
    except Exception as exc:
        raise BenchError(f"{p} is not a readable .npz reference batch ({exc})") from None
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or len(arr) < 2:
        raise BenchError(f"reference batch {p} must be uint8 images [N, H, W, 3] with N >= 2; got "
                         f"{arr.dtype} {list(arr.shape)}")
    return arr


def _parse_random(spec: str) -> tuple[str, int]:
    from freedit.export.dit import OFFICIAL_CONFIGS

    parts = spec.split(":")
    if len(parts) != 3 or parts[1] not in OFFICIAL_CONFIGS or not parts[2].isdigit() or int(parts[2]) % 8:
        raise BenchError(f"random model spec {spec!r} must be random:CONFIG:SIZE with CONFIG one of "
                         f"{', '.join(OFFICIAL_CONFIGS)} and SIZE a multiple of 8, e.g. random:DiT-S/2:256")
    return parts[1], int(parts[2])


def open_pipeline(model: str, backend: str, threads: int | None, cache: Path) -> Pipeline:
    """A Pipeline for a model spec. Random configs are exported once (with an untrained drafter,
    whose features start as "the parent's", so FREE runs) into ``cache``."""
    if model == "bundled":
        return Pipeline.from_directory(default_model_dir(), backend=backend, threads=threads)
    if not model.startswith("random:"):
        return Pipeline.from_directory(model, backend=backend, threads=threads)
    name, size = _parse_random(model)
    folder = cache / f"{name.replace('/', '-')}-{size}"
    if not (folder / "drafter.onnx").is_file():
        import json

        from freedit.export.checkpoint import random_dit, save_dit
        from freedit.export.drafter import Drafter, save_drafter
        from freedit.export.dit import official_config
        from freedit.export.onnx_export import export_dit, export_drafter

        folder.mkdir(parents=True, exist_ok=True)
        dit = random_dit(official_config(name, size))
        drafter = Drafter(dit).eval()
        export_dit(dit, folder / "dit.onnx")
        export_drafter(drafter, folder / "drafter.onnx")
        save_dit(dit, folder / "dit.safetensors")
        save_drafter(drafter, folder / "drafter.safetensors")
        (folder / "pipeline.json").write_text(json.dumps({"steps": 250, "cfg_scale": 4.0, "window": 4}))
    return Pipeline.from_directory(folder, backend=backend, threads=threads)


class PeakRSS:
    """Peak resident memory of this process while a run is in progress (polls /proc)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        self.peak = self.now()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def sampler_configs(cfg: BenchConfig) -> list[dict]:
    """The sampler variants of one group, in the order they run."""
    out = []
    for s in cfg.samplers:
        if s == "sequential":
            out.append({"sampler": "sequential"})
        elif s in ("frozen", "free"):
            out += [{"sampler": s, "window": w} for w in cfg.windows]
        elif s == "free-relax":
            out += [{"sampler": s, "window": w, "relax": lam} for w in cfg.windows for lam in cfg.relax]
        else:
            out.append({"sampler": "adaptive", "max_window": cfg.adaptive_max_window})
    return out


def label(c: dict) -> str:
    if c["sampler"] == "adaptive":
        return f"adaptive (L<={c['max_window']})"
    return c["sampler"] + (f" L={c['window']}" if "window" in c else "") + (f" λ={c['relax']:g}" if "relax" in c else "")


def _quality(pipe: Pipeline, result, reference: np.ndarray | None) -> dict:
    info = pipe.info
    if (info.in_channels, info.input_size, info.num_classes) == (1, 16, 10):
        from freedit.benchmarks.quality import evaluate

        m = evaluate(result.samples, result.labels)
        return {"class_accuracy": m["class_accuracy"], "fd_digits": m["fd_digits"]}
    if reference is not None:
        from freedit.benchmarks.fid import fid_is

        return fid_is(result.images, reference)  # latent DiTs: decoded by the Pipeline (runtime/decode.py)
    return {}


def _versions() -> dict:
    import sys

    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("onnxruntime", "torch", "tensorrt", "tensorrt_rtx"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    return out


def _device() -> dict:
    from freedit.engine.builder import device_compute_capability

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = None
    cc = device_compute_capability()
    if cc is not None:
        from cuda.bindings import runtime as rt

        err, props = rt.cudaGetDeviceProperties(0)
        err2, driver = rt.cudaDriverGetVersion()
        gpu = {"name": props.name.decode(errors="replace").strip("\x00"), "compute_capability": cc,
               "driver_api": int(driver) if not int(err2) else None}
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "gpu": gpu}


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_bench(cfg: BenchConfig, command: str = "", cache: Path | None = None, progress: bool = True,
              log=print) -> dict:
    """Run the whole matrix; returns the report (see docs/BENCH.md for the schema)."""
    from freedit.runtime.adaptive import acceptance_profile, choose_windows, fixed_window_rate, measure_cost_curve
    from freedit.runtime.schedule import Schedule

    cfg.validate()
    reference = load_reference(cfg.reference) if cfg.reference else None
    cache = cache or Path.home() / ".cache" / "freedit" / "bench"
    report = {"command": command, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "git_revision": _git_revision(), "device": _device(), "config": asdict(cfg), "groups": []}
    variants = sampler_configs(cfg)
    bar = None
    for model, backend in itertools.product(cfg.models, cfg.backends):
        pipe = open_pipeline(model, backend, cfg.threads, cache)
        if not pipe.has_drafter and any(v["sampler"] in ("free", "free-relax", "adaptive") for v in variants):
            raise BenchError(f"model {model} has no drafter.onnx; FREE needs one (or bench sequential,frozen)")
        labels_all = np.arange(cfg.n) % pipe.info.num_classes
        pipe.generate(labels_all[:2], steps=10, batch_size=2, sampler="sequential")  # warm-up, excluded
        for batch, steps, scale in itertools.product(cfg.batch_sizes, cfg.steps, cfg.cfg_scales):
            cfg_scale = float(pipe.defaults["cfg_scale"] if scale is None else scale)
            group = {"model": model, "backend": pipe.backend.name, "batch_size": batch, "steps": steps,
                     "cfg_scale": cfg_scale, "configs": []}
            common = dict(steps=steps, cfg_scale=cfg_scale, batch_size=batch, draft_guidance=cfg.draft_guidance)
            schedule = None
            if any(v["sampler"] == "adaptive" for v in variants):
                log(f"[{model} {backend} B={batch}] adaptive: pilot FREE run and cost curve ...")
                pilot = pipe.generate(labels_all[:cfg.pilot_n], sampler="free", window=cfg.adaptive_max_window,
                                      seed=cfg.seed + 10_000,  # other seeds than the measured runs
                                      verifier=cfg.verifier, **common)
                acc = acceptance_profile(pilot.summary["acceptance_by_step"], Schedule.create(str(steps)).num_steps)
                cost = measure_cost_curve(pipe.backend, pipe.info, batch, cfg.adaptive_max_window + 1, cfg_scale != 1.0,
                                          repeats=cfg.cost_repeats,  # guided drafts of the conditional row only: 1 drafter row
                                          draft_rows_per_state=1 if pilot.settings.get("draft_guidance") == "parent"
                                          else None)
                schedule, rates = choose_windows(acc, cost, cfg.adaptive_max_window)
                group["adaptive"] = {
                    "draft_guidance": pilot.settings.get("draft_guidance"),  # the pilot's rule: the runs' too
                    "cost_curve": cost.to_dict(), "acceptance_profile": acc.tolist(), "windows": schedule.tolist(),
                    "expected_steps_per_second": float(rates.mean()),
                    "expected_steps_per_second_fixed": {str(w): fixed_window_rate(acc, cost, w)
                                                        for w in range(0, cfg.adaptive_max_window + 1)},
                }
            runs = {label(v): [] for v in variants}
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=cfg.repeats * len(variants), desc=f"{model} {backend} B={batch}", unit="run")
            for rep in range(cfg.repeats):
                for v in variants:
                    kw = dict(common, sampler=v["sampler"], seed=cfg.seed)
                    if v["sampler"] == "adaptive":
                        kw.update(sampler="free", window_schedule=schedule)
                    else:
                        kw.update({k: v[k] for k in ("window", "relax") if k in v})
                    if v["sampler"] != "free-relax":  # relax verifies per step (block is exact-only)
                        kw["verifier"] = cfg.verifier
                    with PeakRSS() as mem:
                        result = pipe.generate(labels_all, **kw)
                    m = result.summary
                    run = {"repeat": rep, "seconds": m["seconds"], "seconds_per_image": m["seconds_per_image"],
                           "serial_target_calls": m["mean_target_calls"], "nfe_speedup": m["nfe_speedup"],
                           "target_seconds": m["target_seconds"], "drafter_seconds": m["drafter_seconds"],
                           "peak_rss_mb": mem.peak / 2**20}
                    if "acceptance" in m:
                        run.update(acceptance=m["acceptance"], accepted=m["accepted"], decided=m["decided"])
                    run.update(applied_rules(result))  # the rules applied (speculative samplers)
                    if rep == 0:
                        run["acceptance_by_step"] = m.get("acceptance_by_step", {})
                        if cfg.quality:
                            run.update(_quality(pipe, result, reference))
                    runs[label(v)].append(run)
                    log(f"repeat {rep} {label(v)}: {run['seconds_per_image']:.4f} s/image, "
                        f"{run['serial_target_calls']:.1f} serial target calls, acceptance {run.get('acceptance', '-')}, "
                        f"peak RSS {run['peak_rss_mb']:.0f} MB" + "".join(f", {k} {run[k]:.4g}" for k in
                                                                        ("class_accuracy", "fd_digits") if k in run))
                    if bar:
                        bar.update(1)
            if bar:
                bar.close()
            group["configs"] = _aggregate(variants, runs)
            report["groups"].append(group)
    report["versions"] = _versions()
    return report


def _aggregate(variants: list[dict], runs: dict[str, list[dict]]) -> list[dict]:
    """Medians and p90 over repeats; wall-clock speed-up = sequential's median / this median."""
    rows = []
    for v in variants:
        rs = runs[label(v)]
        per_image = np.array([r["seconds_per_image"] for r in rs])
        first = rs[0]
        row = {"label": label(v), **v, "repeats": len(rs),
               "seconds_per_image_median": float(np.median(per_image)),
               "seconds_per_image_p90": float(np.quantile(per_image, 0.9)),
               "serial_target_calls": first["serial_target_calls"], "nfe_speedup": first["nfe_speedup"],
               "target_seconds_median": float(np.median([r["target_seconds"] for r in rs])),
               "drafter_seconds_median": float(np.median([r["drafter_seconds"] for r in rs])),
               "peak_rss_mb": float(max(r["peak_rss_mb"] for r in rs)), "runs": rs}
        for key in ("acceptance", "accepted", "decided", "draft_guidance", "verifier", "class_accuracy", "fd_digits",
                    "fid", "inception_score"):
            if key in first:
                row[key] = first[key]
        row["acceptance_by_step"] = first.get("acceptance_by_step", {})
        rows.append(row)
    seq = next((r for r in rows if r["sampler"] == "sequential"), None)
    for r in rows:
        r["wallclock_speedup"] = (seq["seconds_per_image_median"] / r["seconds_per_image_median"]) if seq else None
    return rows
