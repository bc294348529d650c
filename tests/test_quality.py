"""Tests for the digits quality evaluator (freedit.benchmarks.quality)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from freedit.benchmarks import quality as q


@pytest.fixture(scope="module")
def clf() -> q.DigitsClassifier:
    return q.DigitsClassifier.load()


@pytest.fixture(scope="module")
def test_split():
    pytest.importorskip("sklearn")
    from freedit.export.digits_data import load_digits_split

    return load_digits_split("test")


def _random_feats(seed: int, n: int = 400, f: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((f, f)) / np.sqrt(f)  # correlated, non-isotropic features
    return rng.standard_normal((n, f)) @ mix + rng.standard_normal(f)


# ---- Frechet distance ------------------------------------------------------------------------


def test_fd_self_is_zero():
    a = _random_feats(0)
    assert q.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fd_symmetric_and_grows_with_shift():
    a, b = _random_feats(1), _random_feats(2)
    assert q.frechet_distance(a, b) == pytest.approx(q.frechet_distance(b, a), rel=1e-8)
    fds = [q.frechet_distance(a, a + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert fds == sorted(fds) and fds[-1] > fds[1] > 0
    # A pure mean shift of s in every one of the 16 dimensions costs exactly 16 * s^2.
    assert fds[2] == pytest.approx(16 * 1.0**2, rel=1e-6)


def test_fd_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    for seed in range(3):
        a, b = _random_feats(10 + seed), _random_feats(20 + seed) * 1.3
        mu_a, mu_b = a.mean(0), b.mean(0)
        ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        covmean = linalg.sqrtm(ca @ cb).real
        ref = ((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean)
        assert q.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_fd_handles_singular_covariance():
    # Fewer samples than features and a dead (constant) feature, as ReLU features produce.
    rng = np.random.default_rng(3)
    a = np.maximum(rng.standard_normal((10, 32)), 0)
    a[:, 5] = 0
    fd = q.frechet_distance(a, a + 0.1)
    assert np.isfinite(fd) and fd == pytest.approx(32 * 0.01, rel=1e-4)


def test_fd_rejects_mismatched_features():
    with pytest.raises(ValueError):
        q.frechet_distance(_random_feats(0, f=8), _random_feats(1, f=9))
    with pytest.raises(ValueError):
        q.frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


# ---- classifier and evaluate -------------------------------------------------------------------


def test_packaged_asset_is_small_and_complete(clf):
    path = q.default_classifier_path()
    assert path.stat().st_size < 1_000_000
    assert clf.ref_mu is not None and clf.ref_sigma is not None
    assert clf.ref_sigma.shape == (clf.ref_mu.size,) * 2
    assert clf.test_accuracy is not None and clf.test_accuracy >= 0.95


def test_classifier_test_accuracy(clf, test_split):
    x, y = test_split
    assert np.mean(clf.predict(x) == y) >= 0.95
    # [N,16,16] input gives the same answer as [N,1,16,16].
    np.testing.assert_array_equal(clf.predict(x[:20, 0]), clf.predict(x[:20]))
    feats = clf.features(x[:5])
    assert feats.dtype == np.float64 and feats.shape == (5, clf.ref_mu.size)


def test_evaluate_real_vs_noise(clf, test_split):
    x, y = test_split
    real = q.evaluate(x, y, classifier=clf)
    assert real["n"] == len(y)
    assert real["class_accuracy"] >= 0.95
    noise = np.clip(np.random.default_rng(0).standard_normal(x.shape), -1, 1).astype(np.float32)
    fake = q.evaluate(noise, y, classifier=clf)
    assert real["fd_digits"] < 20
    assert fake["fd_digits"] > 10 * real["fd_digits"]
    assert fake["class_accuracy"] < 0.5
    # An explicit image reference and a (mu, sigma) reference agree with each other.
    by_images = q.evaluate(x[:100], y[:100], reference=x[100:], classifier=clf)
    by_stats = q.evaluate(
        x[:100], y[:100], reference=q.feature_stats(clf.features(x[100:])), classifier=clf
    )
    assert by_images["fd_digits"] == pytest.approx(by_stats["fd_digits"])


@pytest.mark.parametrize(
    "shape", [(4, 16, 16, 1), (4, 2, 16, 16), (4, 8, 8), (256,), (4, 256), (0, 1, 16, 16)]
)
def test_bad_shapes_raise(clf, shape):
    with pytest.raises(ValueError):
        clf.features(np.zeros(shape, np.float32))
    with pytest.raises(ValueError):
        q.evaluate(np.zeros(shape, np.float32), np.zeros(shape[0], np.int64), classifier=clf)


def test_label_count_mismatch_raises(clf):
    with pytest.raises(ValueError):
        q.evaluate(np.zeros((4, 1, 16, 16)), np.zeros(3, np.int64), classifier=clf)


def test_missing_file_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="freedit.benchmarks.quality"):
        q.DigitsClassifier.load(tmp_path / "nope.npz")


def test_runs_without_torch_or_sklearn():
    # Inference must be numpy only: poison the imports and evaluate with the packaged asset.
    code = textwrap.dedent(
        """
        import sys
        for name in ("torch", "sklearn", "scipy"):
            sys.modules[name] = None
        import numpy as np
        from freedit.benchmarks.quality import evaluate
        x = np.random.default_rng(0).uniform(-1, 1, (8, 1, 16, 16))
        r = evaluate(x, np.arange(8) % 10)
        assert r["n"] == 8 and np.isfinite(r["fd_digits"])
        print("ok")
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.slow
def test_main_retrains_and_writes(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "classifier.npz"
    assert q.main(["--out", str(out)]) == 0
    assert "test-split accuracy" in capsys.readouterr().out
    fresh = q.DigitsClassifier.load(out)
    assert fresh.test_accuracy >= 0.95
    assert [p.name for p in tmp_path.iterdir()] == ["classifier.npz"]  # no temp files left behind
