"""The recorded-results scripts run end to end on tiny settings and write consistent reports."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")


def test_free_digits_report_is_consistent(tmp_path, bundled_dir):
    from freedit.benchmarks.free_digits import main

    out = tmp_path / "free"
    assert main(["--n", "20", "--steps", "12", "--windows", "2,4", "--relax", "0.5", "--draft-guidance", "drafter",
                 "--verifier", "step", "--out", str(out)]) == 0  # the rules of records made before either option
    report = json.loads((tmp_path / "free.json").read_text())
    assert report["draft_guidance"] == "drafter"  # asked for; each guided FREE row records the rule it ran with:
    assert [r.get("draft_guidance") for r in report["results"]] == [None, "drafter", None, "drafter", None, "drafter"]
    assert report["verifier"] == "step" and [r.get("verifier") for r in report["results"]] == [None] + ["step"] * 5
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
    assert "draft guidance: drafter" in (tmp_path / "free.md").read_text()
    assert "| free | 2 |  | step |" in (tmp_path / "free.md").read_text()
    with pytest.raises(SystemExit):  # argparse refuses a rule that does not exist
        main(["--draft-guidance", "both", "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit):
        main(["--verifier", "tree", "--out", str(tmp_path / "bad")])


def test_eval_digits_report(tmp_path, bundled_dir):
    from freedit.benchmarks.eval_digits import main

    assert main(["--n", "20", "--steps", "10", "--cfg-scales", "1,2", "--out", str(tmp_path / "q")]) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    assert [r["cfg_scale"] for r in report["results"]] == [1.0, 2.0]
    assert {r["sampler"] for r in report["results"]} == {"sequential"}  # not the model's default (FREE)
    assert report["real_floor"]["n"] == 20


def test_block_verification_takes_the_matrix_step_runs_it_would_repeat(tmp_path):
    """--step-from takes the acceptance matrix's per-step run of a setting instead of rerunning it, and that run is
    the one block_verification makes itself; a matrix of another N is refused, and one with another draft guidance
    gives nothing to take (the step run is made)."""
    from freedit.benchmarks import acceptance_matrix, block_verification
    from freedit.runtime.pipeline import default_model_dir

    common = ["--n", "10", "--batch-size", "10", "--threads", "1", "--draft-guidance", "parent"]
    assert acceptance_matrix.main([*common, "--steps", "6", "--cfg-scales", "1.5", "--windows", "2", "--samplers",
                                   "free", "--spread-seeds", "0", "--drafters",
                                   f"new={default_model_dir() / 'drafter.onnx'}", "--out", str(tmp_path / "m")]) == 0
    setting = ["--settings", "6:1.5:free:2"]
    assert block_verification.main([*common, *setting, "--step-from", str(tmp_path / "m.json"),
                                    "--out", str(tmp_path / "taken")]) == 0
    assert block_verification.main([*common, *setting, "--out", str(tmp_path / "run")]) == 0
    taken, run = (json.loads((tmp_path / f"{name}.json").read_text())["entries"] for name in ("taken", "run"))
    step = {name: next(e for e in rows if e["verifier"] == "step") for name, rows in (("taken", taken), ("run", run))}
    assert step["taken"]["taken_from"] == "m.json" and "taken_from" not in step["run"]
    for k in ("acceptance", "nfe_speedup", "mean_target_calls", "fd_digits", "class_accuracy",
              "residual_proposals_per_image", "draft_guidance"):
        assert step["taken"][k] == pytest.approx(step["run"][k]), k
    assert [e["verifier"] for e in taken] == ["step", "block"]  # the block run is made
    md = (tmp_path / "taken.md").read_text()
    assert "| step* |" in md and "taken from m.json" in md and "| step* |" not in (tmp_path / "run.md").read_text()
    with pytest.raises(SystemExit, match="holds N = 10"):
        block_verification.main(["--n", "20", *common[2:], *setting, "--step-from", str(tmp_path / "m.json"),
                                 "--out", str(tmp_path / "n20")])
    with pytest.raises(SystemExit, match="does not exist"):
        block_verification.main([*common, *setting, "--step-from", str(tmp_path / "none.json"),
                                 "--out", str(tmp_path / "none")])
    other = [*common[:-1], "drafter"]
    assert block_verification.main([*other, *setting, "--step-from", str(tmp_path / "m.json"),
                                    "--out", str(tmp_path / "drafter_rule")]) == 0
    rows = json.loads((tmp_path / "drafter_rule.json").read_text())["entries"]
    assert [e["verifier"] for e in rows] == ["step", "block"] and not any("taken_from" in e for e in rows)


def test_block_verification_parts_merge_only_with_their_own_drafter(tmp_path):
    """Two parts of a block-verification run, on tiny settings, join with --merge; a part or a
    resumed report made with another drafter or draft guidance is refused before anything is sampled."""
    from freedit.benchmarks.block_verification import main
    from freedit.runtime.pipeline import default_model_dir

    first = default_model_dir() / "drafter_v1.onnx"
    common = ["--n", "10", "--batch-size", "10", "--threads", "1", "--draft-guidance", "drafter"]
    assert main([*common, "--settings", "6:1.5:free:2", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--settings", "6:1.5:free:3", "--out", str(tmp_path / "b")]) == 0
    assert main([*common, "--settings", "", "--merge", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}",
                 "--out", str(tmp_path / "ab")]) == 0
    merged = json.loads((tmp_path / "ab.json").read_text())
    assert sorted((e["window"], e["verifier"]) for e in merged["entries"]) == [(2, "block"), (2, "step"),
                                                                              (3, "block"), (3, "step")]
    assert set(merged["parts"]) == {"a.json", "b.json"}
    assert merged["draft_guidance"] == "drafter" and {e["draft_guidance"] for e in merged["entries"]} == {"drafter"}
    assert "| 6 |" in (tmp_path / "ab.md").read_text() and "draft guidance: drafter" in (tmp_path / "ab.md").read_text()
    parent = common[:-1] + ["parent"]
    with pytest.raises(SystemExit, match="made with draft guidance drafter"):
        main([*parent, "--settings", "", "--merge", str(tmp_path / "a.json"), "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match="made with draft guidance drafter"):  # resuming a with the parent rule
        main([*parent, "--settings", "6:1.5:free:2", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="made with the drafter"):
        main([*common, "--settings", "", "--drafter", str(first), "--merge", str(tmp_path / "a.json"),
              "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="made with the drafter"):  # resuming a with the first drafter
        main([*common, "--settings", "6:1.5:free:2", "--drafter", str(first), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="does not exist"):
        main([*common, "--drafter", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "d")])


def test_relax_score_records_the_draft_guidance(tmp_path):
    from freedit.benchmarks.relax_score import main

    argv = ["--steps", "8", "--n", "10", "--corr-n", "10", "--window", "2", "--gap-lambdas", "1", "--variance-lambdas",
            "8", "--threads", "1", "--draft-guidance", "drafter", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["draft_guidance"] == "drafter"
    assert 1 <= len(report["correlation"]["bands"]) < 8  # fewer drafted steps than the 10 bands: fewer bands
    assert [e.get("draft_guidance") for e in report["curve"]] == [None, "drafter", "drafter", "drafter"]
    # relax verifies per step, so its lambda = 0 anchor does too, though the bundled model's default is block
    assert [e.get("verifier") for e in report["curve"]] == [None, "step", "step", "step"]
    assert "draft guidance: drafter" in (tmp_path / "r.md").read_text()
    with pytest.raises(SystemExit, match="other settings"):  # the rerun skips entries of its own rule only
        main(argv[:-4] + ["--out", str(tmp_path / "r")])


def test_call_cost_times_both_digits_graphs(capsys):
    from freedit.benchmarks.call_cost import main
    from freedit.runtime.pipeline import default_model_dir

    for graph in ("dit.onnx", "drafter.onnx"):
        assert main([str(default_model_dir() / graph), "--calls", "2", "--batch", "4"]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["calls"] == 2 and line["batch"] == 4 and line["seconds_per_call"] > 0
    with pytest.raises(SystemExit, match="no such file"):
        main(["missing.onnx"])
