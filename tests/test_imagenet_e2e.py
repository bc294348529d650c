"""An ImageNet DiT end to end on the CPU: DiT-S/2 at 256 px (random weights, in a diffusers folder) ->
`freedit export --vae random:32` -> `freedit generate --model DIR` (sequential and FREE with the
frozen drafter, on ONNX Runtime and torch) -> a PNG grid of 256 x 256 RGB tiles; the decoder's
TensorRT-RTX plan; parity with diffusers' own forward.

``random:32`` is the SD VAE's decoder layout (4 up blocks, mid-block attention, 8x upsampling,
4 latent channels) at a quarter of its width, so CI decodes in a fraction of a second per image; the
full-width ``--vae random`` runs in the slow test below and in benchmarks/imagenet_e2e.py (recorded).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("torch")

from diffusers_models import onnx_vs_diffusers, random_diffusers_dit, save_pipeline_folder  # noqa: E402

from freedit.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def s2(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2_256")
    model = random_diffusers_dit("DiT-S/2", image_size=256, seed=2)
    folder = save_pipeline_folder(root / "DiT-S-2-256", model)
    assert main(["export", "--checkpoint", str(folder), "--vae", "random:32", "--torch-weights", "--out",
                 str(root / "model"), "--quiet"]) == 0
    return model, root / "model"


def test_s2_export_matches_diffusers(s2):
    model, model_dir = s2
    assert onnx_vs_diffusers(model_dir, model, 256) < 1e-4


def _generate(model_dir, out, sampler: str, backend: str) -> dict:
    stats = out / f"{sampler}_{backend}.json"
    assert main(["generate", "--model", str(model_dir), "--classes", '207,"tench"', "--per-class", "1",
                 "--steps", "4", "--cfg-scale", "4", "--sampler", sampler, "--window", "2", "--backend", backend,
                 "--seed", "3", "--out", str(out / f"{sampler}_{backend}.png"), "--samples-dir",
                 str(out / f"{sampler}_{backend}"), "--stats", str(stats), "--no-progress"]) == 0
    return json.loads(stats.read_text())


@pytest.mark.parametrize("sampler", ["sequential", "frozen"])
def test_generate_256px_rgb_grid_same_on_onnxruntime_and_torch(s2, tmp_path, sampler):
    _, model_dir = s2
    runs = {b: _generate(model_dir, tmp_path, sampler, b) for b in ("onnxruntime", "torch")}
    grids = {b: np.asarray(Image.open(tmp_path / f"{sampler}_{b}.png")) for b in runs}
    for b, grid in grids.items():
        assert grid.shape == (257 + 1, 2 * 257 + 1, 3) and grid.dtype == np.uint8  # two 256 x 256 tiles, 1 px apart
        tiles = sorted((tmp_path / f"{sampler}_{b}").glob("*.png"))
        assert [p.name for p in tiles] == ["00000_class207.png", "00001_class0.png"]
        assert all(np.asarray(Image.open(p)).shape == (256, 256, 3) for p in tiles)
        assert grid[1:257, 1:257].std() > 5  # decoded pixels, not a flat or blank tile
        assert runs[b]["summary"]["decode_seconds"] > 0
    if sampler == "frozen":  # drafts were decided, the same way on both backends
        assert runs["torch"]["summary"]["decided"] > 0
        for key in ("accepted", "decided", "residual_proposals"):
            assert runs["onnxruntime"]["summary"][key] == runs["torch"]["summary"][key], key
    a, b = (grids[k].astype(int) for k in ("onnxruntime", "torch"))
    # The two backends' DiT outputs differ by ~1e-6; after sampling and decoding a pixel may round the other way.
    assert np.abs(a - b).max() <= 2 and (a != b).mean() < 1e-3


def test_decoder_plan_builds_with_tensorrt_rtx(s2, tmp_path):
    trt = pytest.importorskip("tensorrt_rtx", reason="the test extra installs tensorrt-rtx-cu13")
    from freedit.engine.directory import open_engines
    from freedit.engine.tensorrt_api import load_tensorrt

    _, model_dir = s2
    engines = tmp_path / "engines"
    assert main(["build", str(model_dir), "--out", str(engines), "--batch-sizes", "2", "--window", "2",
                 "--builder", "tensorrt-rtx", "--no-progress"]) == 0
    m = json.loads((engines / "vae_decoder.plan.json").read_text())
    assert m["graph"] == "vae_decoder" and m["builder"]["version"] == trt.__version__
    assert m["profiles"][0]["rows"] == [1, 2, 2]  # one row per image, up to the batch size
    assert m["profiles"][0]["shapes"]["latent"] == [[1, 4, 32, 32], [2, 4, 32, 32], [2, 4, 32, 32]]
    assert json.loads(m["onnx"]["decoder"])["image_size"] == 256
    assert (engines / "vae_decoder.plan").stat().st_size == m["plan"]["bytes"] > 0
    assert set(open_engines(model_dir, load_tensorrt("tensorrt-rtx"), engines, device_cc=None).plans) == \
        {"dit", "vae_decoder"}


@pytest.mark.gpu
def test_tensorrt_decodes_like_onnxruntime(s2, tmp_path):
    """On a GPU: the plans of `freedit build` (DiT and decoder) make the images ONNX Runtime makes."""
    from freedit.engine.builder import device_compute_capability
    from freedit.runtime.pipeline import Pipeline

    if device_compute_capability() is None:
        pytest.skip("no CUDA GPU: cudaGetDeviceCount found none")
    _, model_dir = s2
    assert main(["build", str(model_dir), "--batch-sizes", "2", "--window", "2", "--no-progress"]) == 0
    trt, ort = Pipeline.from_directory(model_dir, backend="tensorrt"), Pipeline.from_directory(model_dir)
    assert trt.decoder == ort.decoder and trt.backend.max_rows("vae_decoder") == 2
    latents = np.random.default_rng(0).normal(size=(3, 4, 32, 32)).astype(np.float32)
    want, got = (p.backend.run("vae_decoder", {"latent": latents})["image"] for p in (ort, trt))
    np.testing.assert_allclose(got, want, atol=1e-3 * max(1.0, np.abs(want).max()))
    kw = dict(sampler="sequential", steps=4, cfg_scale=4.0, seed=1, decode_batch_size=3)  # 3 > the plan's 2 rows
    a, b = ort.generate([207, 0, 1], **kw), trt.generate([207, 0, 1], **kw)
    assert np.abs(a.images.astype(int) - b.images).max() <= 3


@pytest.mark.slow
def test_full_width_sd_vae_end_to_end(tmp_path):
    """The same with the SD VAE's full-width decoder (`--vae random`): what benchmarks/imagenet_e2e.py records."""
    from freedit.benchmarks.imagenet_e2e import run_e2e

    report = run_e2e(tmp_path, steps=6, images=2)
    assert report["images_equal_within"] <= 2 and report["tile_shape"] == [256, 256, 3]
