"""Shared fixtures: a tiny random DiT exported once per session, and the bundled model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from freedit.runtime.pipeline import default_model_dir

TINY = dict(input_size=8, patch_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
            learn_sigma=True, cfg_mode="reference")


@pytest.fixture(scope="session")
def tiny_dit():
    torch = pytest.importorskip("torch")
    from freedit.export.dit import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(**TINY)).eval()
    with torch.no_grad():  # DiT's zero init would make every output 0; give it real random weights
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        model.pos_embed.copy_(DiT(DiTConfig(**TINY)).pos_embed)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_dit):
    from freedit.export.onnx_export import export_dit

    folder = tmp_path_factory.mktemp("tiny_model")
    report = export_dit(tiny_dit, folder / "dit.onnx")
    assert report.passed
    (folder / "pipeline.json").write_text(json.dumps({"steps": 20, "cfg_scale": 2.0, "batch_size": 4}))
    return folder


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    folder = default_model_dir()
    if not (folder / "dit.onnx").is_file():
        pytest.fail(f"the bundled model is missing from {folder}")
    return folder


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _random_drafter(dit, seed: int):
    import torch

    from freedit.export.drafter import Drafter

    torch.manual_seed(seed)
    drafter = Drafter(dit).eval()
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return drafter


@pytest.fixture(scope="session")
def tiny_free_dir(tmp_path_factory, tiny_dit, tiny_model_dir):
    """The tiny DiT plus a (poor, random) drafter: FREE runs, with plenty of rejections."""
    import shutil

    from freedit.export.onnx_export import export_drafter

    folder = tmp_path_factory.mktemp("tiny_free")
    shutil.copy(tiny_model_dir / "dit.onnx", folder / "dit.onnx")
    shutil.copy(tiny_model_dir / "pipeline.json", folder / "pipeline.json")
    assert export_drafter(_random_drafter(tiny_dit, 1), folder / "drafter.onnx").passed
    return folder


@pytest.fixture(scope="session")
def emulated_build(tmp_path_factory):
    """The host emulation of the kernels library (runtime/csrc/emulation), built once per session
    from the current sources with the host compiler (no nvcc, no GPU)."""
    import shutil

    from freedit.runtime import kernels

    missing = [tool for tool in ("cmake", "c++") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"cannot build the kernels' host emulation: {' and '.join(missing)} not on PATH")
    return kernels.build_emulated(tmp_path_factory.mktemp("kernels_emu"))


@pytest.fixture(scope="session")
def emulated_kernels(emulated_build):
    from freedit.runtime import kernels

    return kernels.load(emulated_build.library, emulated=True)
