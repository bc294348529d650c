"""Lossless on the real model, by a test whose power is shown in the same run.

The transition test (benchmarks/transition_test.py) holds every committed transition of real
chains of the bundled digits DiT against the DiT's own transition from the committed parent: an
exact z-test along the direction of the draft, plus a chi-square on |z|^2. On the CI budget (50
steps, L = 2, 60 chains per group) the same statistic must pass the sequential sampler, lossless
FREE, the frozen-target drafter, FREE with a deliberately poor drafter and FREE under block
verification, and reject FREE under two slightly biased decide rules: accept with
min(1, (q/p)^0.8), and redraw from p instead of the residual. A biased rule errs only where drafts
are rejected, so that run's drafter is the first one (rejected 3 in 4 at 50 steps); the shipped
drafter's lossless groups pass the same statistic in a second run. Larger runs (with gamma 0.9 /
0.95, relax, and the final-sample two-sample tests beside it) are recorded in
benchmarks/results/lossless_power_*.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from freedit.benchmarks.biased_rules import RULES, draft_resample_on_rejection, tempered_accept
from freedit.benchmarks.lossless_power import (ALPHA, BIASED, FIRST_DRAFTER, LOSSLESS, PRIMARY, SEEDS, digits_pipeline,
                                               run)
from freedit.benchmarks.transition_test import Chains, Reference, recording, standardized
from freedit.runtime import coupling, noise
from freedit.runtime.pipeline import Pipeline, default_model_dir
from freedit.runtime.schedule import Schedule

#: The CI budget: 50 steps (rejections at every stage of the chain), CFG 1.5, L = 2.
CI = dict(steps="50", n=60, window=2)
#: The shipped drafter's groups (the others do not depend on the drafter).
SHIPPED = ("free", "free-block")


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


@pytest.fixture(scope="module")
def digits():
    return digits_pipeline(default_model_dir() / "drafter.onnx", threads=None)


def test_chains_are_recorded_whole_and_the_reference_recovers_the_sequential_noise(digits):
    """The bookkeeping under the statistic: a recorded FREE chain ends in the sample the pipeline
    returned, every step is present once; on the sequential sampler the test's own reference
    recovers z = the keyed STEP noise of every transition (so z and the step indexing are right)."""
    labels = np.arange(6) % 10
    chains = Chains(50)
    with recording(chains):
        free = digits.generate(labels, sampler="free", steps="50", seed=3, window=3, maths="numpy")
    assert chains.complete() == list(range(6))
    np.testing.assert_array_equal(np.stack([chains.final[s] for s in range(6)]), free.samples)
    assert free.summary["acceptance"] > 0  # accepted drafts entered the chains too

    seq_chains = Chains(50)
    with recording(seq_chains):
        digits.generate(labels, sampler="sequential", steps="50", seed=5, maths="numpy")
    reference = Reference(default_model_dir(), default_model_dir() / "drafter.onnx", digits.info,
                          digits.defaults["cfg_scale"])
    got = standardized(reference, Schedule.create("50"), seq_chains, labels)
    keyed = noise.normal(5, got["sample"], got["step"], noise.Purpose.STEP, (1, 16, 16)).reshape(len(got["z"]), -1)
    np.testing.assert_allclose(got["z"], keyed, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(got["e"], axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("rule", ["parent", "drafter"])
def test_the_direction_is_the_rounds_own_first_draft(digits, monkeypatch, rule):
    """The test's direction points at the proposal FREE really drafted from each round's start state,
    under either draft guidance rule (guided: the digits model's CFG 1.5); the other rule's direction
    is measurably another one, so the check can tell them apart."""
    from freedit.runtime.round_numpy import NumpyRoundMaths

    labels, steps, captured = np.arange(6) % 10, "50", {}
    original = NumpyRoundMaths.draft_step

    def spy(self, ws, k, n, rows, frozen, lane):  # the position-1 proposal of every round, by (sample, step)
        original(self, ws, k, n, rows, frozen, lane)
        if k == 1:
            src = ws["draft_src"][0, :n]
            for sample, step, mp in zip(ws["sample"][ws["row_slot"][src]], ws["row_step"][src], ws["mean_p"][src + 1]):
                captured[int(sample), int(step)] = mp.astype(np.float64)

    monkeypatch.setattr(NumpyRoundMaths, "draft_step", spy)
    chains = Chains(50)
    with recording(chains):
        digits.generate(labels, sampler="free", steps=steps, seed=3, window=3, maths="numpy", draft_guidance=rule)
    a = chains.array(chains.complete())
    cos = {}
    for ref_rule in ("parent", "drafter"):
        reference = Reference(default_model_dir(), default_model_dir() / "drafter.onnx", digits.info,
                              digits.defaults["cfg_scale"], parent_guidance=ref_rule == "parent")
        mq, lvq, e = reference.directions(Schedule.create(steps), a, labels)
        rows = [(s, st) for s in range(len(labels)) for st in range(1, 49)]
        hit = [i for i, key in enumerate(rows) if key in captured]
        d = (np.stack([captured[rows[i]] for i in hit]) - mq[hit]) * np.exp(-0.5 * lvq[hit])
        cos[ref_rule] = (d * e[hit]).sum(1) / np.linalg.norm(d, axis=1)
    assert len(hit) > 50  # rounds started at many steps
    other = "drafter" if rule == "parent" else "parent"
    assert cos[rule].min() > 0.999, cos[rule].min()
    assert np.median(cos[other]) < 0.99, np.median(cos[other])


def test_recording_needs_the_numpy_maths(digits):
    chains = Chains(12)
    with recording(chains):
        pass
    with pytest.raises(ValueError, match="no complete chain"):
        standardized(None, Schedule.create("12"), chains, np.arange(3))


def test_the_cli_passes_and_records_the_draft_guidance(tmp_path):
    """main at its tiniest with the rule of records made before --draft-guidance existed."""
    from freedit.benchmarks.lossless_power import main

    assert main(["--steps", "6", "--n", "10", "--window", "2", "--groups", "free", "--threads", "1",
                 "--draft-guidance", "drafter", "--out", str(tmp_path / "p")]) == 0
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["draft_guidance"] == "drafter" and report["groups"]["free"]["draft_guidance"] == "drafter"
    assert "draft guidance: drafter" in (tmp_path / "p.md").read_text()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("torch")  # the poor drafter is made from the first one
    return run(**CI, groups=LOSSLESS + BIASED, cache=tmp_path_factory.mktemp("lossless_power"), drafter=FIRST_DRAFTER)


@pytest.fixture(scope="module")
def shipped_report():
    return run(**CI, groups=SHIPPED)


def _passes(g: dict, group: str) -> None:
    assert g.get("residual_cap_hits", 0) == 0
    if group != "sequential":
        assert g["acceptance"] < 0.99  # rejections happened: the residual sampler was exercised
    assert g["transition"]["p_value"] >= ALPHA, g["transition"]
    assert not g["rejected"]


@pytest.mark.parametrize("group", SHIPPED)
def test_lossless_samplers_pass_with_the_shipped_drafter(shipped_report, group):
    assert shipped_report["drafter"] == "drafter.onnx"
    _passes(shipped_report["groups"][group], group)
    # the shipped drafter is the better one: its lossless FREE accepts far more than the first's
    if group == "free":
        assert shipped_report["groups"]["free"]["acceptance"] > 0.6


@pytest.mark.parametrize("group", LOSSLESS)
def test_lossless_samplers_pass(report, group):
    _passes(report["groups"][group], group)


@pytest.mark.parametrize("group", BIASED)
def test_slightly_biased_rules_are_rejected(report, group):
    g = report["groups"][group]
    assert g["transition"]["p_value"] < ALPHA, g["transition"]
    assert g["rejected"]
    assert g["transition"]["direction"]["z"] > 0  # the bias points towards the drafts, as the rules do


def test_power_and_exactness_come_from_one_run(report):
    assert report["verdict"] and report["primary"] == PRIMARY
    assert set(report["groups"]) == set(LOSSLESS) | set(BIASED)
    assert {g: report["seeds"][g] for g in report["groups"]} == {g: SEEDS[g] for g in report["groups"]}
    assert report["drafter"] == FIRST_DRAFTER.name
    # every chain of every group was tested whole: 48 testable transitions per chain
    assert all(g["transition"]["transitions"] == CI["n"] * 48 for g in report["groups"].values())
    # The poor drafter really is poor: far fewer drafts accepted than with the one it was made from.
    assert report["groups"]["free-poor"]["acceptance"] < 0.5 * report["groups"]["free"]["acceptance"]
