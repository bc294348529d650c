"""ONNX -> TensorRT plan, with the manifest that makes it safe to reuse (DESIGN §4).

Same code for ``tensorrt`` and ``tensorrt_rtx``: strongly typed networks (precision from the
graph), optimization profiles from engine/profiles.py, compute capability targets where the
builder takes them (TensorRT-RTX; full TensorRT builds for the GPU it runs on), a timing cache
where the builder uses one (TensorRT-RTX's timing cache calls are no-ops, so none is kept).
Plan and manifest are written to temporary names and renamed, the plan first.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from freedit.engine.manifest import FORMAT, Manifest, manifest_path, sha256_files
from freedit.engine.profiles import BuildSettings, profiles_for
from freedit.engine.tensorrt_api import TensorRT
from freedit.errors import BuildError
from freedit.runtime.contract import DECODER_METADATA_KEY, load_graph, onnx_files

#: TensorRT-RTX 1.x targets; it has no SM 9.0 (Hopper) target.
RTX_DEFAULT_TARGETS = ("80", "86", "89", "120")


def rtx_targets(trt: TensorRT, targets: tuple[str, ...]) -> list:
    known = {name[2:]: value for name, value in trt.module.ComputeCapability.__members__.items() if name.startswith("SM")}
    bad = [t for t in targets if t not in known]
    if bad:
        raise BuildError(f"{trt.describe()} cannot target compute capability {', '.join(bad)}; it knows "
                         f"{', '.join(sorted(known, key=int))}" + (" (no SM 9.0 / Hopper target)" if "90" in bad else ""))
    return [known[t] for t in targets]


@dataclass
class BuiltPlan:
    plan_path: Path
    manifest: Manifest
    seconds: float


def onnx_facts(onnx_path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Each input's shape after the batch dimension, and the freedit metadata of the graph."""
    model = load_graph(onnx_path)
    shapes = {}
    for inp in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if any(d is None for d in dims[1:]):
            raise BuildError(f"{onnx_path}: input {inp.name} has a dynamic dimension other than the batch: {dims}")
        shapes[inp.name] = tuple(dims[1:])
    return shapes, {p.key: p.value for p in model.metadata_props}


class _Progress:
    """Adapts TensorRT's IProgressMonitor to tqdm bars, one per top-level phase."""

    def __init__(self, trt: TensorRT, enabled: bool):
        base = trt.module.IProgressMonitor
        outer = self

        class Monitor(base):
            def __init__(self):
                base.__init__(self)
                self.bars = {}

            def phase_start(self, phase, parent, steps):
                if enabled and parent is None:
                    from tqdm import tqdm

                    self.bars[phase] = tqdm(total=steps, desc=phase, unit="step", leave=False)

            def step_complete(self, phase, step):
                if phase in self.bars:
                    self.bars[phase].n = step + 1
                    self.bars[phase].refresh()
                return not outer.cancelled

            def phase_finish(self, phase):
                bar = self.bars.pop(phase, None)
                if bar is not None:
                    bar.close()

        self.cancelled = False
        self.monitor = Monitor()


