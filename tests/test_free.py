"""FREE through the Pipeline: statistics that add up, determinism, baselines, and refusals before sampling."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from freedit.runtime.contract import ContractError
from freedit.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def free_pipe(tiny_free_dir):
    return Pipeline.from_directory(tiny_free_dir, threads=1)


@pytest.mark.parametrize("sampler", ["free", "free-relax", "frozen"])
def test_statistics_add_up(free_pipe, sampler):
    result = free_pipe.generate([0, 1, 2, 3, 4, 0], sampler=sampler, steps=30, window=3, seed=5, batch_size=4)
    n = result.settings["num_steps"]
    for s in result.stats:
        rounds = s["target_calls"]
        assert len(s["drafted"]) == len(s["accepted"]) == rounds
        assert s["drafted"][0] == 0  # the first round is a plain DiT step (no parent features yet)
        assert all(0 <= a <= d <= 3 for a, d in zip(s["accepted"], s["drafted"]))
        assert sum(a + 1 for a in s["accepted"]) == n  # each round commits accepted + 1 transitions
        assert all(1 <= step < n for step, _ in s["decisions"])  # never the final (noiseless) transition
        assert s["residual_cap_hits"] == 0
    m = result.summary
    assert 0.0 <= m["acceptance"] <= 1.0 and m["nfe_speedup"] == pytest.approx(n / m["mean_target_calls"])
    assert m["batched_target_calls"] >= max(s["target_calls"] for s in result.stats)


def test_free_is_deterministic_and_batch_independent(free_pipe):
    a = free_pipe.generate([0, 1, 2, 3, 4], steps=20, window=4, seed=9, batch_size=5)
    b = free_pipe.generate([0, 1, 2, 3, 4], steps=20, window=4, seed=9, batch_size=2)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert [s["accepted"] for s in a.stats] == [s["accepted"] for s in b.stats]


def test_relax_zero_is_lossless_bit_for_bit(free_pipe):
    a = free_pipe.generate([0, 1, 2], sampler="free", steps=20, window=4, seed=3)
    b = free_pipe.generate([0, 1, 2], sampler="free-relax", relax=0.0, steps=20, window=4, seed=3)
    np.testing.assert_array_equal(a.samples, b.samples)
    c = free_pipe.generate([0, 1, 2], sampler="free-relax", relax=50.0, steps=20, window=4, seed=3)
    assert c.summary["acceptance"] >= a.summary["acceptance"]
    for score in ("gap", "variance"):  # lambda = 0 ignores the score: still lossless FREE bit for bit
        d = free_pipe.generate([0, 1, 2], sampler="free-relax", relax=0.0, relax_score=score, steps=20, window=4, seed=3)
        np.testing.assert_array_equal(a.samples, d.samples)
    gap = free_pipe.generate([0, 1, 2], sampler="free-relax", relax=50.0, relax_score="gap", steps=20, window=4, seed=3)
    var = free_pipe.generate([0, 1, 2], sampler="free-relax", relax=50.0, relax_score="variance", steps=20, window=4,
                             seed=3)
    assert gap.settings["relax_score"] == "gap" and var.settings["relax_score"] == "variance"
    assert not np.array_equal(gap.samples, var.samples)  # the score reaches the decisions


def test_block_verifier_reaches_the_round_and_is_batch_independent(free_pipe):
    step = free_pipe.generate([0, 1, 2, 3, 4], steps=20, window=4, seed=9, batch_size=5)
    a = free_pipe.generate([0, 1, 2, 3, 4], steps=20, window=4, seed=9, batch_size=5, verifier="block")
    b = free_pipe.generate([0, 1, 2, 3, 4], steps=20, window=4, seed=9, batch_size=2, verifier="block")
    np.testing.assert_array_equal(a.samples, b.samples)
    assert [s["accepted"] for s in a.stats] == [s["accepted"] for s in b.stats]
    assert a.settings["verifier"] == "block" and step.settings["verifier"] == "step"
    assert not np.array_equal(a.samples, step.samples)
    for s in a.stats:  # each round still commits accepted + 1 transitions
        assert sum(x + 1 for x in s["accepted"]) == 20 and s["residual_cap_hits"] == 0
    seq = free_pipe.generate([0, 1], sampler="sequential", steps=20, seed=9, verifier="block")  # no window: no effect
    np.testing.assert_array_equal(seq.samples, free_pipe.generate([0, 1], sampler="sequential", steps=20, seed=9).samples)


def test_a_block_default_gives_way_to_relax(tiny_free_dir):
    """A model whose default verifier is block (the bundled digits DiT) still samples free-relax,
    per step; asking for block and relax together is refused."""
    pipe = Pipeline.from_directory(tiny_free_dir, threads=1)
    pipe.defaults["verifier"] = "block"
    assert pipe.generate([0, 1], steps=12, window=3, seed=2).settings["verifier"] == "block"
    relaxed = pipe.generate([0, 1], sampler="free-relax", relax=2.0, steps=12, window=3, seed=2)
    assert relaxed.settings["verifier"] == "step"
    with pytest.raises(ValueError, match="exact-only"):
        pipe.generate([0, 1], sampler="free-relax", relax=2.0, steps=12, window=3, seed=2, verifier="block")


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=0), "window length L must be an integer >= 1"),
    (dict(verifier="tree"), "unknown verifier 'tree'"),
    (dict(sampler="free-relax", relax=1.0, verifier="block"), "block verification is exact-only"),
    (dict(window=2.5), "window length L must be an integer >= 1"),
    (dict(sampler="free-relax", relax=-0.1), "relax lambda must be >= 0"),
    (dict(sampler="free-relax", relax=1.0, relax_score="entropy"), "unknown relax score 'entropy'"),
    (dict(sampler="free-relax", relax=1.0, relax_score=1), "unknown relax score 1"),
])
def test_bad_free_arguments(free_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        free_pipe.generate([0], **kwargs)


def test_free_without_drafter_is_refused(tiny_model_dir):
    pipe = Pipeline.from_directory(tiny_model_dir)
    assert pipe.defaults["sampler"] == "sequential"
    with pytest.raises(ValueError, match="needs a drafter"):
        pipe.generate([0], sampler="free")
    assert pipe.generate([0, 1], sampler="frozen", steps=10).summary["nfe_speedup"] >= 1.0


def test_drafter_from_another_dit_is_refused(tmp_path, tiny_free_dir):
    torch = pytest.importorskip("torch")
    from conftest import TINY, _random_drafter
    from freedit.export.dit import DiT, DiTConfig
    from freedit.export.onnx_export import export_drafter

    shutil.copy(tiny_free_dir / "dit.onnx", tmp_path / "dit.onnx")
    torch.manual_seed(0)
    other = DiT(DiTConfig(**{**TINY, "hidden_size": 48, "patch_size": 2})).eval()
    export_drafter(_random_drafter(other, 2), tmp_path / "drafter.onnx")
    with pytest.raises(ContractError, match="drafter.onnx was exported for another DiT.*hidden_size 48 vs 32"):
        Pipeline.from_directory(tmp_path)
