"""Latent DiTs give images: the model directory's vae_decoder runs after sampling, in micro-batches,
on the DiT's backend; without a decoder the CLI says so (or saves latents); the diffusers-shaped
entry point sits on Pipeline."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from freedit.runtime.contract import ContractError, DecoderInfo
from freedit.runtime.decode import decode_latents
from freedit.runtime.pipeline import NoDecoderError, Pipeline

pytest.importorskip("diffusers")


class RowLog:
    """The real backend, with a record of the row count of every decoder call."""

    def __init__(self, backend):
        self.backend, self.rows = backend, []

    def max_rows(self, engine):
        return self.backend.max_rows(engine)

    def run(self, engine, inputs):
        self.rows.append(len(inputs["latent"]))
        return self.backend.run(engine, inputs)


@pytest.fixture(scope="module")
def pipe(tiny_latent_dir):
    return Pipeline.from_directory(tiny_latent_dir, threads=1)


def test_latent_dit_gives_rgb_images_and_keeps_latents(pipe, tiny_latent_dir):
    assert pipe.latent and pipe.decoder == DecoderInfo(latent_channels=4, latent_size=8, image_size=64,
                                                       scaling_factor=0.18215)
    result = pipe.generate([207, 0, 999], sampler="sequential", steps=6, seed=1, decode_batch_size=2)
    assert result.images.dtype == np.uint8 and result.images.shape == (3, 64, 64, 3)
    assert result.latents is result.samples and result.latents.shape == (3, 4, 8, 8)
    assert result.summary["decode_batch_size"] == 2 and result.summary["decode_seconds"] > 0
    # The images are the decoder's output for exactly these latents, whatever the micro-batch.
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_latent_dir / "vae_decoder.onnx"))
    want = session.run(["image"], {"latent": result.latents})[0]
    expected = np.clip((want + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(result.images, expected)
    assert result.images.std() > 5  # random weights still give varied pixels, not a flat image
    skipped = pipe.generate([207, 0, 999], sampler="sequential", steps=6, seed=1, decode=False)
    np.testing.assert_array_equal(skipped.latents, result.latents)
    with pytest.raises(NoDecoderError, match="latent DiT without a decoded image"):
        skipped.images


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_decoding_is_micro_batched_and_batch_independent(pipe, batch):
    latents = np.random.default_rng(0).normal(size=(5, 4, 8, 8)).astype(np.float32)
    log = RowLog(pipe.backend)
    images = decode_latents(log, latents, batch)
    assert max(log.rows) <= batch and sum(log.rows) == 5
    np.testing.assert_array_equal(images, decode_latents(pipe.backend, latents, 5))
    with pytest.raises(ValueError, match="decode batch size must be a positive integer"):
        decode_latents(pipe.backend, latents, 0)


def test_torch_backend_decodes_like_onnxruntime(pipe, tiny_latent_dir):
    pytest.importorskip("torch")
    torch_pipe = Pipeline.from_directory(tiny_latent_dir, backend="torch", threads=1)
    assert torch_pipe.decoder == pipe.decoder
    latents = np.random.default_rng(1).normal(size=(3, 4, 8, 8)).astype(np.float32)
    a, b = pipe.backend.run("vae_decoder", {"latent": latents}), torch_pipe.backend.run("vae_decoder", {"latent": latents})
    np.testing.assert_allclose(b["image"], a["image"], atol=1e-4 * max(1.0, np.abs(a["image"]).max()))


def test_decoder_for_other_latents_is_refused(tmp_path, tiny_latent_dir):
    from freedit.export.onnx_export import export_graph
    from freedit.export.vae import load_vae, vae_spec

    folder = tmp_path / "m"
    shutil.copytree(tiny_latent_dir, folder, ignore=shutil.ignore_patterns("vae_decoder.onnx", "vae"))
    export_graph(vae_spec(load_vae("random:8"), latent_size=4), folder / "vae_decoder.onnx", check=False)
    with pytest.raises(ContractError, match="vae_decoder.onnx does not fit this DiT .latent size 4 vs 8 in the DiT"):
        Pipeline.from_directory(folder)


def test_latent_model_without_decoder_cli(tmp_path, tiny_latent_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_latent_dir, folder, ignore=shutil.ignore_patterns("vae_decoder.onnx", "vae"))
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "freedit", "generate", "--model", str(folder), "--steps", "4", "--classes", "1,2",
           "--per-class", "1", "--out", str(out / "g.png"), "--no-progress"]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "latent DiT exported without vae_decoder.onnx" in bad.stderr and "--latents" in bad.stderr
    assert not list(out.iterdir())
    good = subprocess.run(cmd + ["--latents", str(out / "z.npy")], capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert sorted(p.name for p in out.iterdir()) == ["z.npy"]  # latents only: there are no images to write
    assert np.load(out / "z.npy").shape == (2, 4, 8, 8)


def test_cli_writes_rgb_grid_and_latents_of_a_latent_model(tmp_path, tiny_latent_dir):
    cmd = [sys.executable, "-m", "freedit", "generate", "--model", str(tiny_latent_dir), "--steps", "4",
           "--classes", "207,tench", "--per-class", "2", "--out", str(tmp_path / "g.png"), "--latents",
           str(tmp_path / "z.npy"), "--samples-dir", str(tmp_path / "each"), "--decode-batch-size", "3",
           "--stats", str(tmp_path / "s.json"), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "decoded in" in out.stdout
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 65 + 1, 2 * 65 + 1, 3)  # 64 px tiles, not upscaled (--scale 1 above 64 px)
    tiles = sorted((tmp_path / "each").glob("*.png"))
    assert [p.name for p in tiles] == ["00000_class207.png", "00001_class207.png", "00002_class0.png", "00003_class0.png"]
    assert np.asarray(Image.open(tiles[0])).shape == (64, 64, 3)
    assert np.load(tmp_path / "z.npy").shape == (4, 4, 8, 8)
    assert json.loads((tmp_path / "s.json").read_text())["summary"]["decode_batch_size"] == 3


def test_diffusers_shaped_entry_point(tiny_latent_dir, pipe):
    from freedit.runtime.dit_pipeline import DiTPipeline

    dit = DiTPipeline.from_pretrained(tiny_latent_dir, threads=1)
    assert dit.labels["golden retriever"] == 207 and "crane" not in dit.labels  # two classes are called crane
    assert dit.get_label_ids(["golden retriever", "tench"]) == [207, 0]
    kw = dict(guidance_scale=3.0, num_inference_steps=5)
    out = dit(class_labels=[207, "tench"], generator=11, **kw)
    assert out.seed == 11 and [im.size for im in out.images] == [(64, 64)] * 2 and out.images[0].mode == "RGB"
    # The same images as Pipeline.generate with the mapped arguments: the entry point adds no sampler of its own.
    same = pipe.generate([207, 0], steps=5, cfg_scale=3.0, seed=11)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in out.images]), same.images)
    assert out.result.settings["cfg_scale"] == 3.0 and out.result.settings["sampler"] == "sequential"

    class Generator:  # what diffusers users pass: torch.Generator().manual_seed(11)
        def initial_seed(self):
            return 11

    as_np = dit([207, 0], generator=Generator(), output_type="np", **kw).images
    assert as_np.dtype == np.float32 and as_np.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(as_np, same.images / 255.0, atol=1e-7)
    (latents,) = dit([207, 0], generator=11, output_type="latent", return_dict=False, **kw)
    np.testing.assert_array_equal(latents, same.latents)
    fresh = dit([1], num_inference_steps=2)
    assert isinstance(fresh.seed, int) and 0 <= fresh.seed < 2**63
    for bad, message in ((dict(output_type="pt"), "output_type must be one of"),
                         (dict(generator=[1, 2]), "give one generator or seed"),
                         (dict(class_labels=["golden retreiver"]), "close matches: 'golden retriever' .207.")):
        with pytest.raises(ValueError, match=message):
            dit(**{"class_labels": [1], **bad, "num_inference_steps": 2})
