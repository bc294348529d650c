"""Precision lives in the graph: fp16/bf16 GEMM islands inside an fp32 DiT (DESIGN §4).

TensorRT >= 10 strongly typed networks and TensorRT-RTX take each tensor's type from the ONNX
graph; there is no "fp16 flag" to ask for. So the exported graph itself says where low precision
is used: patch embedding, attention (QKV, scaled dot product, projection), the MLP, the drafter's
fusion and the final linear. Everything that overflows or loses too much in fp16 in transformer
diffusion models stays fp32: LayerNorm, the adaLN modulation and gates, the residual sums and
the timestep sinusoid + MLP. Graph inputs and outputs stay fp32 in every precision, so the
runtime contract (runtime/contract.py) does not depend on how an engine was exported.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from freedit.export.dit import Attention, FinalLayer, Mlp, PatchEmbed

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# bf16 Conv (the patch embedding) exists in ONNX only from opset 22; fp16/fp32 need 18 (dynamo).
MIN_OPSET = {"fp32": 18, "fp16": 18, "bf16": 22}
# Max |ORT - PyTorch fp32| relative to the output's scale, per precision; measured on the digits
# DiT, DiT-S/2 and DiT-XL/2 shapes (docs/ENGINES.md) with margin.
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}


def check_precision(precision: str, opset: int) -> None:
    """Refuse unknown precisions and opset/precision pairs the exporter cannot express."""
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
    if opset < MIN_OPSET[precision]:
        why = ("bf16 Conv appears in ONNX at opset 22" if precision == "bf16"
               else f"opset {opset} is not supported: the dynamo exporter produces an invalid model below 18")
        raise ValueError(f"precision {precision} needs opset {MIN_OPSET[precision]} or later (got {opset}); {why}")


class LowPrecision(nn.Module):
    """Run ``inner`` in ``dtype``: cast its input down and its output back up to fp32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


def _is_island(name: str, module: nn.Module, parent: nn.Module) -> bool:
    if isinstance(module, (Attention, Mlp, PatchEmbed)):
        return True
    # The final layer's linear and the drafter's fusion are GEMMs on the fp32 residual stream.
    return isinstance(module, nn.Linear) and (isinstance(parent, FinalLayer) and name == "linear" or name == "fusion")


def with_precision(graph: nn.Module, precision: str) -> nn.Module:
    """A copy of ``graph`` (a DiT, a drafter, or a wrapper of either) with low-precision GEMM islands."""
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
    graph = copy.deepcopy(graph)
    if precision == "fp32":
        return graph
    dtype = DTYPES[precision]
    # Collect first, then replace, so the walk does not descend into the wrappers it creates.
    swaps = [(parent, name, child) for parent in graph.modules() for name, child in parent.named_children()
             if _is_island(name, child, parent)]
    for parent, name, child in swaps:
        setattr(parent, name, LowPrecision(child, dtype))
    return graph
