"""Resuming `freedit train-dit` / `train-drafter` from --out: weights-only state, never pickled code.

A crafted state.pt whose unpickling would write a marker file must be refused in one line with
the marker never written; files that are not training states (random bytes, a list, another
trainer's state, a state for another model) are refused in one line; a real state resumes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from freedit.cli import main  # noqa: E402
from freedit.runtime.pipeline import default_model_dir  # noqa: E402

DIT_ARGS = ["--steps", "2", "--batch-size", "4", "--threads", "1"]


#: The trajectory cache of drafter_args' one setting (respacing 4, CFG 1.5; export/train_drafter.py).
TRAJECTORIES = "trajectories_4_cfg1.5.pt"


def drafter_args(out: Path, steps: int = 4, train_steps: int = 1, trajectories: int = 2) -> list[str]:
    return ["train-drafter", "--dit", str(default_model_dir() / "digits_dit.safetensors"), "--out", str(out),
            "--steps", str(steps), "--trajectories", str(trajectories), "--held-out", "2", "--train-steps", str(train_steps),
            "--batch-size", "2", "--unroll", "1", "--threads", "1"]


class WritesMarker:
    """Unpickling this calls exec(), which writes the marker file: what a hostile state.pt does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def craft_state(path: Path, marker: Path, **fields) -> None:
    """A state.pt that looks like ours but carries an object whose unpickling runs code."""
    torch.save({"model": WritesMarker(marker), "step": 1, "log": [], **fields}, path)


def one_error_line(capfd, command: str) -> str:
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"freedit {command}: error: ")]
    assert len(lines) == 1 and err.rstrip().splitlines()[-1] == lines[0], err
    return lines[0]


def test_the_crafted_state_really_runs_code_when_unpickled(tmp_path):
    """The test's premise: the old loader (weights_only=False) would have run the payload."""
    marker, state = tmp_path / "marker", tmp_path / "state.pt"
    craft_state(state, marker)
    code = f"import torch; torch.load({str(state)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=120)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("command", ["train-dit", "train-drafter"])
def test_crafted_state_is_refused_and_its_code_never_runs(capfd, tmp_path, command):
    out, marker = tmp_path / "run", tmp_path / "marker"
    out.mkdir()
    craft_state(out / "state.pt", marker)
    if command == "train-drafter":  # the trajectories file goes through the same loader
        craft_state(out / TRAJECTORIES, marker)
    args = ["train-dit", "--out", str(out), *DIT_ARGS] if command == "train-dit" else drafter_args(out)
    capfd.readouterr()
    assert main(args) == 2
    line = one_error_line(capfd, command)
    assert "refusing resume state" in line and "weights-only" in line
    assert not marker.exists(), "the pickled payload ran"
    assert sorted(p.name for p in out.iterdir()) == sorted(["state.pt"] + ([TRAJECTORIES] if
                                                                           command == "train-drafter" else []))


NOT_STATES = {
    "random bytes": (lambda p: p.write_bytes(os.urandom(2048)), "refusing resume state"),
    "empty file": (lambda p: p.write_bytes(b""), "refusing resume state"),
    "a list": (lambda p: torch.save([1, 2, 3], p), "holds a list, not a training state"),
    "another trainer's state": (lambda p: torch.save({"drafter": {}, "opt": {}, "step": 3}, p),
                                "not written by this trainer (missing model, ema, generator, log"),
    "wrong field types": (lambda p: torch.save({"model": {}, "ema": {}, "opt": {}, "generator": torch.zeros(3),
                                                "step": "3", "log": []}, p), "step is str"),
    "state of another model": (lambda p: torch.save({"model": {"w": torch.zeros(2)}, "ema": {}, "opt": {},
                                                     "generator": torch.zeros(5, dtype=torch.uint8), "step": 1,
                                                     "log": []}, p), "does not fit this digits DiT"),
    "a folder": (lambda p: p.mkdir(), "not a regular file"),
}


@pytest.mark.parametrize("case", list(NOT_STATES))
def test_train_dit_refuses_files_that_are_not_its_state(capfd, tmp_path, case):
    write, needle = NOT_STATES[case]
    write(tmp_path / "state.pt")
    capfd.readouterr()
    assert main(["train-dit", "--out", str(tmp_path), *DIT_ARGS]) == 2
    assert needle in one_error_line(capfd, "train-dit")
    assert not (tmp_path / "digits_dit.safetensors").exists()


def test_a_real_state_resumes(capfd, tmp_path):
    """train-dit 2 steps, then 3: the second run starts from the saved step (weights-only load works)."""
    assert main(["train-dit", "--out", str(tmp_path), *DIT_ARGS]) == 0
    first = torch.load(tmp_path / "state.pt", weights_only=True)
    assert first["step"] == 2
    assert main(["train-dit", "--out", str(tmp_path), "--steps", "3", "--batch-size", "4", "--threads", "1"]) == 0
    second = torch.load(tmp_path / "state.pt", weights_only=True)
    assert second["step"] == 3 and not (tmp_path / "state.pt.tmp").exists()


def test_drafter_resume_and_trajectories_for_other_settings(capfd, tmp_path):
    assert main(drafter_args(tmp_path)) == 0
    assert main(drafter_args(tmp_path, train_steps=2)) == 0  # resumes state.pt and reuses the trajectories
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 2
    capfd.readouterr()
    # the cache of this setting holds 2 + 2 trajectories; 3 + 2 are asked for
    assert main(drafter_args(tmp_path, train_steps=3, trajectories=3)) == 2
    assert "holds trajectories for other settings" in one_error_line(capfd, "train-drafter")
