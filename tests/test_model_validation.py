"""Model folders, metadata and checkpoints are checked against the contract before anything is loaded
or allocated (issue 15, items 7, 11 and 12): one line, exit 2, instead of a traceback.

The ONNX files here are the tiny DiT's real export with one thing changed by the `onnx` package
(a metadata field, the batch dimension); checkpoints are real DiT state dicts with one thing changed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from freedit.cli import main  # noqa: E402
from freedit.export.checkpoint import CheckpointError, load_dit, random_dit  # noqa: E402
from freedit.export.dit import DiT, DiTConfig  # noqa: E402
from freedit.runtime.contract import ContractError, ModelInfo  # noqa: E402
from freedit.runtime.pipeline import Pipeline, default_model_dir  # noqa: E402


def one_line(capfd, command: str, rc: int) -> str:
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"freedit {command}: error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err[-3000:])
    return lines[0]


def edited_model(tmp_path, tiny_model_dir, edit) -> str:
    """A model folder whose dit.onnx is the tiny export after ``edit(onnx.ModelProto)``."""
    folder = tmp_path / "model"
    folder.mkdir()
    model = onnx.load(str(tiny_model_dir / "dit.onnx"))
    edit(model)
    onnx.save(model, str(folder / "dit.onnx"))
    shutil.copy(tiny_model_dir / "pipeline.json", folder / "pipeline.json")
    return str(folder)


def set_config(model, **changes) -> None:
    prop = next(p for p in model.metadata_props if p.key == "freedit.config")
    prop.value = json.dumps({**json.loads(prop.value), **changes})


def fixed_batch(model) -> None:
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 2


@pytest.mark.parametrize("edit, needle", [
    (lambda m: set_config(m, num_classes=1000), "a test call of dit with the null label 1000 failed"),
    (lambda m: set_config(m, num_classes="five"), "num_classes must be an integer"),
    (lambda m: set_config(m, num_classes=True), "num_classes must be an integer"),
    (lambda m: set_config(m, hidden_size=64), "'feat' is [batch, 4x32], its metadata (freedit.config) needs "
                                             "[batch, 4x64]"),
    (lambda m: set_config(m, in_channels=3), "'x' is [batch, 4x8x8], its metadata"),
    (lambda m: set_config(m, cfg_mode="some"), "cfg_mode must be one of reference, all"),
    (lambda m: set_config(m, fixed_variance="medium"), "fixed_variance must be one of large, small"),
    (lambda m: set_config(m, input_size=10**9), "input_size must be an integer in [1, 4096]"),
    (fixed_batch, "'x' has a fixed batch dimension 2"),
])
def test_bad_metadata_or_shapes_are_one_line(capfd, tmp_path, tiny_model_dir, edit, needle):
    folder = edited_model(tmp_path, tiny_model_dir, edit)
    capfd.readouterr()
    rc = main(["generate", "--model", folder, "--out", str(tmp_path / "g.png"), "--no-progress", "--classes", "0"])
    assert needle in one_line(capfd, "generate", rc)
    assert not (tmp_path / "g.png").exists()


def test_model_info_defaults_and_refusals():
    base = dict(input_size=8, in_channels=4, patch_size=4, hidden_size=32, num_classes=5, learn_sigma=True,
                cfg_mode="reference")
    assert ModelInfo.from_json(json.dumps(base)).fixed_variance == "large"  # graphs exported before the field
    for bad, needle in (("[1]", "expected a JSON object"), ("{", "not valid JSON"), (json.dumps({"input_size": 8}),
                                                                                      "missing in_channels")):
        with pytest.raises(ContractError, match=needle):
            ModelInfo.from_json(bad)
    with pytest.raises(ContractError, match="not a multiple of patch_size"):
        ModelInfo(**{**base, "input_size": 10})


# -- checkpoints ------------------------------------------------------------------------------------

SMALL = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=3)


def test_checkpoint_metadata_claiming_a_huge_model_never_allocates(tmp_path):
    """A safetensors file whose config says hidden 65536 (16 GiB of weights) over hidden-64 tensors:
    refused from the shapes on the meta device, under an address-space limit 2 GiB above what the
    process maps (the old code allocated the claimed model first)."""
    from safetensors.torch import save_file

    model = random_dit(SMALL)
    path = tmp_path / "liar.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"freedit_config": json.dumps({**SMALL.to_dict(), "hidden_size": 65536, "num_heads": 16})})
    code = ("import resource, sys; from freedit.runtime import budget; import torch; "
            "import freedit.export.checkpoint as c; vm = budget._own_vm_bytes(); "
            "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**31, resource.RLIM_INFINITY)); "
            f"from freedit.cli import main; sys.exit(main(['export', '--checkpoint', {str(path)!r}, '--out', "
            f"{str(tmp_path / 'out')!r}, '--quiet']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not fit DiT config" in proc.stderr and "hidden 65536" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_integer_and_boolean_weights_are_refused(tmp_path):
    state = random_dit(SMALL).state_dict()
    state["pos_embed"] = state["pos_embed"].to(torch.int32)
    state["blocks.0.attn.qkv.bias"] = state["blocks.0.attn.qkv.bias"] > 0
    torch.save(state, tmp_path / "ints.pt")
    with pytest.raises(CheckpointError, match=r"non-floating-point weights: .*pos_embed \(int32\).*bool"):
        load_dit(tmp_path / "ints.pt", SMALL)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ints.safetensors"))
    with pytest.raises(CheckpointError, match="non-floating-point weights"):
        load_dit(tmp_path / "ints.safetensors", SMALL)


def test_head_count_is_taken_from_the_file_or_refused(capfd, tmp_path):
    """Hidden 128 with 4 heads, saved as a bare state dict: the head count is not in the weights. The
    old inference assumed 64-dim heads (2 heads) and exported another function; now it is refused,
    and --num-heads 4 (or a config in the file) gives the model's own outputs."""
    cfg = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=128, depth=2, num_heads=4, num_classes=3)
    model = random_dit(cfg, seed=3)
    torch.save(model.state_dict(), tmp_path / "h128.pt")
    capfd.readouterr()
    rc = main(["export", "--checkpoint", str(tmp_path / "h128.pt"), "--out", str(tmp_path / "out"), "--quiet"])
    assert "cannot tell the number of attention heads" in one_line(capfd, "export", rc)
    assert not (tmp_path / "out").exists()
    assert main(["export", "--checkpoint", str(tmp_path / "h128.pt"), "--num-heads", "4", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / "dit.onnx")).metadata_props}
    assert json.loads(meta["freedit.config"])["num_heads"] == 4
    two_heads = DiT(DiTConfig(**{**cfg.to_dict(), "num_heads": 2}))
    two_heads.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10.0, 500.0]), torch.tensor([0, 3])
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y)[0], two_heads.eval()(x, t, y)[0], atol=1e-4)  # a guess is wrong
    # DiT's train.py checkpoints name their config in args: the heads come from there.
    official = random_dit(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6,
                                    num_classes=1000))
    torch.save({"model": {}, "ema": official.state_dict(), "opt": {},
                "args": argparse.Namespace(model="DiT-S/2", image_size=64)}, tmp_path / "train.pt")
    assert load_dit(tmp_path / "train.pt").config.num_heads == 6


