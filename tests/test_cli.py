"""`freedit` on the command line: outputs, help, and every bad input -> one line, exit 2, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "freedit", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_generate_writes_grid_samples_and_stats(tiny_latent_dir, tmp_path):
    out = run_cli("generate", "--model", tiny_latent_dir, "--classes", "0-2,4", "--per-class", 2, "--steps", 6,
                  "--out", tmp_path / "grid.png", "--samples-dir", tmp_path / "each", "--stats", tmp_path / "s.json",
                  "--scale", 2, "--no-progress")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and "8 images" in out.stdout and "6.0 serial target calls/image" in out.stdout
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (4 * 129 + 1, 2 * 129 + 1, 3)  # 4 classes x 2 per class, RGB 64 px x2 + 1 px padding
    assert len(list((tmp_path / "each").glob("*.png"))) == 8
    stats = json.loads((tmp_path / "s.json").read_text())
    assert [s["label"] for s in stats["samples"]] == [0, 0, 1, 1, 2, 2, 4, 4]
    assert stats["settings"]["cfg_scale"] == 2.0  # the model directory's default


def test_generate_passes_the_draft_guidance(tiny_free_dir, tmp_path):
    """--draft-guidance reaches the sampler (its stats record the rule); the default is the parent's gap."""
    for rule, want in (("drafter", "drafter"), (None, "parent")):
        stats = tmp_path / f"{rule}.json"
        out = run_cli("generate", "--model", tiny_free_dir, "--classes", "0-1", "--steps", 8, "--cfg-scale", 2,
                      "--sampler", "free", "--window", 2, "--latents", tmp_path / "l.npy", "--stats", stats,
                      "--no-progress", *(("--draft-guidance", rule) if rule else ()))
        assert out.returncode == 0, out.stderr
        assert json.loads(stats.read_text())["settings"]["draft_guidance"] == want
    out = run_cli("generate", "--model", tiny_free_dir, "--draft-guidance", "both", "--latents", tmp_path / "l.npy")
    assert out.returncode == 2 and "invalid choice: 'both'" in out.stderr


def test_help_explains_every_option():
    out = run_cli("generate", "--help")
    assert out.returncode == 0
    for option in ("--classes", "--per-class", "--sampler", "--steps", "--cfg-scale", "--seed", "--batch-size", "--out",
                   "--samples-dir", "--stats", "--scale", "--model", "--threads", "--no-progress"):
        assert option in out.stdout
    for command in ("generate", "export", "train-dit"):
        assert command in run_cli("--help").stdout


@pytest.mark.parametrize("args, message", [
    (["--classes", "0,7"], r"unknown class label\(s\) \[7\]"),
    (["--classes", "two"], "expected integers"),
    (["--steps", "0"], "steps must be between 1 and 1000"),
    (["--steps", "-3"], "steps must be between 1 and 1000"),
    (["--steps", "ddimX"], "not a step count"),
    (["--cfg-scale", "-1"], "cfg scale must be >= 0"),
    (["--per-class", "0"], "--per-class: value must be an integer >= 1"),
    (["--batch-size", "0"], "batch size must be an integer >= 1"),
    (["--sampler", "nope"], "unknown sampler"),
])
def test_bad_generate_arguments(tiny_model_dir, tmp_path, args, message):
    # The tiny DiT is a latent one without a decoder: it can only save latents.
    out = run_cli("generate", "--model", tiny_model_dir, "--out", tmp_path / "g.png", "--no-progress",
                  "--latents", tmp_path / "z.npy", "--classes", "0-4", *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert __import__("re").search(message, out.stderr), out.stderr
    assert not list(tmp_path.iterdir())


def test_unwritable_output_paths(tiny_model_dir, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for target, message in ((tmp_path / "missing" / "g.png", "does not exist"), (blocker / "g.png", "does not exist"),
                            (tmp_path, "is a folder")):
        out = run_cli("generate", "--model", tiny_model_dir, "--out", target, "--no-progress")
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_missing_and_foreign_model_files(tmp_path):
    out = run_cli("generate", "--model", tmp_path / "nowhere", "--out", tmp_path / "g.png")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "dit.onnx").write_bytes(b"\x08\x07garbage")
    out = run_cli("generate", "--model", tmp_path / "m", "--out", tmp_path / "g.png")
    assert out.returncode == 2 and "not a loadable ONNX model" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "g.png").exists()


def test_contract_mismatch_is_one_line(tmp_path):
    torch = pytest.importorskip("torch")

    class Other(torch.nn.Module):
        def forward(self, image, t, y):
            return image * 2, t + 1

    (tmp_path / "m").mkdir()
    torch.onnx.export(Other().eval(), (torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.int64)),
                      str(tmp_path / "m" / "dit.onnx"), dynamo=True, opset_version=18,
                      input_names=["image", "t", "y"], output_names=["eps_v", "feat"])
    out = run_cli("generate", "--model", tmp_path / "m", "--out", tmp_path / "g.png")
    assert out.returncode == 2 and "no input named 'x'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "g.png").exists()


def test_export_bad_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"this is not a checkpoint")
    out = run_cli("export", "--checkpoint", tmp_path / "bad.pt", "--out", tmp_path / "o")
    assert out.returncode == 2 and "not a readable PyTorch checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert not list((tmp_path / "o").glob("*.onnx"))


@pytest.mark.parametrize("args, message", [
    (["--steps", "2"], "--steps 2: FREE drafts nothing below 3 steps"),
    (["--steps", "50", "ddimX"], "not a step count"),
    (["--cfg-scale", "1.5", "-1"], r"--cfg-scale must be >= 0 \(1 = no guidance\), got \[-1.0\]"),
    (["--depth", "0"], "must be at least 1"),
    (["--cfg-scale", "1", "4", "--cfg-weight", "2"], r"--cfg-weight \[2.0\] must be positive, one per CFG scale \[1.0, 4.0\]"),
    (["--cfg-scale", "1", "4", "--cfg-weight", "1", "0"], r"--cfg-weight \[1.0, 0.0\] must be positive, one per CFG scale"),
])
def test_bad_train_drafter_arguments(tmp_path, bundled_dir, args, message):
    out = run_cli("train-drafter", "--dit", bundled_dir / "digits_dit.safetensors", "--out", tmp_path / "d", *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert __import__("re").search(message, out.stderr), out.stderr
    assert not (tmp_path / "d").exists()
