"""Lossless on the real model, by a test whose power is shown in the same run.

Independent samples of the bundled digits DiT: the sequential sampler (the reference), lossless
FREE with the shipped drafter, the frozen-target drafter, FREE with a deliberately poor drafter,
and FREE under two slightly biased decide rules (accept with min(1, (q/p)^0.8); redraw from p
instead of the residual). One statistic (within-class energy distance on the digits classifier's
features, permutation p-value) against the one reference sample must pass every lossless sampler
at alpha = 0.01 and reject both biased rules. That run is behind -m slow because its power is not
shown yet: at this size (benchmarks/results/lossless_power_50_n800.json, 45 min of CPU on the shared
2-core machine) the redraw-from-p rule was rejected (energy p = 0.001) and every lossless sampler
passed, but the tempered rule min(1, (q/p)^0.8) was not (p = 0.66): at 50 steps drafts are rarely
near acceptance, so tempering changes few decisions. A setting where it bites (more steps, higher
acceptance) and a larger recorded run are still to do.
"""
from __future__ import annotations

import numpy as np
import pytest

from freedit.benchmarks.biased_rules import RULES, draft_resample_on_rejection, tempered_accept
from freedit.benchmarks.lossless_power import ALPHA, BIASED, LOSSLESS, PRIMARY, run
from freedit.runtime import coupling
from freedit.runtime.pipeline import Pipeline

#: The CI budget: 50 steps (rejections at every stage of the chain), CFG 1.5, L = 2.
CI = dict(steps="50", n=800, window=2, permutations=1000)


def test_tempered_accept_is_the_accept_test_with_gamma_0_8():
    log_r = np.array([-1.0, -1.0, -1.0, 0.5])
    u = np.exp(np.array([-0.9, -0.7, -1.1, -0.01]))
    exact = coupling.accept(log_r, u)
    with tempered_accept(0.8):
        biased = coupling.accept(log_r, u)
        relaxed = coupling.accept(log_r, u, 0.5)  # a relax gamma composes with the constant one
    np.testing.assert_array_equal(exact, [False, False, True, True])
    np.testing.assert_array_equal(biased, [True, False, True, True])  # log u < 0.8 * log r
    np.testing.assert_array_equal(relaxed, [True, True, True, True])  # log u < 0.4 * log r
    assert coupling.accept is not None and coupling.accept(log_r, u).tolist() == exact.tolist()  # restored


def test_draft_resample_commits_a_fresh_draw_from_p():
    rng = np.random.default_rng(0)
    mean_p, mean_q = rng.normal(size=(3, 1, 4, 4)), rng.normal(size=(3, 1, 4, 4))
    lv_p, lv_q = np.full((3, 1, 4, 4), -1.0), np.full((3, 1, 4, 4), -2.0)
    z = rng.normal(size=(3, 1, 4, 4))

    def draw(rows, attempts):
        assert (attempts == 0).all()
        return z[rows], np.full(len(rows), 0.5)

    with draft_resample_on_rejection():
        y, proposals, caps = coupling.sample_residual(mean_p, lv_p, mean_q, lv_q, draw)
    np.testing.assert_allclose(y, mean_p + np.exp(-0.5) * z, rtol=1e-6)
    assert proposals.tolist() == [1, 1, 1] and not caps.any()


@pytest.mark.parametrize("rule, kwargs", [("accept-all", {}), ("draft-resample", {}), ("gamma0.8", {"gamma": 0.05})])
def test_rules_reach_the_round_and_leave_it_exact_afterwards(tiny_free_dir, rule, kwargs):
    """Through the Pipeline (the tiny model's random drafter is poor: a strong temper makes the
    tempered test visible there)."""
    pipe = Pipeline.from_directory(tiny_free_dir, threads=1)
    settings = dict(sampler="free", steps=16, window=3, seed=4, batch_size=4)
    exact = pipe.generate([0, 1, 2, 3], **settings)
    with RULES[rule](**kwargs):
        biased = pipe.generate([0, 1, 2, 3], **settings)
    again = pipe.generate([0, 1, 2, 3], **settings)
    assert not np.array_equal(biased.samples, exact.samples)
    if rule != "draft-resample":  # a looser test accepts at least as often (same draws)
        assert biased.summary["acceptance"] >= exact.summary["acceptance"]
    np.testing.assert_array_equal(again.samples, exact.samples)


#: The power run samples 6 groups of 800 images: minutes of CPU, beyond the CI budget until it is
#: cut down and recorded (see the report), so it runs with -m slow.
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("torch")  # the poor drafter is made from the shipped one
    return run(**CI, cache=tmp_path_factory.mktemp("lossless_power"))


@pytest.mark.slow
@pytest.mark.parametrize("group", LOSSLESS)
def test_lossless_samplers_pass(report, group):
    g = report["groups"][group]
    assert g["residual_cap_hits"] == 0
    assert g["acceptance"] < 0.99  # rejections happened: the residual sampler was exercised
    assert g["tests"][PRIMARY]["p_value"] >= ALPHA, g["tests"]
    assert not g["rejected"]


@pytest.mark.slow
@pytest.mark.parametrize("group", BIASED)
def test_slightly_biased_rules_are_rejected(report, group):
    g = report["groups"][group]
    assert g["tests"][PRIMARY]["p_value"] < ALPHA, g["tests"]
    assert g["rejected"]


@pytest.mark.slow
def test_power_and_exactness_come_from_one_run(report):
    assert report["verdict"]
    assert set(report["groups"]) == set(LOSSLESS) | set(BIASED)
    # The poor drafter really is poor: far fewer drafts accepted than with the shipped drafter.
    assert report["groups"]["free-poor"]["acceptance"] < 0.5 * report["groups"]["free"]["acceptance"]
