"""Export the `dit`, `drafter` and `vae_decoder` graphs to ONNX and check them against PyTorch.

Dynamo exporter at opset >= 18 (opset 17 with dynamo produced an invalid model), dynamic batch,
fp32/fp16/bf16 graphs with fp32 islands (export/precision.py), weights as external data when
the model exceeds protobuf's 2 GB. Every file is written into a temporary folder beside the
target and moved into place only after onnx.checker and the parity check pass, so a failed or
interrupted export (disk full included) leaves nothing half-written under the final name.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from freedit.errors import ExportError
from freedit.export.dit import DiT
from freedit.export.precision import PARITY_TOLERANCE, check_precision, with_precision
from freedit.runtime.contract import CONFIG_METADATA_KEY, CONTRACT_METADATA_KEY, PRECISION_METADATA_KEY, onnx_files

DEFAULT_OPSET = 18
# The exporter warns about every torchvision op it skips; we use none of them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


class _DiTGraph(torch.nn.Module):
    """The `dit` contract: (x, t, y) -> (eps_v, feat)."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit

    def forward(self, x, t, y):
        return self.dit(x, t, y)


class _DrafterGraph(torch.nn.Module):
    """The `drafter` contract: (feat, x, t, y[, t_feat]) -> (feat, eps_v); the frozen DiT parts are baked in.

    ``t_feat`` (the parent's timestep) is an input exactly when the drafter was trained with it."""

    def __init__(self, drafter):
        super().__init__()
        self.drafter, self.dit = drafter, drafter.dit  # registering the DiT exports its embedders and head

    def forward(self, feat, x, t, y, t_feat=None):
        return self.drafter(feat, x, t, y, t_feat)


@dataclass
class GraphSpec:
    """One exportable graph: its contract name, module, inputs, outputs and ONNX metadata."""

    contract: str
    module: torch.nn.Module
    sample_inputs: Callable[[int, int], dict[str, torch.Tensor]]  # (batch, seed) -> inputs in contract order
    output_names: tuple[str, ...]
    metadata: dict[str, str]


@dataclass
class ParityReport:
    max_abs_error: dict[str, float]  # max |ONNX - PyTorch fp32| / max(1, max |PyTorch|), per output
    tolerance: float
    precision: str = "fp32"
    runner: str = "onnxruntime"
    nonfinite: dict[str, int] = field(default_factory=dict)  # NaN/inf values in either output, per output

    @property
    def passed(self) -> bool:
        """Every error within tolerance and every value finite (a NaN error never passes)."""
        return not any(self.nonfinite.values()) and all(v <= self.tolerance for v in self.max_abs_error.values())

    def describe(self) -> str:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in self.max_abs_error.items())
        bad = ", ".join(f"{k} {n:,}" for k, n in self.nonfinite.items() if n)
        return (f"{self.runner} vs PyTorch max rel. error {errors} (tolerance {self.tolerance:g} for {self.precision})"
                + (f"; non-finite (NaN/inf) values: {bad}" if bad else ""))


def dit_inputs(dit: DiT, batch: int, seed: int, with_feat: bool = False,
               with_parent_time: bool = False) -> dict[str, torch.Tensor]:
    """Random inputs in contract order (the null label included); ``feat`` first for the drafter,
    ``t_feat`` (a parent timestep above ``t``) last for a drafter that takes it."""
    cfg = dit.config
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    if with_feat:
        inputs["feat"] = torch.randn(batch, cfg.num_patches, cfg.hidden_size, generator=g)
    inputs["x"] = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    inputs["t"] = torch.randint(0, 1000, (batch,), generator=g).float()
    inputs["y"] = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    if with_parent_time:
        inputs["t_feat"] = torch.minimum(inputs["t"] + torch.randint(1, 100, (batch,), generator=g), torch.tensor(999.0))
    return inputs


