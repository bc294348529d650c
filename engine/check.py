"""`freedit check`: compare an exported model with its source and its engines, using polygraphy.

Pairs compared, per graph, on the same fresh inputs:
  * ONNX Runtime (CPU) vs PyTorch (fp32) -- always; bf16 graphs run on ONNX's reference evaluator,
    because ONNX Runtime's CPU provider has no bf16 kernels;
  * TensorRT vs ONNX Runtime -- where a GPU and TensorRT (either kind) are present.
Per output: max/mean/p99 absolute error and the scale-relative max error that the verdict uses
(max |a - b| <= tolerance * max(1, max |reference|), tolerance per precision).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freedit.export.precision import PARITY_TOLERANCE


def _metadata(feed: dict):
    """polygraphy input metadata for a feed: dtypes as given, the batch dimension dynamic."""
    from polygraphy.common import TensorMetadata

    meta = TensorMetadata()
    for name, value in feed.items():
        meta.add(name, value.dtype, (-1, *value.shape[1:]))
    return meta


def _runner_classes():
    from polygraphy.backend.base import BaseRunner

    class TorchCpuRunner(BaseRunner):
        """polygraphy's PytRunner moves inputs to CUDA; this one stays on the CPU."""

        def __init__(self, module, example_feed, output_names, name="pytorch"):
            super().__init__(name=name)
            self.module, self.example, self.output_names = module, example_feed, output_names

        def activate_impl(self):
            pass

        def get_input_metadata_impl(self):
            return _metadata(self.example)

        def infer_impl(self, feed_dict):
            import time

            import torch

            with torch.no_grad():
                start = time.time()
                out = self.module(*[torch.from_numpy(feed_dict[n]) for n in self.example])
                self.inference_time = time.time() - start
            return OrderedDict((n, np.ascontiguousarray(o.numpy())) for n, o in zip(self.output_names, out))

        def deactivate_impl(self):
            pass

    class OnnxReferenceRunner(BaseRunner):
        """ONNX's reference evaluator: runs bf16 graphs ONNX Runtime's CPU provider cannot."""

        def __init__(self, path, example_feed, output_names, name="onnx-reference"):
            super().__init__(name=name)
            self.path, self.example, self.output_names = path, example_feed, output_names

        def activate_impl(self):
            import onnx
            from onnx.reference import ReferenceEvaluator

            self.evaluator = ReferenceEvaluator(onnx.load(str(self.path)))

        def get_input_metadata_impl(self):
            return _metadata(self.example)

        def infer_impl(self, feed_dict):
            import time

            start = time.time()
            out = self.evaluator.run(list(self.output_names), dict(feed_dict))
            self.inference_time = time.time() - start
            return OrderedDict((n, np.asarray(o, np.float32)) for n, o in zip(self.output_names, out))

        def deactivate_impl(self):
            del self.evaluator

    return TorchCpuRunner, OnnxReferenceRunner


@dataclass
class PairResult:
    graph: str
    reference: str
    candidate: str
    tolerance: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # output -> metric -> value
    skipped: str | None = None  # why this pair did not run

    @property
    def passed(self) -> bool | None:
        """Within tolerance and all finite: a NaN/inf in either output fails (NaN compares false anyway,
        but the count makes the reason explicit)."""
        if self.skipped:
            return None
        return all(m["nonfinite"] == 0 and m["max_rel_to_scale"] <= self.tolerance for m in self.metrics.values())

    def to_dict(self) -> dict:
        return {"graph": self.graph, "reference": self.reference, "candidate": self.candidate,
                "tolerance": self.tolerance, "passed": self.passed, "skipped": self.skipped, "metrics": self.metrics}


