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
    """The contract's signature: (x, t, y) -> (eps_v, feat), labels passed through unchanged."""

    def __init__(self, dit: DiT):
        super().__init__()
        self.dit = dit

    def forward(self, x, t, y):
        return self.dit(x, t, y)


@dataclass
class ParityReport:
    max_abs_error: dict[str, float]
    tolerance: float

    @property
    def passed(self) -> bool:
        return all(v <= self.tolerance for v in self.max_abs_error.values())


def _sample_inputs(dit: DiT, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = dit.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)  # the null label included
    return x, t, y


def check_parity(dit: DiT, onnx_path: str | Path, batches=(1, 3), tolerance: float = 1e-4) -> ParityReport:
    """Max abs difference between PyTorch and ONNX Runtime (CPU) outputs on random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    errors = {"eps_v": 0.0, "feat": 0.0}
    for i, batch in enumerate(batches):
        x, t, y = _sample_inputs(dit, batch, seed=i)
        with torch.no_grad():
            ref = dict(zip(("eps_v", "feat"), dit(x, t, y)))
        got = dict(zip(("eps_v", "feat"), session.run(["eps_v", "feat"], {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})))
        for name in errors:
            scale = max(1.0, float(ref[name].abs().max()))
            errors[name] = max(errors[name], float(np.abs(got[name] - ref[name].numpy()).max()) / scale)
    return ParityReport(errors, tolerance)


def export_dit(dit: DiT, out_path: str | Path, opset: int = DEFAULT_OPSET, check: bool = True) -> ParityReport | None:
    """Write ``out_path`` (.onnx). Raises RuntimeError, leaving nothing behind, if parity fails."""
    import onnx

    if opset < 18:
        raise ValueError(f"opset {opset} is not supported: the dynamo exporter needs opset 18 or later")
    out_path = Path(out_path)
    dit = dit.eval()
    tmp = out_path.with_name(out_path.name + ".tmp")
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = _sample_inputs(dit, 2, seed=0)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                _DiTGraph(dit), example, dynamo=True, opset_version=opset,
                input_names=["x", "t", "y"], output_names=["eps_v", "feat"],
                dynamic_shapes={"x": {0: batch}, "t": {0: batch}, "y": {0: batch}}, verbose=False,
            )
        program.optimize()
        model = program.model_proto
        meta = {CONFIG_METADATA_KEY: json.dumps(dit.config.to_dict()), CONTRACT_METADATA_KEY: "dit"}
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        report = check_parity(dit, tmp) if check else None
        if report is not None and not report.passed:
            raise RuntimeError(f"ONNX Runtime disagrees with PyTorch beyond {report.tolerance}: {report.max_abs_error}")
        tmp.replace(out_path)
        return report
    finally:
        tmp.unlink(missing_ok=True)
