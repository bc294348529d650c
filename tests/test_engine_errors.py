"""`freedit export` / `freedit build` failures: one clear line (exit 2), and nothing half-written.

Everything here runs the real components: torch's dynamo exporter, ONNX Runtime's parity check
and the TensorRT-RTX builder (which builds without a GPU). Disk-full is a real OS error: the
subprocess lowers RLIMIT_FSIZE with SIGXFSZ ignored, so the write fails with EFBIG.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tensorrt_rtx")

from freedit.cli import main  # noqa: E402

# Names that must never be left behind by a failed export or build.
LEFTOVER_SUFFIXES = (".onnx", ".data", ".plan", ".tmp", ".plan.json")

# Lowers the file size limit of the process, then runs the CLI: argv = [limit, freedit args...].
LIMITED = """\
import resource, signal, sys
n = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
from freedit.cli import main
sys.exit(main(sys.argv[2:]))
"""


# -- helpers ---------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` (hidden ones included) -> (size, mtime_ns)."""
    folder = Path(folder)
    found = {}
    if not folder.exists():
        return found
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            st = path.stat()
            found[str(path.relative_to(folder))] = (st.st_size if path.is_file() else -1, st.st_mtime_ns)
    return found


def assert_nothing_left(folder: Path, before: dict | None = None) -> None:
    """No new graph/weights/plan/manifest/temp/staging entries; what existed before is untouched."""
    before = before or {}
    now = snapshot(folder)
    new = [p for p in now if p not in before]
    bad = [p for p in new if p.endswith(LEFTOVER_SUFFIXES) or "partial-" in Path(p).name]
    assert not bad, f"half-written leftovers under {folder}: {bad}"
    changed = [p for p, v in before.items() if now.get(p) != v]
    assert not changed, f"pre-existing entries changed or removed under {folder}: {changed}"


def assert_one_line_error(rc: int, stderr: str, command: str, *needles: str) -> str:
    """Exit 2, no traceback, exactly one `freedit CMD: error: ...` line, last, naming each needle."""
    assert rc == 2, f"exit code {rc}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    prefix = f"freedit {command}: error: "
    errors = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, f"expected one error line, stderr:\n{stderr}"
    assert stderr.rstrip().splitlines()[-1] == errors[0], f"error line is not the last line:\n{stderr}"
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def cli(capfd, *args) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit code, stdout, stderr) as the terminal sees them."""
    capfd.readouterr()
    rc = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


def run_python(*argv, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def run_limited(fsize: int, *args) -> subprocess.CompletedProcess:
    """The CLI in a subprocess whose files may not grow beyond ``fsize`` bytes (writes fail with EFBIG)."""
    return run_python("-c", LIMITED, fsize, *args)


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s2_checkpoint(tmp_path_factory) -> Path:
    """A DiT-S/2, 64 px, random-weight checkpoint in the official .pt format (~130 MB)."""
    path = tmp_path_factory.mktemp("s2") / "DiT-S-2-64.pt"
    assert main(["init-checkpoint", "--config", "DiT-S/2", "--image-size", "64", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def s2_model_dir(tmp_path_factory, s2_checkpoint) -> Path:
    """That checkpoint exported by `freedit export` (dit.onnx ~130 MB, more than the size limits below)."""
    folder = tmp_path_factory.mktemp("s2_model")
    assert main(["export", "--checkpoint", str(s2_checkpoint), "--config", "DiT-S/2", "--image-size", "64",
                 "--out", str(folder), "--quiet"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["dit.onnx"]
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A private copy of the session's tiny exported DiT (builds in under a second); tests build into
    their own --out folders so they do not see each other's plans."""
    folder = tmp_path_factory.mktemp("tiny_build")
    shutil.copy(tiny_model_dir / "dit.onnx", folder / "dit.onnx")
    return folder


# -- 1. a checkpoint that does not fit the chosen config -------------------------------------------

@pytest.fixture(scope="module")
def s2_missing_block(tmp_path_factory, s2_checkpoint) -> Path:
    """The DiT-S/2 state dict without its last block (blocks.11.*), as an official .pt."""
    state = torch.load(str(s2_checkpoint), map_location="cpu", weights_only=True)
    path = tmp_path_factory.mktemp("s2_short") / "short.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.11.")}, str(path))
    return path


