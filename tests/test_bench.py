"""`freedit bench` end to end on a tiny configuration: schema, internal consistency, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from freedit.benchmarks.harness import BenchConfig, BenchError, run_bench
from freedit.cli import main
from freedit.runtime.adaptive import CostCurve, acceptance_profile, choose_windows, expected_commits


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--samplers", "sequential,frozen,free,free-relax,adaptive", "--windows", "2,3", "--relax",
            "1,4", "--batch-sizes", "3,6", "--steps", "12", "--n", "6", "--repeats", "2", "--pilot-n", "3",
            "--adaptive-max-window", "3", "--threads", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return json.loads((out / "bench.json").read_text()), out


def test_report_schema_and_files(report):
    data, out = report
    for key in ("command", "date", "git_revision", "device", "versions", "config", "groups"):
        assert key in data
    assert data["command"].startswith("freedit bench") and "onnxruntime" in data["versions"]
    assert data["device"]["cpu_count"] >= 1
    assert [(g["batch_size"], g["steps"]) for g in data["groups"]] == [(3, 12), (6, 12)]
    labels = [c["label"] for c in data["groups"][0]["configs"]]
    assert labels == ["sequential", "frozen L=2", "frozen L=3", "free L=2", "free L=3", "free-relax L=2 λ=1",
                      "free-relax L=2 λ=4", "free-relax L=3 λ=1", "free-relax L=3 λ=4", "adaptive (L<=3)"]
    md = (out / "bench.md").read_text()
    assert all(label in md for label in labels)
    for png in ("speedup_vs_lambda", "acceptance", "latency_vs_batch", "adaptive"):
        assert (out / f"bench_{png}.png").stat().st_size > 5000


def test_report_is_internally_consistent(report):
    data, _ = report
    for g in data["groups"]:
        seq = next(c for c in g["configs"] if c["sampler"] == "sequential")
        assert seq["serial_target_calls"] == g["steps"] and seq["nfe_speedup"] == 1.0
        for c in g["configs"]:
            runs = c["runs"]
            assert len(runs) == 2 and [r["repeat"] for r in runs] == [0, 1]
            per_image = [r["seconds_per_image"] for r in runs]
            assert c["seconds_per_image_median"] == pytest.approx(float(np.median(per_image)))
            assert min(per_image) <= c["seconds_per_image_p90"] <= max(per_image)
            # speed-ups are the ratios of the reported times and calls
            assert c["wallclock_speedup"] == pytest.approx(seq["seconds_per_image_median"] / c["seconds_per_image_median"])
            assert c["nfe_speedup"] == pytest.approx(g["steps"] / c["serial_target_calls"])
            assert 1 <= c["serial_target_calls"] <= g["steps"]
            for r in runs:  # time inside the engines cannot exceed the run's wall time
                assert r["target_seconds"] + r["drafter_seconds"] <= r["seconds"] + 1e-6
                assert r["seconds_per_image"] == pytest.approx(r["seconds"] / data["config"]["n"])
            if c["sampler"] == "sequential":
                assert c["drafter_seconds_median"] == 0.0
            if "acceptance" in c and c["decided"]:
                assert 0.0 <= c["acceptance"] <= 1.0
                assert c["acceptance"] == pytest.approx(c["accepted"] / c["decided"])
                assert all(0.0 <= v <= 1.0 for v in c["acceptance_by_step"].values())
            if "accepted" in c:  # steps add up: each round commits its accepted drafts + 1 transition
                n = data["config"]["n"]
                assert c["accepted"] + round(c["serial_target_calls"] * n) == g["steps"] * n
            assert "class_accuracy" in c and 0.0 <= c["class_accuracy"] <= 1.0 and c["fd_digits"] >= 0
        a = g["adaptive"]
        assert len(a["windows"]) == g["steps"] and all(0 <= w <= min(3, s) for s, w in enumerate(a["windows"]))
        assert len(a["cost_curve"]["verify_seconds"]) == 4
        assert a["expected_steps_per_second"] >= max(a["expected_steps_per_second_fixed"].values()) - 1e-9


def test_lossless_configs_reproduce_the_same_images_across_repeats(report):
    """Quality is computed on repeat 0; repeats reuse the seed, so every run of a config is the same
    sampling work -- the serial call count, a deterministic function of the seed, shows it."""
    data, _ = report
    for c in data["groups"][0]["configs"]:
        assert len({r["serial_target_calls"] for r in c["runs"]}) == 1


def test_the_default_draft_guidance_is_the_models_and_recorded(report):
    data, out = report
    assert data["config"]["draft_guidance"] is None  # asked for: the model's
    for g in data["groups"]:
        assert g["adaptive"]["draft_guidance"] == "parent"  # the bundled model's rule, pilot included
        for c in g["configs"]:
            assert c.get("draft_guidance") == ("parent" if c["sampler"] in ("free", "free-relax", "adaptive") else None)
            # the bundled model's verifier for lossless speculative runs; relax verifies per step
            assert c.get("verifier") == {"sequential": None, "free-relax": "step"}.get(c["sampler"], "block")
    assert "draft guidance: parent; verifier (free-relax: step): block." in (out / "bench.md").read_text()


def test_bench_draft_guidance_reaches_the_pilot_and_the_runs(tmp_path):
    """--draft-guidance drafter (the rule of records made before the option) on the tiniest bench."""
    argv = ["bench", "--samplers", "free,adaptive", "--windows", "2", "--steps", "6", "--n", "2", "--batch-sizes",
            "2", "--pilot-n", "2", "--adaptive-max-window", "2", "--threads", "1", "--no-quality", "--no-progress",
            "--draft-guidance", "drafter", "--verifier", "step", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["config"]["draft_guidance"] == "drafter" and data["config"]["verifier"] == "step"
    assert data["groups"][0]["adaptive"]["draft_guidance"] == "drafter"
    assert [c["draft_guidance"] for c in data["groups"][0]["configs"]] == ["drafter", "drafter"]
    assert [c["verifier"] for c in data["groups"][0]["configs"]] == ["step", "step"]  # the adaptive runs too
    for bad in (["--draft-guidance", "both"], ["--verifier", "tree"]):
        with pytest.raises(SystemExit):
            main(["bench", *bad, "--out", str(tmp_path / "o")])


def test_adaptive_policy_picks_long_windows_where_drafts_pass():
    acc = np.array([0.0] * 5 + [0.95] * 15)
    flat = CostCurve(batch=1, verify_seconds=[1.0] * 5, draft_seconds=0.01)
    windows, _ = choose_windows(acc, flat, 4)
    assert windows[0] == 0  # nothing to draft at the last step
    assert all(w == 4 for w in windows[10:])  # cheap verification + high acceptance: draft the most
    linear = CostCurve(batch=1, verify_seconds=[1.0, 2.0, 3.0, 4.0, 5.0], draft_seconds=0.1)
    assert choose_windows(acc, linear, 4)[0].max() == 0  # verification costs L+1 steps: never worth drafting
    assert expected_commits(np.ones(10), 9, 4) == 5.0
    prof = acceptance_profile({"3": 1.0, "7": 0.0}, 10, smooth=1)
    assert prof[0] == 1.0 and prof[9] == 0.0


def test_window_schedule_stays_exact_and_is_validated(bundled_dir):
    from freedit.runtime.pipeline import Pipeline

    pipe = Pipeline.from_directory(bundled_dir, threads=1)
    zeros = pipe.generate([1, 2], steps=10, window_schedule=np.zeros(10, dtype=np.int64), seed=3)
    seq = pipe.generate([1, 2], steps=10, sampler="sequential", seed=3)
    assert zeros.summary["mean_target_calls"] == 10 and zeros.summary["decided"] == 0
    assert np.isfinite(zeros.samples).all() and zeros.samples.shape == seq.samples.shape
    with pytest.raises(ValueError, match="one integer L >= 0 per step"):
        pipe.generate([1], steps=10, window_schedule=np.zeros(9, dtype=np.int64))


@pytest.mark.parametrize("kwargs, message", [
    (dict(models=["nonexistent_dir"]), "unknown model"),
    (dict(models=["random:DiT-Q/2:256"]), "random model spec"),
    (dict(backends=["cudnn"]), "unknown backend"),
    (dict(windows=[0]), "window lengths L must be integers >= 1"),
    (dict(relax=[]), "needs at least one lambda"),
    (dict(relax=[-1.0]), "relax lambdas must be >= 0"),
    (dict(samplers=["eagle"]), "unknown sampler"),
    (dict(batch_sizes=[]), "batch sizes must be integers >= 1"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(draft_guidance="both"), "unknown draft guidance 'both'"),
])
def test_bad_input_is_refused_before_any_run(kwargs, message):
    with pytest.raises(BenchError, match=message):
        run_bench(BenchConfig(**kwargs), progress=False)


def test_reference_batch_of_the_wrong_shape_is_refused(tmp_path, capsys):
    bad = tmp_path / "ref.npz"
    np.savez(bad, images=np.zeros((4, 32, 32), dtype=np.uint8))
    with pytest.raises(BenchError, match=r"must be uint8 images \[N, H, W, 3\]"):
        BenchConfig(reference=str(bad)).validate()
    assert main(["bench", "--reference", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "uint8 images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["bench", "--windows", "0", "--out", str(tmp_path / "o")]) == 2
    assert main(["bench", "--relax", "", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
