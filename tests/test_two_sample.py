"""The two-sample tests behind the lossless claim (benchmarks/two_sample.py): calibrated under the
null, and able to see a small within-class shift that pooled statistics miss."""
from __future__ import annotations

import numpy as np
import pytest

from freedit.benchmarks.two_sample import (classifier_test, energy_test, error_count_test, holm, label_chi2_test,
                                           mmd_test, prediction_t_test)

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


def test_prediction_t_test_is_calibrated_and_sees_a_shift():
    rng = np.random.default_rng(0)
    null = [prediction_t_test(rng.normal(), rng.normal(size=12)) for _ in range(4000)]
    assert 0.04 < np.mean(np.array(null) < 0.05) < 0.06  # size 5%: the prediction interval, not mean +- 2 std
    ref = rng.normal(10.0, 0.7, size=12)
    assert prediction_t_test(ref.mean() + 6 * ref.std(ddof=1), ref) < 0.001
    assert prediction_t_test(ref.mean(), ref) > 0.99
    with pytest.raises(ValueError, match=">= 2 finite"):
        prediction_t_test(1.0, [1.0])


def test_error_count_test_sees_an_error_rate_change():
    assert error_count_test(0, 256, 34, 3072) > 0.05  # 0 of 256 where the seeds make ~1.1% errors: chance
    assert error_count_test(20, 256, 34, 3072) < 1e-6
    assert error_count_test(0, 256, 0, 3072) == 1.0
    with pytest.raises(ValueError, match="out of range"):
        error_count_test(300, 256, 0, 3072)


def test_holm_adjusts_step_down():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
