"""Sizes and types are bounded and checked before any work (issue 15, items 5, 6 and 11).

Every refusal is one line, exit 2 on the CLI, with nothing written; the API raises ValueError
saying what was expected. The memory estimate is checked against what the process may really get:
MemAvailable, and RLIMIT_AS lowered in a subprocess (no mock of the machine).
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys

import pytest

from freedit.cli import main
from freedit.runtime import budget
from freedit.runtime.contract import ContractError
from freedit.runtime.pipeline import Pipeline, default_model_dir


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.default(threads=1)


def refused(capfd, tmp_path, *args) -> str:
    """Run `freedit generate ARGS --out tmp/g.png`: exit 2, one error line (returned), nothing written."""
    capfd.readouterr()
    try:
        rc = main(["generate", "--no-progress", "--out", str(tmp_path / "g.png"), *map(str, args)])
    except SystemExit as exc:  # argparse's refusals (one line too, see OneLineParser)
        rc = exc.code
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("freedit generate: error: "), (rc, err)
    assert "Traceback" not in err and not out and not list(tmp_path.iterdir())
    return lines[0]


# -- item 5: sizes bounded before any work --------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--per-class", "1000000000"], "--per-class: value must be an integer >= 1 and <= 1,000,000"),
    (["--classes", "0-1000000000"], "asks for 8,000,000,008 images; at most 1,000,000"),
    (["--classes", "0-9", "--per-class", "200000"], "asks for 2,000,000 images"),
    (["--scale", "100000"], "--scale: value must be an integer >= 1 and <= 64"),
    (["--scale", "0"], "--scale: value must be an integer >= 1"),
    (["--scale", "-4"], "--scale: value must be an integer >= 1"),
    (["--threads", "1000000"], "--threads: value must be an integer >= 1 and <= 256"),
    (["--threads", "0"], "--threads: value must be an integer >= 1"),
    (["--window", "65"], "window length L must be an integer >= 1 and <= 64"),
    (["--batch-size", "1000000"], "batch size must be an integer >= 1 and <= 65,536"),
    (["--seed", str(2**64)], "seed must be an integer >= 0"),
])
def test_cli_sizes_out_of_bounds(capfd, tmp_path, args, needle):
    assert needle in refused(capfd, tmp_path, *args)


def test_help_states_the_bounds():
    out = subprocess.run([sys.executable, "-m", "freedit", "generate", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    for bound in ("1..1,000,000", "1..64", "0..100", "1..256", "1..65,536", "at most 1,000,000 images"):
        assert bound in out, bound


def test_memory_beyond_the_machine_is_refused_before_sampling(capfd, tmp_path):
    """1,000,000 digits at 64x: terabytes of grid. Refused with the estimate, before any step."""
    line = refused(capfd, tmp_path, "--classes", "0-9", "--per-class", "100000", "--scale", "64")
    assert "needs about" in line and "GiB available" in line


LOW_LIMIT = """\
import resource, sys
from freedit.runtime import budget
vm = budget._own_vm_bytes()
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[1]), resource.RLIM_INFINITY))
from freedit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_memory_estimate_honours_the_address_space_limit(tmp_path):
    """1000 digits at 64x need a few GiB: fine here, refused up front under RLIMIT_AS = VmSize + 1 GiB."""
    args = ["generate", "--classes", "0-9", "--per-class", "100", "--scale", "64", "--steps", "3", "--no-progress",
            "--out", str(tmp_path / "g.png")]
    need = budget.sampling_bytes(Pipeline.default(threads=1).info, 1000, 3, 64, 8, True) + \
        budget.image_output_bytes(1000, 16, 16, 1, 64, False)
    have = budget.available_bytes()
    if have is None or need + budget.SLACK_BYTES > have:
        pytest.skip(f"this machine cannot hold {need / 2**30:.1f} GiB even without a limit")
    proc = subprocess.run([sys.executable, "-c", LOW_LIMIT, str(2**30), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "needs about" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_available_bytes_reads_meminfo_and_rlimit():
    have = budget.available_bytes()
    meminfo = budget._meminfo("MemAvailable")
    assert have is not None and meminfo is not None and 0 < have <= meminfo
    code = ("import resource; from freedit.runtime import budget; vm = budget._own_vm_bytes(); "
            "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**28, resource.RLIM_INFINITY)); "
            "print(budget.available_bytes(), flush=True)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 0 < int(out.stdout) <= 2**28


def test_api_sizes_out_of_bounds(pipe, tiny_model_dir):
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        Pipeline.from_directory(tiny_model_dir, threads=0)
    with pytest.raises(ValueError, match="threads must be an integer >= 1 and <= 256"):
        Pipeline.from_directory(tiny_model_dir, threads=1_000_000)
    with pytest.raises(ValueError, match="at most 1,000,000 class labels"):
        pipe.validate([0] * 1_000_001, "sequential", 10, 1.0, 0, 64)
    with pytest.raises(budget.MemoryBudgetError, match="needs about"):
        pipe.validate([0] * 1_000_000, "free", 1000, 1.5, 0, 65_536, window=64, extra_bytes=2**50)


# -- item 6: the CFG scale is bounded everywhere ------------------------------------------------

def test_cfg_scale_beyond_the_bound(capfd, tmp_path, pipe):
    assert "cfg scale must be >= 0 and <= 100" in refused(capfd, tmp_path, "--cfg-scale", "1e39")
    assert "cfg scale must be >= 0 and <= 100" in refused(capfd, tmp_path, "--cfg-scale", "100.5")
    with pytest.raises(ValueError, match="cfg scale must be >= 0 and <= 100"):
        pipe.generate([1], steps=3, cfg_scale=1e39)
    assert pipe.generate([1], steps=3, cfg_scale=100.0).settings["cfg_scale"] == 100.0  # the bound itself is fine


@pytest.mark.parametrize("defaults, needle", [
    ({"cfg_scale": 1e39}, "'cfg_scale': cfg scale must be >= 0 and <= 100"),
    ({"cfg_scale": "1.5"}, "'cfg_scale': cfg scale must be >= 0"),
    ({"batch_size": True}, "'batch_size': batch size must be an integer"),
    ({"steps": ""}, "'steps': steps must be a positive step count"),
    ({"window": 2.5}, "'window': window length L must be an integer"),
    ({"sampler": ["free"]}, "'sampler': must be one of"),
    ({"relax": -1}, "'relax': relax lambda must be >= 0"),
    ({"checkpoints": {"dit": "../../elsewhere/dit.safetensors"}}, "not a plain file name inside the model folder"),
    ({"checkpoints": "dit.safetensors"}, "'checkpoints': must be an object of file names"),
    ({"cfg": 1.5}, "unknown key(s) ['cfg']"),
    ([1, 2], "must hold a JSON object of defaults, got list"),
])
def test_pipeline_json_is_checked_against_its_schema(tmp_path, tiny_model_dir, defaults, needle):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(tiny_model_dir / "dit.onnx", model / "dit.onnx")
    (model / "pipeline.json").write_text(json.dumps(defaults))
    with pytest.raises(ContractError) as info:
        Pipeline.from_directory(model)
    assert needle in str(info.value) and "pipeline.json" in str(info.value)


def test_pipeline_json_deeply_nested_or_huge(capfd, tmp_path, tiny_model_dir):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(tiny_model_dir / "dit.onnx", model / "dit.onnx")
    (model / "pipeline.json").write_text("[" * 100_000 + "]" * 100_000)
    capfd.readouterr()
    assert main(["generate", "--model", str(model), "--out", str(tmp_path / "g.png"), "--no-progress"]) == 2
    err = capfd.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (model / "pipeline.json").write_text(json.dumps({"steps": 20, "pad": "x" * (2 << 20)}))
    with pytest.raises(ContractError, match="at most 1,048,576 bytes"):
        Pipeline.from_directory(model)


# -- item 11: strict types ------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--steps", ""], "expected a step count such as 250"),
    (["--steps", "   "], "expected a step count such as 250"),
    (["--steps", "٢٥٠"], "expected a step count such as 250"),
    (["--classes", "٣"], "expected integers (digits 0-9)"),
    (["--classes", "1,٣"], "expected integers (digits 0-9)"),
    (["--per-class", "٣"], "expected an integer written with the digits 0-9"),
    (["--per-class", "1_0"], "expected an integer written with the digits 0-9"),
    (["--seed", "٧"], "expected an integer written with the digits 0-9"),
    (["--cfg-scale", "nan"], "expected a finite decimal number"),
    (["--cfg-scale", "inf"], "expected a finite decimal number"),
    (["--cfg-scale", "1_5"], "expected a finite decimal number"),
    (["--relax", "1e999"], "beyond the range of a float"),
    (["--classes", "5-3"], "is empty"),
])
def test_cli_refuses_lax_values(capfd, tmp_path, args, needle):
    assert needle in refused(capfd, tmp_path, *args)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(batch_size=True), "batch size must be a positive integer"),
    (dict(batch_size=2.0), "batch size must be a positive integer"),
    (dict(cfg_scale=True), "cfg scale must be >= 0"),
    (dict(cfg_scale="1.5"), "cfg scale must be >= 0"),
    (dict(window=True), "window length L must be an integer"),
    (dict(seed=True), "seed must be an integer"),
    (dict(sampler="free-relax", relax="2"), "relax lambda must be >= 0"),
    (dict(steps=""), "steps must be a positive step count"),
    (dict(steps="٢٥٠"), "ASCII digits"),
    (dict(steps=250.0), "steps must be a positive step count"),
    (dict(class_labels=[True, False]), "class labels must be integers"),
    (dict(class_labels=[1, 2.0]), "class labels must be integers"),
])
def test_api_refuses_lax_types(pipe, kwargs, needle):
    kwargs = {"class_labels": [1], "steps": 3, **kwargs}
    with pytest.raises(ValueError, match=needle):
        pipe.generate(**kwargs)


def test_numpy_integers_are_still_integers(pipe):
    import numpy as np

    result = pipe.generate(np.array([1, 2]), steps=np.int64(3), batch_size=np.int32(2), seed=np.uint64(5),
                           cfg_scale=np.float32(1.5))
    assert result.settings["batch_size"] == 2 and len(result.images) == 2
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # no test left a limit behind
    assert default_model_dir().is_dir()
