"""Export a DiT to ONNX per the ``dit`` contract and check it against PyTorch with ONNX Runtime.

Dynamo exporter at opset 18 (opset 17 with dynamo produced an invalid model), dynamic batch,
fp32. Written to a temporary name and renamed only after the parity check passes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from freedit.export.dit import DiT
from freedit.runtime.contract import CONFIG_METADATA_KEY, CONTRACT_METADATA_KEY

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
    """The `drafter` contract: (feat, x, t, y) -> (feat, eps_v); the frozen DiT parts are baked in."""

    def __init__(self, drafter):
        super().__init__()
        self.drafter, self.dit = drafter, drafter.dit  # registering the DiT exports its embedders and head

    def forward(self, feat, x, t, y):
        return self.drafter(feat, x, t, y)


@dataclass
class ParityReport:
    max_abs_error: dict[str, float]
    tolerance: float

    @property
    def passed(self) -> bool:
        return all(v <= self.tolerance for v in self.max_abs_error.values())


def _sample_inputs(dit: DiT, batch: int, seed: int, with_feat: bool = False) -> dict[str, torch.Tensor]:
    """Random inputs in contract order (the null label included); ``feat`` first for the drafter."""
    cfg = dit.config
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    if with_feat:
        inputs["feat"] = torch.randn(batch, cfg.num_patches, cfg.hidden_size, generator=g)
    inputs["x"] = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    inputs["t"] = torch.randint(0, 1000, (batch,), generator=g).float()
    inputs["y"] = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    return inputs


def _parity(module: torch.nn.Module, onnx_path, output_names, dit: DiT, with_feat: bool, batches, tolerance) -> ParityReport:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    errors = dict.fromkeys(output_names, 0.0)
    for i, batch in enumerate(batches):
        inputs = _sample_inputs(dit, batch, seed=i, with_feat=with_feat)
        with torch.no_grad():
            ref = dict(zip(output_names, module(*inputs.values())))
        got = dict(zip(output_names, session.run(list(output_names), {k: v.numpy() for k, v in inputs.items()})))
        for name in errors:  # relative to the output's scale, so one tolerance fits every model size
            scale = max(1.0, float(ref[name].abs().max()))
            errors[name] = max(errors[name], float(np.abs(got[name] - ref[name].numpy()).max()) / scale)
    return ParityReport(errors, tolerance)


def check_parity(dit: DiT, onnx_path: str | Path, batches=(1, 3), tolerance: float = 1e-4) -> ParityReport:
    """Max relative difference between PyTorch and ONNX Runtime (CPU) outputs of a `dit` graph."""
    return _parity(_DiTGraph(dit.eval()), onnx_path, ("eps_v", "feat"), dit, False, batches, tolerance)


def check_drafter_parity(drafter, onnx_path: str | Path, batches=(1, 3), tolerance: float = 1e-4) -> ParityReport:
    return _parity(_DrafterGraph(drafter.eval()), onnx_path, ("draft_feat", "eps_v"), drafter.dit, True, batches, tolerance)


def _export(module, example: dict, output_names, metadata: dict, out_path, opset: int, parity) -> ParityReport | None:
    """Trace, save to a temporary name, check the graph and its parity, then rename into place."""
    import onnx

    if opset < 18:
        raise ValueError(f"opset {opset} is not supported: the dynamo exporter needs opset 18 or later")
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module.eval(), tuple(example.values()), dynamo=True, opset_version=opset,
                input_names=list(example), output_names=list(output_names),
                dynamic_shapes={name: {0: batch} for name in example}, verbose=False,
            )
        program.optimize()
        model = program.model_proto
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        report = parity(tmp) if parity else None
        if report is not None and not report.passed:
            raise RuntimeError(f"ONNX Runtime disagrees with PyTorch beyond {report.tolerance}: {report.max_abs_error}")
        tmp.replace(out_path)
        return report
    finally:
        tmp.unlink(missing_ok=True)


def export_dit(dit: DiT, out_path: str | Path, opset: int = DEFAULT_OPSET, check: bool = True) -> ParityReport | None:
    """Write ``out_path`` per the `dit` contract. Raises, leaving nothing behind, if parity fails."""
    meta = {CONFIG_METADATA_KEY: json.dumps(dit.config.to_dict()), CONTRACT_METADATA_KEY: "dit"}
    return _export(_DiTGraph(dit), _sample_inputs(dit, 2, 0), ("eps_v", "feat"), meta, out_path, opset,
                   (lambda path: check_parity(dit, path)) if check else None)


def export_drafter(drafter, out_path: str | Path, opset: int = DEFAULT_OPSET, check: bool = True) -> ParityReport | None:
    """Write ``out_path`` per the `drafter` contract; metadata carries the target DiT's config."""
    from dataclasses import asdict

    dit = drafter.dit
    meta = {CONFIG_METADATA_KEY: json.dumps(dit.config.to_dict()), CONTRACT_METADATA_KEY: "drafter",
            "freedit.drafter": json.dumps(asdict(drafter.config))}
    return _export(_DrafterGraph(drafter), _sample_inputs(dit, 2, 0, with_feat=True), ("draft_feat", "eps_v"), meta,
                   out_path, opset, (lambda path: check_drafter_parity(drafter, path)) if check else None)
