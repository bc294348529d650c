"""The bundled digits DiT: recognisable digits of the requested classes under its documented settings."""
from __future__ import annotations

import json

import numpy as np

from freedit.benchmarks.quality import evaluate
from freedit.runtime.pipeline import Pipeline


def test_bundled_defaults_are_documented(bundled_dir):
    defaults = json.loads((bundled_dir / "pipeline.json").read_text())
    card = (bundled_dir / "MODEL_CARD.md").read_text()
    assert defaults["steps"] == 250
    assert f"CFG scale {defaults['cfg_scale']:g}" in card


def test_sequential_ddpm_250_hits_the_requested_classes(bundled_dir):
    """Issue acceptance: >= 90% of 256 samples (DDPM 250 steps, documented CFG) classified as requested."""
    pipe = Pipeline.default()
    labels = np.arange(256) % 10
    result = pipe.generate(labels, seed=2026, batch_size=128)
    assert result.settings["num_steps"] == 250
    metrics = evaluate(result.samples, labels)
    assert metrics["class_accuracy"] >= 0.90, metrics
    assert metrics["fd_digits"] < 60.0, metrics  # the card reports the measured value; this catches a broken model
