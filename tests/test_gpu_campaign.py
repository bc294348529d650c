"""The GPU campaign (benchmarks/gpu_campaign.py) without a GPU: its dry run end to end through the
script the GPU machine runs, the budget rule, what it parses from the tools, and the projection
maths it reports."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from freedit.benchmarks import gpu_campaign as gc
from freedit.benchmarks import gpu_campaign_steps as steps

REPO = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "failed", "error", "timeout", "skipped"}
GPU_STEPS = [s.name for s in gc.STEPS if s.gpu]


@pytest.fixture(scope="module")
def emulation(request):
    """The kernels' host emulation where it builds here: the rehearsals then run the device code."""
    try:
        return request.getfixturevalue("emulated_build").library
    except pytest.skip.Exception:
        return None


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, emulation):
    """The dry run as docs/GPU.md runs the campaign: through benchmarks/gpu_campaign.sh."""
    out = tmp_path_factory.mktemp("campaign") / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    if emulation is not None:
        env["FREEDIT_KERNELS_EMU_LIB"] = str(emulation)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_campaign.sh"), "--out", str(out), "--dry-run",
                           "--steps", "6"], capture_output=True, text=True, timeout=600, env=env)
    return proc, out


def test_dry_run_reports_every_step_with_a_status_and_a_reason(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["campaign.json", "campaign.md", "command.txt", "raw.log"]
    report = json.loads((out / "campaign.json").read_text())
    assert report["dry_run"] is True
    assert [e["name"] for e in report["steps"]] == list(gc.STEP_NAMES)
    for e in report["steps"]:
        assert e["status"] in STATUSES and e["reason"], e
        assert {"seconds", "estimate_s", "figures", "peak_gpu_mb"} <= set(e)
    by_name = {e["name"]: e for e in report["steps"]}
    for name in GPU_STEPS:
        assert by_name[name]["status"] == "skipped"
        assert by_name[name]["reason"] == "dry run: needs a CUDA GPU"
        assert by_name[name]["rehearsal"]["status"] in ("ok", "none"), by_name[name]["rehearsal"]
    assert by_name["machine"]["status"] == "ok" and by_name["machine"]["figures"]["versions"]["numpy"]
    ref = by_name["digits_cpu_reference"]
    assert ref["status"] == "ok" and ref["figures"]["steps"] == 6
    assert ref["figures"]["configs"]["sequential"]["mean_target_calls"] == 6.0


def test_dry_run_rehearses_the_gpu_steps_code(dry_run, emulation):
    _, out = dry_run
    by_name = {e["name"]: e for e in json.loads((out / "campaign.json").read_text())["steps"]}
    rehearsed = {n for n in GPU_STEPS if by_name[n]["rehearsal"]["status"] == "ok"}
    assert set(steps.REHEARSALS) | set(steps.NOT_REHEARSED) == set(GPU_STEPS)
    # the digits timing code compared torch (CPU) with the CPU path's decisions, sample by sample
    digits = by_name["digits_torch_cuda"]["rehearsal"]
    assert digits["step_status"] == "ok" and "equal the CPU path's" in digits["reason"]
    if emulation is None:
        assert rehearsed == set(steps.REHEARSALS) - {"kernels_checks"}
        return
    # on the emulated kernels: the self-test step, the device round's timing, the probe's comparisons
    assert rehearsed == set(steps.REHEARSALS)
    assert by_name["kernels_checks"]["rehearsal"]["step_status"] == "ok", by_name["kernels_checks"]["rehearsal"]
    assert "ms device" in by_name["round_wallclock"]["rehearsal"]["reason"]
    probe = by_name["sanitizer_memcheck_round"]["rehearsal"]
    assert probe["step_status"] == "ok" and "all equal" in probe["reason"], probe
    raw = (out / "raw.log").read_text()
    assert "[digits_cpu_reference] free L=8 block:" in raw and "-- rehearsing xl_cost_curves" in raw
    md = (out / "campaign.md").read_text()
    assert all(f"| {name} |" in md for name in gc.STEP_NAMES) and "**dry run**" in md


def test_a_step_that_does_not_fit_the_budget_is_skipped_saying_so(tmp_path):
    out = tmp_path / "c"
    rc = gc.main(["--out", str(out), "--dry-run", "--budget-s", "12", "--only", "digits_cpu_reference"])
    assert rc == 0
    by_name = {e["name"]: e for e in json.loads((out / "campaign.json").read_text())["steps"]}
    assert by_name["machine"]["status"] == "ok"
    ref = by_name["digits_cpu_reference"]
    assert ref["status"] == "skipped"
    assert re.fullmatch(r"needs ~20 s, \d+ s of the 12 s budget left", ref["reason"]), ref["reason"]
    assert by_name["xl_cost_curves"]["reason"] == "not selected (--only)"


def test_budget_rule():
    assert gc.budget_reason(100, elapsed=300, budget=480) is None
    assert gc.budget_reason(181, elapsed=300, budget=480) == "needs ~181 s, 180 s of the 480 s budget left"
    assert gc.budget_reason(5, elapsed=500, budget=480) == "needs ~5 s, 0 s of the 480 s budget left"
    assert gc.step_timeout(20, elapsed=0, budget=480) == 80  # estimate + 60
    assert gc.step_timeout(60, elapsed=0, budget=480) == 180  # 3x
    assert gc.step_timeout(60, elapsed=400, budget=480) == 80  # never past the budget


def test_only_brings_what_a_step_needs_and_uses():
    assert gc.selected(["digits_torch_cuda"]) == {"machine", "kernels_build", "digits_cpu_reference",
                                                  "digits_torch_cuda"}
    assert gc.selected(None) == set(gc.STEP_NAMES)


@pytest.mark.parametrize("args,message", [
    (["--budget-s", "0"], "--budget-s must be a positive number"),
    (["--budget-s", "nan"], "--budget-s must be a positive number"),
    (["--only", "warp_speed"], "unknown step(s) ['warp_speed']"),
    (["--steps", "1"], "--steps must be at least 2"),
    (["--repeats", "0"], "--repeats must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "c"
    assert gc.main(["--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()  # nothing written


def test_out_folder_must_have_an_existing_parent(tmp_path, capsys):
    assert gc.main(["--out", str(tmp_path / "missing" / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_step_is_stopped_at_its_timeout(tmp_path):
    lines = []
    (tmp_path / "context.json").write_text(json.dumps({"options": {}, "results": {}, "kernels_lib": None}))
    slow = tmp_path / "slow"  # the child sleeps at start-up, so the step surely outlives its timeout
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")]))}
    t0 = time.monotonic()
    rc, _ = gc._child(["--run-step", "machine"], tmp_path, env, 0.3, lines.append, "machine")
    assert rc is None and time.monotonic() - t0 < 10
    assert not (tmp_path / "machine.result.json").exists()


# ---- what the campaign reads from tools ------------------------------------------------------------
def test_sanitizer_summaries():
    memcheck = "========= COMPUTE-SANITIZER\n{...}\n========= ERROR SUMMARY: 0 errors\n"
    assert steps.sanitizer_summary(memcheck) == {"errors": 0}
    assert steps.sanitizer_summary("========= ERROR SUMMARY: 3 errors") == {"errors": 3}
    race = "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)"
    assert steps.sanitizer_summary(race) == {"hazards": 2, "errors": 1, "warnings": 1}
    assert steps.sanitizer_summary("no summary here") == {}


def test_json_block_skips_tool_lines():
    text = ("$ python -m x\n========= COMPUTE-SANITIZER\n{\n  \"passed\": true,\n  \"checks\": {\n    \"a\": 1\n"
            "  }\n}\n========= ERROR SUMMARY: 0 errors\n")
    assert steps.json_block(text) == {"passed": True, "checks": {"a": 1}}
    assert steps.json_block('noise\n{"passed": false}\n') == {"passed": False}
    assert steps.json_block("no json") is None


def test_ptxas_report():
    log = ("ptxas info    : Compiling entry function '_Z4stepPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z4stepPf\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 0 barriers, 380 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function '_Z5accepti' for 'sm_90'\n"
           "    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 255 registers, 380 bytes cmem[0]\n")
    assert steps.ptxas_report(log) == {"kernels": 2, "max_registers": 255, "spilling": ["_Z5accepti"]}


def test_build_commands_target_the_gpus_architecture(tmp_path):
    configure, build = steps.build_commands(REPO, tmp_path, "90", 16)
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in configure and configure[:5] == ["cmake", "-S", str(REPO), "-B",
                                                                              str(tmp_path)]
    assert build == ["cmake", "--build", str(tmp_path), "-j", "16"]


# ---- the projection the XL step reports ----------------------------------------------------------------
def _simulate(acc, window, cost, rng, chains=20000):
    """Monte Carlo of the rounds expected_chain_seconds models."""
    n = len(acc)
    total = 0.0
    for _ in range(chains):
        s, t = n - 1, cost.verify_seconds[0]
        s -= 1  # the first round: one plain step
        while s >= 0:
            L = min(window, s)
            t += L * cost.draft_seconds + cost.verify_seconds[L]
            k = 0
            while k < L and rng.random() < acc[s - k]:
                k += 1
            s -= k + 1
        total += t
    return total / chains


def test_expected_chain_seconds_matches_simulation_and_closed_forms():
    from freedit.runtime.adaptive import CostCurve, expected_chain_seconds, projected_speedup

    cost = CostCurve(1, [1.0, 1.2, 1.3, 1.5, 1.6], 0.1)
    n = 30
    # every draft rejected: one step per round; the first is plain, the rest draft min(L, s)
    none = np.zeros(n)
    expect = 1.0 + sum(min(4, s) * 0.1 + cost.verify_seconds[min(4, s)] for s in range(n - 1))
    assert expected_chain_seconds(none, 4, cost) == pytest.approx(expect)
    # every draft accepted, L = 4: 1 plain step, then rounds of 5 steps from 28 down: 28 -> 23 -> ... -> 3 -> -1
    full = np.ones(n)
    rounds = [(min(4, s)) for s in (28, 23, 18, 13, 8, 3)]
    assert expected_chain_seconds(full, 4, cost) == pytest.approx(
        1.0 + sum(L * 0.1 + cost.verify_seconds[L] for L in rounds))
    rng = np.random.default_rng(0)
    acc = rng.uniform(0.3, 0.95, n)
    assert expected_chain_seconds(acc, 3, cost) == pytest.approx(_simulate(acc, 3, cost, rng), rel=0.01)
    # L = 0 is the sequential sampler: speed-up 1 exactly; an overhead per round counts in both
    assert projected_speedup(acc, 0, cost) == pytest.approx(1.0)
    assert projected_speedup(acc, 0, cost, 0.5, 0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="a window of 5 needs 6"):
        expected_chain_seconds(acc, 5, cost)


def test_projection_at_the_recorded_digits_acceptance():
    acc, source = steps.digits_acceptance()
    assert acc is not None and len(acc) == 250 and "free L=8" in source
    flat = steps.projections(acc, [1.0] * 9, 0.0, batch=1)  # verifying 9 states costs one: the NFE speed-up
    assert flat["best_L"] == 8 and 3.0 < flat["best"] < 4.5  # the recorded NFE speed-up at L=8 is 3.53x
    linear = steps.projections(acc, [float(n) for n in range(1, 10)], 0.0, batch=1)  # a CPU: n states cost n
    assert linear["best"] < 1.0 and linear["adaptive"] == pytest.approx(1.0, abs=0.02)


# ---- the probe the sanitizer steps run ----------------------------------------------------------------
def test_probe_exercises_acceptance_residual_and_reflection():
    from freedit.benchmarks.device_round_probe import CASES, run_case

    for name, info, args in CASES:
        numpy_run = run_case(info, args, ("numpy",))["numpy"]
        assert 0.2 < numpy_run["acceptance"] < 0.9, (name, numpy_run)
        assert numpy_run["residual_cap_hits"] == 0
        assert (numpy_run["residual_proposals"] > 0) == info.learn_sigma  # residual sampler vs reflection


def test_round_wallclock_numpy_entry_has_wall_clock():
    from freedit.benchmarks.host_overhead import measure

    e = measure("numpy", "digits", 1, 2, rounds=2)
    assert e["kernels"] == "not used" and e["wall_ms_per_round"] >= e["host_ms_per_round"] > 0


def test_round_timing_with_kernels_that_run(emulated_kernels):
    """round_wallclock's device path: the kernels execute (here on the host emulation, as on a GPU)
    on engine outputs zeroed once, so every draft passes and the reports are the kernels' own."""
    from freedit.benchmarks.host_overhead import measure

    for graphs in (False, True):
        e = measure("device", "digits", 2, 3, rounds=3, graphs=graphs, kernels=emulated_kernels)
        assert e["kernels"] == "executed" and e["wall_ms_per_round"] >= e["host_ms_per_round"] > 0
        assert e["kernel_launches_per_round"] == 11 and e["d2h_bytes_per_round"] == (2 + 1) * 5 * 4
