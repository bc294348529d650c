"""The recorded-results scripts run end to end on tiny settings and write consistent reports."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")


def test_free_digits_report_is_consistent(tmp_path, bundled_dir):
    from freedit.benchmarks.free_digits import main

    out = tmp_path / "free"
    assert main(["--n", "20", "--steps", "12", "--windows", "2,4", "--relax", "0.5", "--out", str(out)]) == 0
    report = json.loads((tmp_path / "free.json").read_text())
    samplers = [r["sampler"] for r in report["results"]]
    assert samplers == ["sequential", "free", "frozen", "free", "frozen", "free-relax"]
    for r in report["results"]:
        assert r["nfe_speedup"] == pytest.approx(r["num_steps"] / r["mean_target_calls"])
        assert 0.0 <= r["class_accuracy"] <= 1.0 and r["fd_digits"] >= 0.0
        if r["sampler"] != "sequential":
            assert 0.0 <= r["acceptance"] <= 1.0 and r["residual_cap_hits"] == 0
            assert all(0.0 <= v <= 1.0 for v in r["acceptance_by_step"].values())
    assert report["best_lossless_window"] in (2, 4)
    assert (tmp_path / "free_acceptance.png").stat().st_size > 1000
    assert "| sequential |" in (tmp_path / "free.md").read_text()


def test_eval_digits_report(tmp_path, bundled_dir):
    from freedit.benchmarks.eval_digits import main

    assert main(["--n", "20", "--steps", "10", "--cfg-scales", "1,2", "--out", str(tmp_path / "q")]) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    assert [r["cfg_scale"] for r in report["results"]] == [1.0, 2.0]
    assert report["real_floor"]["n"] == 20