def compare(graph: str, reference, candidate, feeds: list[dict], tolerance: float) -> PairResult:
    """Run both polygraphy runners on ``feeds``; metrics per output; verdict by polygraphy's comparator."""
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # our summary replaces its per-iteration log
    results = Comparator.run([reference, candidate], data_loader=feeds)
    ref_iters, cand_iters = results[0][1], results[1][1]
    out = PairResult(graph, reference.name, candidate.name, tolerance)
    for name in ref_iters[0].keys():
        ref = np.concatenate([np.asarray(it[name], np.float64).ravel() for it in ref_iters])
        got = np.concatenate([np.asarray(it[name], np.float64).ravel() for it in cand_iters])
        finite = np.isfinite(ref) & np.isfinite(got)
        diff = np.abs(got - ref)
        # Errors over the finite pairs; every non-finite value is counted and fails the pair.
        d = diff[finite] if finite.any() else np.zeros(1)
        scale = max(1.0, float(np.abs(ref[np.isfinite(ref)]).max()) if np.isfinite(ref).any() else 1.0)
        out.metrics[name] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                             "p99_abs": float(np.quantile(d, 0.99)), "max_rel_to_scale": float(d.max()) / scale,
                             "scale": scale, "nonfinite": int(np.count_nonzero(~np.isfinite(ref))
                                                              + np.count_nonzero(~np.isfinite(got)))}
    if not out.passed and any(m["nonfinite"] for m in out.metrics.values()):
        return out  # failed on non-finite values; polygraphy's comparator need not agree on NaN semantics
    atol = {name: tolerance * m["scale"] for name, m in out.metrics.items()}
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=0.0))
    if bool(accuracy) != out.passed:  # the two readings of the same tolerance must agree
        raise RuntimeError(f"{graph}: polygraphy's verdict {bool(accuracy)} differs from the metrics' {out.passed}")
    return out


def feeds_for(spec, batches) -> list[dict]:
    return [{k: v.numpy() for k, v in spec.sample_inputs(b, i).items()} for i, b in enumerate(batches)]


def check_onnx(spec, onnx_path: Path, precision: str, batches=(1, 3)) -> PairResult:
    """ONNX (ONNX Runtime, or the reference evaluator for bf16) vs the fp32 PyTorch module."""
    TorchCpuRunner, _ = _runner_classes()
    feeds = feeds_for(spec, batches)
    torch_runner = TorchCpuRunner(spec.module, feeds[0], spec.output_names)
    return compare(spec.contract, torch_runner, onnx_runner(onnx_path, precision, feeds[0], spec.output_names), feeds,
                   PARITY_TOLERANCE[precision])


def onnx_runner(onnx_path: Path, precision: str, example_feed: dict, output_names):
    """ONNX Runtime (CPU), or ONNX's reference evaluator for bf16 graphs."""
    if precision == "bf16":
        return _runner_classes()[1](onnx_path, example_feed, output_names)
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["cpu"]), name="onnxruntime")


def tensorrt_unavailable(plan: Path | None) -> str | None:
    """Why TensorRT cannot be compared here, or None when it can."""
    from freedit.engine.builder import device_compute_capability
    from freedit.engine.tensorrt_api import load_tensorrt
    from freedit.errors import BuildError

    if device_compute_capability() is None:
        return "no CUDA GPU here (cuda-python missing, or cudaGetDeviceCount found none)"
    try:
        load_tensorrt()
    except BuildError as exc:
        return str(exc)
    if plan is None or not plan.is_file():
        return "no plan built (run `freedit build`)"
    return None


def check_tensorrt(spec, onnx_path: Path, plan: Path, precision: str, batches=(1, 3)) -> PairResult:
    """TensorRT plan vs ONNX Runtime (CPU), where ``tensorrt_unavailable`` says it can run."""
    import os

    from freedit.engine.tensorrt_api import load_tensorrt

    if load_tensorrt().is_rtx:
        os.environ.setdefault("POLYGRAPHY_USE_TENSORRT_RTX", "1")
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    feeds = feeds_for(spec, batches)
    trt_runner = TrtRunner(EngineFromBytes(plan.read_bytes()), name="tensorrt")
    return compare(spec.contract, onnx_runner(onnx_path, precision, feeds[0], spec.output_names), trt_runner,
                   feeds, PARITY_TOLERANCE[precision])