def dit_spec(dit: DiT) -> GraphSpec:
    meta = {CONFIG_METADATA_KEY: json.dumps(dit.config.to_dict()), CONTRACT_METADATA_KEY: "dit"}
    return GraphSpec("dit", _DiTGraph(dit.eval()), lambda b, s: dit_inputs(dit, b, s), ("eps_v", "feat"), meta)


def drafter_spec(drafter) -> GraphSpec:
    dit = drafter.dit
    meta = {CONFIG_METADATA_KEY: json.dumps(dit.config.to_dict()), CONTRACT_METADATA_KEY: "drafter",
            "freedit.drafter": json.dumps(asdict(drafter.config))}
    parent_time = drafter.config.parent_time
    return GraphSpec("drafter", _DrafterGraph(drafter.eval()),
                     lambda b, s: dit_inputs(dit, b, s, with_feat=True, with_parent_time=parent_time),
                     ("draft_feat", "eps_v"), meta)


def _runner(onnx_path: Path, precision: str):
    """ONNX Runtime (CPU) where it has kernels; ONNX's reference evaluator for bf16, which ORT's CPU
    provider cannot run (no bf16 Conv/MatMul/Add kernels in 1.32). Returns (name, run(outputs, feeds))."""
    if precision == "bf16":
        import onnx
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(onnx.load(str(onnx_path)))
        return "onnx.reference", evaluator.run
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return "onnxruntime", session.run


def check_graph_parity(spec: GraphSpec, onnx_path: str | Path, precision: str = "fp32", batches=(1, 3),
                       tolerance: float | None = None) -> ParityReport:
    """Max relative difference between the fp32 PyTorch module and the ONNX graph, over fresh inputs."""
    name, run = _runner(Path(onnx_path), precision)
    errors = dict.fromkeys(spec.output_names, 0.0)
    nonfinite = dict.fromkeys(spec.output_names, 0)
    for i, batch in enumerate(batches):
        inputs = spec.sample_inputs(batch, i)
        with torch.no_grad():
            ref = dict(zip(spec.output_names, spec.module(*inputs.values())))
        got = dict(zip(spec.output_names, run(list(spec.output_names), {k: v.numpy() for k, v in inputs.items()})))
        for out in errors:  # relative to the output's scale, so one tolerance fits every model size
            a, b = np.asarray(got[out], dtype=np.float64), ref[out].double().numpy()
            bad = int(np.count_nonzero(~np.isfinite(a)) + np.count_nonzero(~np.isfinite(b)))
            if bad:  # max() would drop a NaN error: count them, and the error is infinite
                nonfinite[out] += bad
                errors[out] = float("inf")
                continue
            scale = max(1.0, float(np.abs(b).max()))
            errors[out] = max(errors[out], float(np.abs(a - b).max()) / scale)
    tol = PARITY_TOLERANCE[precision] if tolerance is None else tolerance
    return ParityReport(errors, tol, precision, name, nonfinite)


def check_parity(dit: DiT, onnx_path: str | Path, batches=(1, 3), precision: str = "fp32",
                 tolerance: float | None = None) -> ParityReport:
    return check_graph_parity(dit_spec(dit), onnx_path, precision, batches, tolerance)


def check_drafter_parity(drafter, onnx_path: str | Path, batches=(1, 3), precision: str = "fp32",
                         tolerance: float | None = None) -> ParityReport:
    return check_graph_parity(drafter_spec(drafter), onnx_path, precision, batches, tolerance)


@contextmanager
def _stage(log: Callable[[str], None] | None, text: str):
    t0 = time.perf_counter()
    if log:
        log(f"{text} ...")
    yield
    if log:
        log(f"{text}: done in {time.perf_counter() - t0:.1f} s")


def estimated_bytes(module: torch.nn.Module, precision: str) -> int:
    """Size of the weights on disk, to refuse an export the disk cannot hold before starting it."""
    per = {"fp32": 4, "fp16": 2, "bf16": 2}[precision]
    return sum(p.numel() for p in module.parameters()) * per + sum(b.numel() * 4 for b in module.buffers())


