"""The acceptance-matrix benchmark (benchmarks/acceptance_matrix.py) on the bundled digits DiT at a
toy size: the entries carry the issue's keys, a rerun resumes instead of recomputing, and the
report's verdicts follow the sequential spread."""
from __future__ import annotations

import json

import numpy as np
import pytest

from freedit.benchmarks import acceptance_matrix as am
from freedit.runtime.pipeline import default_model_dir

KEYS = {"steps", "cfg_scale", "sampler", "window", "drafter", "acceptance", "nfe_speedup", "fd_digits",
        "class_accuracy"}


def _args(out, *extra):
    model = default_model_dir()
    return ["--n", "20", "--steps", "6", "--cfg-scales", "1.5", "--windows", "2", "--samplers", "free,frozen",
            "--spread-seeds", "2", "--threads", "1", "--batch-size", "20",
            "--drafters", f"new={model / 'drafter.onnx'},old={model / 'drafter_v1.onnx'}", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix") / "m"
    assert am.main(_args(out)) == 0
    return out


def test_entries_carry_the_issue_keys(matrix):
    report = json.loads(matrix.with_suffix(".json").read_text())
    entries = report["entries"]
    assert {(e["sampler"], e["drafter"]) for e in entries} == {("free", "new"), ("free", "old"), ("frozen", "new"),
                                                               ("frozen", "old")}
    for e in entries:
        assert KEYS <= set(e), KEYS - set(e)
        assert e["steps"] == 6 and e["window"] == 2 and e["n"] == 20
        assert 1.0 <= e["nfe_speedup"] <= 6.0 and 0.0 <= e["acceptance"] <= 1.0
        assert e["mean_target_calls"] == pytest.approx(6 / e["nfe_speedup"])
        assert set(e["acceptance_by_step"]) <= {str(k) for k in range(1, 6)}
    assert {e.get("draft_guidance") for e in entries} == {"parent", None}  # free: the model's rule; frozen: none
    assert {e["verifier"] for e in entries} == {"step"}  # the matrix is per-step's, whatever the model's default
    frozen = [e for e in entries if e["sampler"] == "frozen"]
    assert frozen[0]["fd_digits"] == frozen[1]["fd_digits"]  # one run, listed under each drafter
    assert [r["seed"] for r in report["sequential"]] == [0, 1]
    assert set(report["spread"]) == {"6@1.5"}
    md = matrix.with_suffix(".md").read_text()
    assert "| 6 | 1.5 | free | 2 | new | parent |" in md and matrix.with_suffix(".png").stat().st_size > 10_000
    tests = report["consistency"]  # free/new, free/old and the one frozen run, each against the 2 seeds
    assert set(tests["runs"]) == {"6/1.5/free/L=2/new/seed 0", "6/1.5/free/L=2/old/seed 0", "6/1.5/frozen/L=2/seed 0"}
    assert tests["tests"] == 6 and "Consistency with the sequential sampler, tested" in md


def test_rerun_resumes_and_keeps_earlier_seeds(matrix, capsys):
    before = json.loads(matrix.with_suffix(".json").read_text())
    capsys.readouterr()
    assert am.main(_args(matrix, "--spread-seeds", "1")) == 0
    assert '"sampler"' not in capsys.readouterr().out  # nothing was sampled again
    after = json.loads(matrix.with_suffix(".json").read_text())
    assert after["entries"] == before["entries"] and after["sequential"] == before["sequential"]
    assert after["spread"]["6@1.5"]["seeds"] == [0, 1]  # a smaller --spread-seeds drops nothing


def test_resuming_with_another_n_is_refused(matrix):
    with pytest.raises(SystemExit, match="same --n"):
        am.main(_args(matrix, "--n", "30"))


def test_within_spread_rule():
    band = {"mean": 10.0, "std": 0.5, "min": 9.0, "max": 12.0}
    assert am.within(10.9, band) and am.within(11.9, band)  # 2 std, or the observed range
    assert not am.within(12.1, band) and not am.within(8.9, band)


def test_biased_rules_are_recorded_apart_and_screened(matrix):
    assert am.main(_args(matrix, "--rules", "accept-all")) == 0
    report = json.loads(matrix.with_suffix(".json").read_text())
    assert [(b["rule"], b["drafter"]) for b in report["biased"]] == [("accept-all", "new"), ("accept-all", "old")]
    assert all(b["acceptance"] == 1.0 for b in report["biased"])  # the rule really ran
    assert len(report["entries"]) == 4 and report["consistency"]["tests"] == 6  # the verdict counts lossless runs only
    screened = report["consistency"]["biased"]
    assert set(screened) == {"6/1.5/free/L=2/new/rule accept-all/seed 0", "6/1.5/free/L=2/old/rule accept-all/seed 0"}
    assert all(isinstance(r["flagged"], bool) for r in screened.values())
    assert "| 6 | 1.5 | 2 | new | accept-all |" in matrix.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="unknown --rules"):
        am.main(_args(matrix, "--rules", "block-unclipped"))