@pytest.mark.parametrize("case, flags, needles", [
    ("other config", ["--config", "DiT-B/2", "--image-size", "64"], ["does not fit", "hidden 768", "shape mismatch"]),
    ("other image size", ["--config", "DiT-S/2", "--image-size", "128"],
     ["does not fit", "input 16", "shape mismatch", "pos_embed"]),
    ("missing block", ["--config", "DiT-S/2", "--image-size", "64"], ["does not fit", "missing", "blocks.11."]),
])
def test_export_checkpoint_that_does_not_fit_the_config(capfd, tmp_path, s2_checkpoint, s2_missing_block,
                                                        case, flags, needles):
    """A checkpoint for another config/size (or with tensors missing) fails naming the mismatched
    tensors, before any graph is traced or written."""
    checkpoint = s2_missing_block if case == "missing block" else s2_checkpoint
    out = tmp_path / "out"
    rc, _, err = cli(capfd, "export", "--checkpoint", checkpoint, *flags, "--out", out, "--quiet")
    assert_one_line_error(rc, err, "export", checkpoint.name, *needles)
    assert "tracing" not in err
    assert_nothing_left(out)


# -- 2. files that are not checkpoints -------------------------------------------------------------

def _truncated_pt(path: Path, s2_checkpoint: Path) -> None:
    with open(s2_checkpoint, "rb") as f:
        path.write_bytes(f.read(s2_checkpoint.stat().st_size // 2))


def _truncated_safetensors(path: Path, _) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(256, 256)}, str(path))
    path.write_bytes(path.read_bytes()[:-1000])


# case -> (file name, how to write it, what the error must say)
NOT_CHECKPOINTS = {
    "random bytes .pt": ("random.pt", lambda p, _: p.write_bytes(os.urandom(4096)),
                         ["not a readable PyTorch checkpoint"]),
    "text file": ("notes.txt", lambda p, _: p.write_text("model: DiT-S/2\nimage size: 64\n"),
                  ["not a readable PyTorch checkpoint"]),
    "empty .pt": ("empty.pt", lambda p, _: p.write_bytes(b""), ["not a readable PyTorch checkpoint"]),
    "truncated .pt": ("truncated.pt", _truncated_pt, ["not a readable PyTorch checkpoint", "truncated"]),
    "garbage .safetensors": ("garbage.safetensors", lambda p, _: p.write_bytes(os.urandom(4096)),
                             ["not a readable safetensors file"]),
    "truncated .safetensors": ("truncated.safetensors", _truncated_safetensors, ["not a readable safetensors file"]),
    "pickled list": ("list.pt", lambda p, _: torch.save([1, 2, 3], str(p)), ["does not hold a state dict of tensors"]),
    "state dict of another model": ("other.pt", lambda p, _: torch.save({"linear.weight": torch.zeros(3, 3)}, str(p)),
                                    ["not a DiT state dict", "missing x_embedder.proj.weight"]),
}


@pytest.mark.parametrize("case", list(NOT_CHECKPOINTS))
def test_export_file_that_is_not_a_checkpoint(capfd, tmp_path, s2_checkpoint, case):
    """Random bytes, text, empty or truncated files and foreign pickles fail in one line naming the file."""
    name, write, needles = NOT_CHECKPOINTS[case]
    path = tmp_path / name
    write(path, s2_checkpoint)
    out = tmp_path / "out"
    rc, _, err = cli(capfd, "export", "--checkpoint", path, "--out", out, "--quiet")
    # infer_config's error does not name the file (the "loading FILE ..." line before it does).
    named = [] if case == "state dict of another model" else [path.name]
    assert_one_line_error(rc, err, "export", *named, *needles)
    assert_nothing_left(out)


def test_export_missing_checkpoint(capfd, tmp_path):
    """A checkpoint path that does not exist is named as such."""
    out = tmp_path / "out"
    rc, _, err = cli(capfd, "export", "--checkpoint", tmp_path / "nope.pt", "--out", out)
    assert_one_line_error(rc, err, "export", "nope.pt", "does not exist")
    assert_nothing_left(out)


# -- 3. opset/precision combinations the exporter cannot express -----------------------------------