# -- drafters -----------------------------------------------------------------------------------------

def test_export_with_a_truncated_or_mismatched_drafter_is_one_line(capfd, tmp_path):
    import torch as _torch
    from safetensors.torch import save_file

    bundled = default_model_dir()
    data = (bundled / "drafter.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    from safetensors import safe_open

    with safe_open(str(bundled / "drafter.safetensors"), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    deeper = {**meta, "freedit_drafter_config": json.dumps({**json.loads(meta["freedit_drafter_config"]), "depth": 2})}
    save_file(state, str(tmp_path / "deeper.safetensors"), metadata=deeper)
    other = {**meta, "freedit_drafter_config": json.dumps({**json.loads(meta["freedit_drafter_config"]),
                                                           "target_hidden_size": 384})}
    save_file(state, str(tmp_path / "other.safetensors"), metadata=other)
    save_file({k: v.to(_torch.int8) for k, v in state.items()}, str(tmp_path / "int8.safetensors"), metadata=meta)
    save_file(state, str(tmp_path / "nometa.safetensors"), metadata={"freedit_drafter_config": "{bad"})
    cases = {"cut": "not a readable safetensors file", "deeper": "does not fit a depth-2 drafter",
             "other": "was trained for a DiT with hidden size 384", "int8": "non-floating-point weights",
             "nometa": "unreadable 'freedit_drafter_config' metadata"}
    for name, needle in cases.items():
        capfd.readouterr()
        rc = main(["export", "--checkpoint", "bundled", "--drafter", str(tmp_path / f"{name}.safetensors"),
                   "--out", str(tmp_path / f"out_{name}"), "--quiet"])
        assert needle in one_line(capfd, "export", rc), name
        assert not (tmp_path / f"out_{name}").exists()


# -- item 12: the fixed variance of a DiT without learned sigma ---------------------------------------

@pytest.fixture(scope="module")
def fixed_sigma_dirs(tmp_path_factory):
    """A tiny DiT without learned sigma, exported twice: DiT's default ("large") and "small"."""
    from freedit.export.onnx_export import export_dit

    cfg = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3,
                    learn_sigma=False, cfg_mode="all")
    model = random_dit(cfg, seed=5)
    dirs = {}
    for variance in ("large", "small"):
        folder = tmp_path_factory.mktemp(f"fixed_{variance}")
        dit = DiT(DiTConfig(**{**cfg.to_dict(), "fixed_variance": variance}))
        dit.load_state_dict(model.state_dict())
        assert export_dit(dit.eval(), folder / "dit.onnx").passed
        dirs[variance] = folder
    return model, dirs


def test_fixed_variance_is_recorded_and_sampled_with(fixed_sigma_dirs):
    """The variance is in the model folder's metadata, defaults to DiT's large one (log beta), and the
    sequential sampler uses it: equal to DiT's own p_sample loop with that variance, given the noise."""
    from freedit.runtime import noise
    from freedit.runtime.schedule import Schedule

    model, dirs = fixed_sigma_dirs
    assert DiTConfig().fixed_variance == "large"
    results = {}
    for variance, folder in dirs.items():
        pipe = Pipeline.from_directory(folder, threads=1)
        assert pipe.info.fixed_variance == variance and not pipe.info.learn_sigma
        results[variance] = pipe.generate([0, 2], sampler="sequential", steps=8, cfg_scale=1.0, seed=4).samples
    assert np.abs(results["large"] - results["small"]).max() > 1e-3  # the choice matters ...
    s = Schedule.create("8")
    log_var = {"large": np.log(np.append(s.posterior_variance[1], s.betas[1:])), "small": s.posterior_log_variance_clipped}
    for variance in dirs:  # ... and each model is sampled with its own, as DiT's GaussianDiffusion would
        x = noise.normal(4, np.arange(2), 8, noise.Purpose.INIT, (1, 8, 8)).astype(np.float64)
        for i in reversed(range(8)):
            with torch.no_grad():
                eps = model(torch.from_numpy(x).float(), torch.full((2,), float(s.timesteps[i])),
                            torch.tensor([0, 2]))[0].double().numpy()
            x0 = s.sqrt_recip_alphas_cumprod[i] * x - s.sqrt_recipm1_alphas_cumprod[i] * eps
            mean = s.posterior_mean_coef1[i] * x0 + s.posterior_mean_coef2[i] * x
            z = noise.normal(4, np.arange(2), i, noise.Purpose.STEP, (1, 8, 8))
            x = mean + (i > 0) * np.exp(0.5 * log_var[variance][i]) * z
        np.testing.assert_allclose(results[variance], x, atol=2e-4, rtol=1e-4)
