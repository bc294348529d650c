"""diffusers DiT folders: freedit's export computes what diffusers' own forward computes, and every
folder that does not fit is refused in one line (exit 2) before anything is written.

Folders are built here with random weights and save_pretrained (no network). DiT-S/2's parity runs
in tests/test_imagenet_e2e.py on the export it shares with the end-to-end run.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from diffusers_models import (LABELS, TIMESTEPS, diffusers_forward, onnx_vs_diffusers, random_diffusers_dit,  # noqa: E402
                              random_vae, save_pipeline_folder)

from freedit.cli import main  # noqa: E402
from freedit.export.checkpoint import load_dit  # noqa: E402


def test_dit_b4_export_matches_diffusers(tmp_path):
    model = random_diffusers_dit("DiT-B/4", image_size=256, seed=3)
    folder = save_pipeline_folder(tmp_path / "DiT-B-4", model)
    assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert onnx_vs_diffusers(tmp_path / "out", model, 256) < 1e-4


def test_tiny_folder_in_torch_and_the_older_class_name(tmp_path):
    """freedit's DiT equals diffusers' forward; diffusers' two departures from DiT's models.py matter (the
    parity would fail without them); a config that still says Transformer2DModel (as facebook/DiT-XL-2-256's
    does) loads the same, in freedit and in diffusers (which remaps it to DiTTransformer2DModel)."""
    from dataclasses import replace

    from diffusers import Transformer2DModel

    from freedit.export.dit import DiT

    model = random_diffusers_dit("tiny", image_size=64, seed=5)
    folder = save_pipeline_folder(tmp_path / "tiny", model)
    ours = load_dit(folder)
    assert ours.config.timestep_freq_shift == 1 and ours.config.mlp_norm_eps == 1e-5 and ours.config.num_classes == 1000
    x = torch.randn(len(TIMESTEPS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.from_numpy(TIMESTEPS), torch.from_numpy(LABELS)
    want = diffusers_forward(model, x, t, y)
    with torch.no_grad():
        got, feat = ours(x, t, y)
        assert feat.shape == (len(TIMESTEPS), 16, 32)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        exact = (got - want).abs().max()
        # DiT's 1/128 sinusoid is far off; DiT's eps 1e-6 only a little (unit-scale LayerNorm inputs here).
        for change, off in ((dict(timestep_freq_shift=0), 1e-2), (dict(mlp_norm_eps=1e-6), 1e-6)):
            other = DiT(replace(ours.config, **change)).eval()
            other.load_state_dict(ours.state_dict())
            assert (other(x, t, y)[0] - want).abs().max() > max(off, 4 * exact), change
    config = folder / "transformer" / "config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "_class_name": "Transformer2DModel"}))
    older = Transformer2DModel.from_pretrained(str(folder / "transformer"), low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_dit(folder)(x, t, y)[0], diffusers_forward(older, x, t, y), atol=1e-5, rtol=1e-5)


def _export_fails(capsys, folder, out, *extra) -> str:
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(folder), "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()  # nothing written, not even the folder
    return err


def _edit_config(folder, **changes):
    path = folder / "transformer" / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


@pytest.fixture
def folder(tmp_path):
    return save_pipeline_folder(tmp_path / "src", random_diffusers_dit("tiny", image_size=64))


def test_a_unet_is_not_a_dit(capsys, tmp_path, folder):
    _edit_config(folder, _class_name="UNet2DConditionModel")
    err = _export_fails(capsys, folder, tmp_path / "out")
    assert "_class_name 'UNet2DConditionModel' is not a DiT" in err
    unet_only = tmp_path / "sd"
    (unet_only / "unet").mkdir(parents=True)
    (unet_only / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (unet_only / "model_index.json").write_text("{}")
    assert "has no transformer/config.json (it has unet/: not a DiT pipeline)" in _export_fails(capsys, unet_only, tmp_path / "out")


@pytest.mark.parametrize("changes, message", [
    (dict(num_layers=None), "lacks num_layers: cannot tell the DiT's shape"),
    (dict(patch_size="2"), "patch_size '2' must be positive integers"),
    (dict(activation_fn="geglu"), "activation_fn 'geglu' is not DiT's"),
    (dict(norm_type="ada_norm_single"), "norm_type 'ada_norm_single' is not DiT's"),
    (dict(out_channels=6), "out_channels 6 is neither in_channels 4"),
    # Weights of another shape: the config now says head dim 8, the weights have 16.
    (dict(attention_head_dim=8), r"shape mismatch \d+: pos_embed.proj.weight: checkpoint \(32, 4, 2, 2\) vs config \(16, 4, 2, 2\)"),
    (dict(num_layers=3), r"missing \d+: transformer_blocks.2.norm1.linear.weight"),
])
def test_configs_that_do_not_fit(capsys, tmp_path, folder, changes, message):
    _edit_config(folder, **changes)
    err = _export_fails(capsys, folder, tmp_path / "out")
    assert __import__("re").search(message, err), err


def test_per_block_embedders_must_be_copies(capsys, tmp_path):
    folder = save_pipeline_folder(tmp_path / "src", random_diffusers_dit("tiny", image_size=64, tie_embedders=False))
    err = _export_fails(capsys, folder, tmp_path / "out")
    assert "transformer_blocks.1.norm1.emb" in err and "differs from block 0's copy" in err


def test_a_scheduler_that_is_not_dits(capsys, tmp_path):
    folder = save_pipeline_folder(tmp_path / "src", random_diffusers_dit("tiny", image_size=64),
                                  scheduler={"beta_schedule": "scaled_linear"})
    assert "beta_schedule 'scaled_linear' is not DiT's ('linear')" in _export_fails(capsys, folder, tmp_path / "out")


def test_a_vae_of_other_latent_channels(capsys, tmp_path):
    vae = random_vae(8, latent_channels=8)
    folder = save_pipeline_folder(tmp_path / "src", random_diffusers_dit("tiny", image_size=64), vae)
    err = _export_fails(capsys, folder, tmp_path / "out")  # --vae auto picks up vae/
    assert "the VAE has latent_channels 8, the DiT samples 4-channel latents" in err
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    assert "is not the SD VAE's AutoencoderKL" in _export_fails(capsys, folder, tmp_path / "out")
    assert "random:W takes a base width W" in _export_fails(capsys, folder, tmp_path / "out", "--vae", "random:7")