@pytest.mark.parametrize("flags, needles", [
    (["--precision", "bf16", "--opset", "18"], ["bf16 needs opset 22", "got 18"]),
    (["--precision", "bf16", "--opset", "21"], ["bf16 needs opset 22", "got 21"]),
    (["--opset", "17"], ["fp32 needs opset 18", "got 17"]),
    (["--precision", "fp16", "--opset", "17"], ["fp16 needs opset 18", "got 17"]),
])
def test_export_unsupported_opset_for_precision(capfd, tmp_path, flags, needles):
    """The opset/precision pair is refused before the checkpoint is even opened (it does not exist
    here, and that is not what the error says)."""
    out = tmp_path / "out"
    rc, _, err = cli(capfd, "export", "--checkpoint", tmp_path / "absent.pt", *flags, "--out", out)
    line = assert_one_line_error(rc, err, "export", *needles)
    assert "absent.pt" not in line and "loading" not in err
    assert not out.exists()


# -- 4. no TensorRT of either kind -----------------------------------------------------------------

def test_build_without_any_tensorrt(tmp_path, tiny_dir):
    """With neither `tensorrt` nor `tensorrt_rtx` importable, build names both and says how to install
    one, and writes no plan (not even the engines folder)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text('import sys\nsys.modules["tensorrt"] = None\n'
                                           'sys.modules["tensorrt_rtx"] = None\n')
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    before = snapshot(tiny_dir)
    for builder in ("auto", "tensorrt-rtx"):
        engines = tmp_path / f"engines-{builder}"
        proc = run_python("-m", "freedit", "build", tiny_dir, "--out", engines, "--builder", builder,
                          "--no-progress", env={"PYTHONPATH": pythonpath})
        line = assert_one_line_error(proc.returncode, proc.stderr, "build", "no TensorRT found", "tensorrt_rtx",
                                     "pip install 'freedit[tensorrt-rtx]'")
        if builder == "auto":
            assert "tensorrt:" in line and "pip install 'freedit[tensorrt]'" in line
        assert not engines.exists()
    assert_nothing_left(tiny_dir, before)


# -- 5. disk full while writing the ONNX weights ---------------------------------------------------

def test_export_disk_full_keeps_the_earlier_export(tmp_path, s2_checkpoint, s2_model_dir):
    """EFBIG while saving the weights: one line naming the failed write; no staging folder, no
    partial .onnx/.data, and the dit.onnx of an earlier export in that folder is byte-identical."""
    out = tmp_path / "model"
    out.mkdir()
    shutil.copy(s2_model_dir / "dit.onnx", out / "dit.onnx")
    digest, before = sha256(out / "dit.onnx"), snapshot(out)
    assert (out / "dit.onnx").stat().st_size > 64 * 2**20
    proc = run_limited(16 * 2**20, "export", "--checkpoint", s2_checkpoint, "--config", "DiT-S/2",
                       "--image-size", "64", "--out", out)
    assert_one_line_error(proc.returncode, proc.stderr, "export", "writing", "dit.onnx", "failed",
                          "file too large", "disk full")
    assert_nothing_left(out, before)
    assert sorted(p.name for p in out.iterdir()) == ["dit.onnx"]
    assert sha256(out / "dit.onnx") == digest


# -- 6. disk full while writing the plan -----------------------------------------------------------

def test_build_disk_full_leaves_no_plan(tmp_path, s2_model_dir):
    """EFBIG while writing the TensorRT plan: one line naming the failed write; no dit.plan,
    dit.plan.tmp, manifest or engines.json."""
    engines = tmp_path / "engines"
    before = snapshot(s2_model_dir)
    proc = run_limited(16 * 2**20, "build", s2_model_dir, "--out", engines, "--no-progress")
    assert_one_line_error(proc.returncode, proc.stderr, "build", "writing", "dit.plan", "failed",
                          "file too large", "disk full")
    assert "building for" in proc.stderr  # the builder really ran; the write is what failed
    assert_nothing_left(engines)
    assert not list(engines.iterdir())  # no engines.json either
    assert_nothing_left(s2_model_dir, before)


def test_build_disk_full_on_rebuild_keeps_the_old_plan(capfd, tmp_path, tiny_dir):
    """A forced rebuild that hits EFBIG writing dit.plan.tmp should leave the previous plan and its
    manifest as they were (as export keeps the earlier dit.onnx), not delete the plan only."""
    engines = tmp_path / "engines"
    rc, _, err = cli(capfd, "build", tiny_dir, "--out", engines, "--no-progress")
    assert rc == 0, err
    plan, manifest = engines / "dit.plan", engines / "dit.plan.json"
    before = snapshot(engines)
    proc = run_limited(plan.stat().st_size // 2, "build", tiny_dir, "--out", engines, "--force", "--no-progress")
    assert_one_line_error(proc.returncode, proc.stderr, "build", "writing", "dit.plan", "file too large")
    assert not (engines / "dit.plan.tmp").exists()
    assert plan.is_file() == manifest.is_file(), "a manifest without its plan (or the reverse) was left"
    assert_nothing_left(engines, before)


# -- 7. a plan without a manifest ------------------------------------------------------------------

def test_build_refuses_plan_without_manifest_unless_forced(capfd, tmp_path, tiny_dir):
    """A foreign dit.plan (no dit.plan.json) is neither used nor overwritten without --force; with
    --force it is rebuilt and gets a manifest describing the new plan."""
    engines = tmp_path / "engines"
    engines.mkdir()
    foreign = engines / "dit.plan"
    foreign.write_bytes(os.urandom(8192))
    digest, before = sha256(foreign), snapshot(engines)

    rc, _, err = cli(capfd, "build", tiny_dir, "--out", engines, "--no-progress")
    assert_one_line_error(rc, err, "build", "dit.plan", "has no manifest", "--force")
    assert sha256(foreign) == digest
    assert_nothing_left(engines, before)
    assert sorted(p.name for p in engines.iterdir()) == ["dit.plan"]

    rc, out, err = cli(capfd, "build", tiny_dir, "--out", engines, "--force", "--no-progress")
    assert rc == 0, err
    assert "dit: rebuilt" in out and "Traceback" not in err
    manifest = json.loads((engines / "dit.plan.json").read_text())
    assert manifest["plan"]["sha256"] == sha256(foreign) != digest
    assert manifest["builder"]["kind"] == "tensorrt-rtx"
    assert sorted(p.name for p in engines.iterdir()) == ["dit.plan", "dit.plan.json", "engines.json"]

    rc, out, err = cli(capfd, "build", tiny_dir, "--out", engines, "--no-progress")
    assert rc == 0 and "dit: up to date" in out, err


# -- 8. bad model folders and build settings -------------------------------------------------------

def test_build_folder_without_dit_onnx(capfd, tmp_path):
    """A folder with no dit.onnx: says so and how to export one; creates no engines folder."""
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "pipeline.json").write_text("{}")
    rc, _, err = cli(capfd, "build", folder, "--no-progress")
    assert_one_line_error(rc, err, "build", "has no dit.onnx", "freedit export")
    assert sorted(p.name for p in folder.iterdir()) == ["pipeline.json"]


def test_build_missing_folder(capfd, tmp_path):
    """A model folder that does not exist: says so; creates nothing."""
    rc, _, err = cli(capfd, "build", tmp_path / "nowhere", "--no-progress")
    assert_one_line_error(rc, err, "build", "nowhere", "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_build_hopper_target_with_tensorrt_rtx(capfd, tmp_path, tiny_dir):
    """TensorRT-RTX has no SM 9.0 target: --targets 90 fails saying so, and writes no plan."""
    engines = tmp_path / "engines"
    rc, _, err = cli(capfd, "build", tiny_dir, "--out", engines, "--targets", "89,90", "--builder", "tensorrt-rtx",
                     "--no-progress")
    assert_one_line_error(rc, err, "build", "cannot target compute capability 90", "no SM 9.0")
    assert_nothing_left(engines)


@pytest.mark.parametrize("flags, needles", [
    (["--window", "0"], ["window", ">= 1", "got 0"]),
    (["--window", "-3"], ["window", ">= 1", "got -3"]),
    (["--batch-sizes", "0"], ["batch sizes", ">= 1", "[0]"]),
    (["--batch-sizes", "1,0,8"], ["batch sizes", ">= 1"]),
    (["--batch-sizes", ""], ["at least one batch size"]),
    (["--batch-sizes", "one"], ["--batch-sizes", "integers", "'one'"]),
    (["--static-batches", "0"], ["static batches", ">= 1"]),
])
def test_build_bad_settings(capfd, tmp_path, tiny_dir, flags, needles):
    """Window and batch sizes below 1 (or not numbers) fail before anything is built or written."""
    engines = tmp_path / "engines"
    rc, _, err = cli(capfd, "build", tiny_dir, "--out", engines, *flags, "--no-progress")
    assert_one_line_error(rc, err, "build", *needles)
    assert "building with" not in err and not engines.exists()