def test_consistency_flags_a_biased_run_and_passes_a_seed_like_one():
    rng = np.random.default_rng(0)
    seq = [{"steps": 50, "cfg_scale": 1.5, "n": 256, "seed": s, "class_accuracy": 1 - rng.integers(0, 5) / 256,
            "fd_digits": rng.normal(10.7, 0.7)} for s in range(12)]
    entry = {"steps": 50, "cfg_scale": 1.5, "sampler": "free", "window": 8, "drafter": "new", "seed": 0, "n": 256}
    like = am.consistency([{**entry, "class_accuracy": 254 / 256, "fd_digits": 11.2}], seq)
    assert like["consistent"] and like["tests"] == 2
    # an upper bound, not an expectation: Fisher's test on a few errors is conservative
    assert like["expected_below_alpha_at_most"] == pytest.approx(am.ALPHA * 2)
    worse = am.consistency([{**entry, "class_accuracy": 240 / 256, "fd_digits": 11.2},
                            {**entry, "window": 4, "class_accuracy": 254 / 256, "fd_digits": 16.0}], seq)
    runs = worse["runs"]
    assert not worse["consistent"] and worse["below_alpha"] == 2
    assert runs["50/1.5/free/L=8/new/seed 0"]["class_accuracy_holm_p"] < 0.01
    assert runs["50/1.5/free/L=4/new/seed 0"]["fd_digits_holm_p"] < 0.01
    assert runs["50/1.5/free/L=4/new/seed 0"]["class_accuracy_holm_p"] > 0.05


def test_the_band_is_applied_to_the_sequential_seeds_themselves():
    """Leave one seed out: a seed far from the others is outside their band, a typical one inside; settings
    with too few seeds for a std are not checked."""
    rows = [{"steps": 50, "cfg_scale": 1.5, "seed": s, "fd_digits": 10.0 + 0.1 * (s % 3), "class_accuracy": 0.99}
            for s in range(6)]
    rows.append({"steps": 50, "cfg_scale": 1.5, "seed": 6, "fd_digits": 14.0, "class_accuracy": 0.99})
    rows += [{"steps": 25, "cfg_scale": 4.0, "seed": s, "fd_digits": 50.0, "class_accuracy": 1.0} for s in range(2)]
    own = am.sequential_self_check(rows)
    assert own["checked"] == 7 and own["outside_seeds"] == ["50/1.5/seed 6"]
    rng = np.random.default_rng(1)  # normal seeds: some fall outside mean +- 2 std of the others, not most
    normal = [{"steps": 50, "cfg_scale": 1.5, "seed": s, "fd_digits": rng.normal(10, 1), "class_accuracy": 0.99}
              for s in range(200)]
    assert 0 < am.sequential_self_check(normal)["outside"] < 30


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="samplers"):
        am.main(_args(tmp_path / "m", "--samplers", "free,greedy"))
    with pytest.raises(ValueError, match="LABEL=PATH"):
        am.main(_args(tmp_path / "m", "--drafters", "new=/nonexistent.onnx"))
