"""docs/ENGINES.md's walkthrough (diffusers folder -> TensorRT plans -> images), run as written on a
small random diffusers folder: every `freedit` line of the marked block, through the real CLI."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("torch")
pytest.importorskip("tensorrt_rtx", reason="the test extra installs tensorrt-rtx-cu13")

from diffusers_models import random_diffusers_dit, random_vae, save_pipeline_folder  # noqa: E402

from freedit.cli import main  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "ENGINES.md"


def walkthrough_commands() -> list[list[str]]:
    block = re.search(r"<!-- walkthrough:start -->(.*?)<!-- walkthrough:end -->", DOC.read_text(), re.S)
    assert block, "docs/ENGINES.md lost its walkthrough markers"
    return [shlex.split(line) for line in block[1].splitlines() if line.startswith("freedit ")]


def test_engines_walkthrough_runs_as_written(tmp_path, monkeypatch):
    from freedit.engine.builder import device_compute_capability

    commands = walkthrough_commands()
    assert [c[1] for c in commands] == ["export", "build", "generate", "generate"]
    save_pipeline_folder(tmp_path / "DiT-XL-2-256", random_diffusers_dit("tiny", image_size=64), random_vae(8))
    monkeypatch.chdir(tmp_path)
    gpu = device_compute_capability() is not None
    for argv in commands:
        if "tensorrt" in argv and not gpu:
            continue  # a TensorRT plan runs only on a GPU; the ONNX Runtime line below makes the same images here
        assert main(argv[1:] + (["--no-progress"] if argv[1] in ("build", "generate") else [])) == 0, argv
    assert {p.name for p in (tmp_path / "xl256" / "engines").glob("*.plan")} == {"dit.plan", "vae_decoder.plan"}
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.shape == (3 * 65 + 1, 4 * 65 + 1, 3)  # 3 classes x 4 per class, 64 px RGB tiles
    assert np.load(tmp_path / "latents.npy").shape == (12, 4, 8, 8)