def build_plan(trt: TensorRT, onnx_path: Path, plan_path: Path, settings: BuildSettings,
               log: Callable[[str], None] | None = None, progress: bool = True,
               onnx_sha: str | None = None) -> BuiltPlan:
    """Build ``plan_path`` (+ manifest) from ``onnx_path``. Raises BuildError leaving neither behind."""
    t = trt.module
    shapes, meta = onnx_facts(onnx_path)
    graph = meta.get("freedit.contract")
    if graph is None:
        raise BuildError(f"{onnx_path} has no freedit.contract metadata; export it with `freedit export`")
    profiles = profiles_for(graph, settings, shapes)
    logger = t.Logger(t.Logger.ERROR)
    builder = t.Builder(logger)
    flags = 1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = t.OnnxParser(network, logger)
    if log:
        log(f"{graph}: parsing {onnx_path.name} with {trt.describe()}")
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{trt.describe()} cannot parse {onnx_path}: {errors}")
    _mark_attention_decomposable(t, network)
    config = builder.create_builder_config()
    targets = settings.targets or (RTX_DEFAULT_TARGETS if trt.is_rtx else ())
    if trt.is_rtx:
        values = rtx_targets(trt, targets)
        config.num_compute_capabilities = len(values)
        for i, value in enumerate(values):
            config.set_compute_capability(value, i)
    elif targets:
        raise BuildError(f"{trt.describe()} builds for the GPU it runs on; --targets needs TensorRT-RTX")
    cache = None
    if not trt.is_rtx:  # TensorRT-RTX: timing cache operations are no-ops (it picks kernels at run time)
        cache_path = plan_path.with_name("timing.cache")
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    monitor = _Progress(trt, progress)
    config.progress_monitor = monitor.monitor
    if log:
        log(f"{graph}: building for {', '.join('SM' + x for x in targets) or 'this GPU'}, profiles "
            + ", ".join(f"{p.name} rows {p.rows[0]}..{p.rows[2]}" for p in profiles))
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise BuildError(f"{trt.describe()} failed to build {onnx_path} (see the TensorRT errors above); "
                         f"nothing was written")
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    replaced = False
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(plan))
        del plan
        onnx_sha = onnx_sha or sha256_files(onnx_files(onnx_path))
        manifest = Manifest({
            "format": FORMAT, "graph": graph,
            "onnx": {"file": onnx_path.name, "sha256": onnx_sha, "precision": meta.get("freedit.precision", "fp32"),
                     "config": meta.get("freedit.config"),
                     **({"decoder": meta[DECODER_METADATA_KEY]} if DECODER_METADATA_KEY in meta else {})},
            "plan": {"file": plan_path.name, "bytes": tmp.stat().st_size, "sha256": sha256_files([tmp])},
            "builder": {"kind": trt.kind, "module": trt.module.__name__, "version": trt.version},
            "targets": list(targets) if trt.is_rtx else [device_compute_capability() or "unknown"],
            "settings": settings.to_dict(), "profiles": [p.to_dict() for p in profiles],
            "build_seconds": round(seconds, 2), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        os.replace(tmp, plan_path)
        replaced = True
        manifest.write(plan_path)
    except OSError as exc:
        if replaced:  # the new plan is in place but its manifest is not: neither may be used
            plan_path.unlink(missing_ok=True)
            manifest_path(plan_path).unlink(missing_ok=True)
            kept = "the new plan was removed"
        else:
            kept = "an earlier plan and its manifest, if any, are untouched"
        raise BuildError(f"writing {plan_path} failed ({exc.strerror or exc}); disk full? {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)
    if cache is not None:
        cache_path = plan_path.with_name("timing.cache")
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return BuiltPlan(plan_path, manifest, seconds)


def _mark_attention_decomposable(t, network) -> int:
    """Opset 23's Attention op becomes an IAttention; without a dedicated kernel for its shape and
    type (fp32 on TensorRT-RTX) the build fails unless it may be decomposed into plain layers."""
    boundary = getattr(t, "IAttentionBoundaryLayer", None)
    if boundary is None:
        return 0
    kinds = {t.LayerType.ATTENTION_INPUT, t.LayerType.ATTENTION_OUTPUT}
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in kinds:
            layer.__class__ = boundary  # TensorRT's Python way to downcast an ILayer
            layer.attention.decomposable = True
            marked += 1
    return marked


def device_compute_capability(device_id: int = 0) -> str | None:
    """GPU ``device_id``'s compute capability as "89", or None without that GPU (cudaGetDeviceCount
    returns an error code on a machine without a driver)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        return None
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or not 0 <= device_id < count:
        return None
    err, props = rt.cudaGetDeviceProperties(device_id)
    return f"{props.major}{props.minor}" if err == rt.cudaError_t.cudaSuccess else None