def _move_into_place(staging: Path, out_path: Path) -> None:
    """External data first, the .onnx last: the .onnx appearing is the commit point."""
    stale = {p.name for p in onnx_files(out_path)[1:]} if out_path.exists() else set()
    staged = [f for f in staging.iterdir() if f.name != out_path.name]
    for f in staged:
        f.replace(out_path.parent / f.name)
    (staging / out_path.name).replace(out_path)
    for name in stale - {f.name for f in staged}:
        (out_path.parent / name).unlink(missing_ok=True)  # weights only the replaced export referred to


def export_graph(spec: GraphSpec, out_path: str | Path, opset: int = DEFAULT_OPSET, precision: str = "fp32",
                 check: bool = True, log: Callable[[str], None] | None = None,
                 external_data: bool | None = None) -> ParityReport | None:
    """Trace, save into a staging folder, check graph and parity, then move into place.

    ``external_data``: None writes the weights beside the graph only above protobuf's 2 GB limit.
    """
    import onnx

    check_precision(precision, opset)
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ExportError(f"output folder {out_path.parent} does not exist")
    graph = with_precision(spec.module, precision).eval()
    need = estimated_bytes(graph, precision)
    free = shutil.disk_usage(out_path.parent).free
    if free < need * 1.1 + 64 * 2**20:
        raise ExportError(f"not enough disk space in {out_path.parent} for {spec.contract} ({precision}): "
                          f"needs about {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")
    example = spec.sample_inputs(2, 0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.partial-", dir=out_path.parent))
    try:
        with _stage(log, f"{spec.contract}: tracing with the dynamo exporter (opset {opset}, {precision})"), \
                torch.no_grad():
            program = torch.onnx.export(
                graph, tuple(example.values()), dynamo=True, opset_version=opset,
                input_names=list(example), output_names=list(spec.output_names),
                dynamic_shapes={name: {0: batch} for name in example}, verbose=False,
            )
        with _stage(log, f"{spec.contract}: optimizing the graph"):
            program.optimize()
        for key, value in {**spec.metadata, PRECISION_METADATA_KEY: precision}.items():
            program.model.metadata_props[key] = value
        staged = staging / out_path.name
        with _stage(log, f"{spec.contract}: writing {need / 2**20:.0f} MiB of weights"):
            try:
                program.save(str(staged), external_data=external_data)
            except OSError as exc:
                raise ExportError(f"writing {out_path} failed ({exc.strerror or exc}); disk full? "
                                  f"nothing was left under {out_path.name}") from None
        del program
        with _stage(log, f"{spec.contract}: onnx.checker"):
            onnx.checker.check_model(str(staged))
        report = None
        if check:
            with _stage(log, f"{spec.contract}: parity against PyTorch"):
                report = check_graph_parity(spec, staged, precision)
            if not report.passed:
                raise ExportError(f"{spec.contract}: {report.describe()} -- not written")
        _move_into_place(staging, out_path)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_dit(dit: DiT, out_path: str | Path, opset: int = DEFAULT_OPSET, check: bool = True,
               precision: str = "fp32", log=None, external_data: bool | None = None) -> ParityReport | None:
    """Write ``out_path`` per the `dit` contract. Raises, leaving nothing behind, if parity fails."""
    return export_graph(dit_spec(dit), out_path, opset, precision, check, log, external_data)


def export_drafter(drafter, out_path: str | Path, opset: int = DEFAULT_OPSET, check: bool = True,
                   precision: str = "fp32", log=None, external_data: bool | None = None) -> ParityReport | None:
    """Write ``out_path`` per the `drafter` contract; metadata carries the target DiT's config."""
    return export_graph(drafter_spec(drafter), out_path, opset, precision, check, log, external_data)
