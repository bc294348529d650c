"""The two-sample tests behind the lossless claim (benchmarks/two_sample.py): calibrated under the
null, and able to see a small within-class shift that pooled statistics miss."""
from __future__ import annotations

import numpy as np
import pytest

from freedit.benchmarks.two_sample import classifier_test, energy_test, label_chi2_test, mmd_test

CLASSES = 10


def _sample(seed: int, n: int = 400, shift: float = 0.0, d: int = 8):
    """Class-conditional Gaussians far apart (class means dominate the features), optionally with
    every class nudged by ``shift`` along the first axis."""
    rng = np.random.default_rng(seed)
    classes = np.arange(n) % CLASSES
    means = np.random.default_rng(123).normal(scale=6.0, size=(CLASSES, d))
    z = means[classes] + rng.normal(size=(n, d))
    z[:, 0] += shift
    return z, classes


@pytest.mark.parametrize("test", [energy_test, classifier_test])
def test_null_p_values_are_not_small(test):
    """Same law, independent draws: over 10 pairs at alpha 0.05, a calibrated test rejects about
    0.5 times; more than 3 would mean the permutations are not exchangeable."""
    rejections = 0
    for k in range(10):
        a, ca = _sample(2 * k)
        b, cb = _sample(2 * k + 1)
        rejections += test(a, b, ca, cb, permutations=99)["p_value"] < 0.05
    assert rejections <= 3


@pytest.mark.parametrize("test", [energy_test, classifier_test])
def test_small_within_class_shift_is_rejected(test):
    a, ca = _sample(0)
    b, cb = _sample(1, shift=0.7)
    assert test(a, b, ca, cb, permutations=199)["p_value"] < 0.01


def test_within_class_energy_sees_what_pooled_mmd_does_not():
    """The between-class spread hides the shift from the pooled MMD at this N; conditioning on the
    requested class removes it."""
    a, ca = _sample(0)
    b, cb = _sample(1, shift=0.7)
    assert energy_test(a, b, ca, cb, permutations=199)["p_value"] < 0.01
    assert mmd_test(a, b, permutations=199)["p_value"] > 0.01


def test_label_chi2_sees_a_missing_class():
    pred_a = np.arange(500) % 10
    pred_b = np.where(pred_a == 7, 1, pred_a)
    assert label_chi2_test(pred_a, pred_a)["p_value"] > 0.5
    assert label_chi2_test(pred_a, pred_b)["p_value"] < 1e-6


@pytest.mark.parametrize("test", [energy_test, classifier_test])
def test_bad_input_is_refused(test):
    a, ca = _sample(0, n=40)
    with pytest.raises(ValueError, match="same d"):
        test(a, a[:, :3], ca, ca)
    with pytest.raises(ValueError, match="one class per row"):
        test(a, a, ca, ca[:5])
    with pytest.raises(ValueError, match="no class"):
        test(a, a, np.zeros(40, int), np.ones(40, int))
