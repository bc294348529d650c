"""The runtime Pipeline: parity with a PyTorch reference sampler, determinism, ragged batches, validation."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from freedit.runtime import noise
from freedit.runtime.pipeline import NoDecoderError, Pipeline
from freedit.runtime.schedule import Schedule


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    return Pipeline.from_directory(tiny_model_dir, threads=1)


def test_sequential_ddpm_matches_pytorch_reference(tiny_dit, tiny_pipe):
    """ORT + numpy ops reproduce DiT's own guided DDPM loop (forward_with_cfg) given the same noise."""
    torch = pytest.importorskip("torch")
    from freedit.export.diffusion import TorchSchedule

    labels, seed, scale = np.array([0, 3, 4]), 7, 2.5
    result = tiny_pipe.generate(labels, steps=12, cfg_scale=scale, seed=seed)
    schedule = Schedule.create("12")
    ts = TorchSchedule(schedule)
    n, shape = schedule.num_steps, (4, 8, 8)
    x = torch.from_numpy(noise.normal(seed, np.arange(3), n, noise.Purpose.INIT, shape))
    y = torch.from_numpy(np.concatenate([labels, np.full(3, 5)]))
    with torch.no_grad():
        for i in reversed(range(n)):
            steps = torch.full((3,), i)
            t = torch.full((6,), float(schedule.timesteps[i]))
            out = tiny_dit.forward_with_cfg(torch.cat([x, x]), t, y, scale)[:3]
            mean, log_var = ts.transition(x, out, steps)
            z = torch.from_numpy(noise.normal(seed, np.arange(3), i, noise.Purpose.STEP, shape))
            x = mean + (i > 0) * torch.exp(0.5 * log_var) * z
    np.testing.assert_allclose(result.samples, x.numpy(), atol=2e-4, rtol=1e-4)


def test_same_seed_same_images_whatever_the_batch(tiny_pipe):
    labels = [0, 1, 2, 3, 4, 0, 1]
    a = tiny_pipe.generate(labels, seed=3, batch_size=7)
    b = tiny_pipe.generate(labels, seed=3, batch_size=3)  # ragged: samples join as others finish
    c = tiny_pipe.generate(labels[2:5], seed=3)  # noise is keyed by the sample's index in the request
    np.testing.assert_array_equal(a.samples, b.samples)
    assert not np.array_equal(a.samples[2:5], c.samples)  # different indices => different noise
    d = tiny_pipe.generate(labels, seed=4, batch_size=7)
    assert np.abs(a.samples - d.samples).mean() > 0.1


def test_stats_and_summary(tiny_pipe):
    result = tiny_pipe.generate([1, 2, 3], steps=10, cfg_scale=1.0, batch_size=2)
    assert [s["target_calls"] for s in result.stats] == [10, 10, 10]
    assert [s["label"] for s in result.stats] == [1, 2, 3]
    assert result.summary["nfe_speedup"] == 1.0
    assert result.summary["batched_target_calls"] == 20  # 2 slots: [0,1] for 10 calls, then [2]
    assert all(s["seconds"] > 0 for s in result.stats)
    # The tiny DiT is a latent one (4 channels) without a decoder: latents, never a 4-channel "image".
    assert result.latents.shape == (3, 4, 8, 8) and "decode_seconds" not in result.summary
    with pytest.raises(NoDecoderError, match="export its vae_decoder.onnx"):
        result.images


def test_ddim_is_deterministic_given_the_start(tiny_pipe):
    a = tiny_pipe.generate([0, 1], sampler="ddim", steps=10, seed=1)
    b = tiny_pipe.generate([0, 1], sampler="ddim", steps="ddim10", seed=1)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.settings["num_steps"] == 10


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_labels=[0, 9]), r"unknown class label\(s\) \[9\]"),
    (dict(class_labels=[-1]), r"unknown class label"),
    (dict(class_labels=[]), "no class labels"),
    (dict(class_labels=[0], steps=0), "steps must be between 1 and 1000"),
    (dict(class_labels=[0], steps=-5), "steps must be between 1 and 1000"),
    (dict(class_labels=[0], steps="abc"), "not a step count"),
    (dict(class_labels=[0], cfg_scale=-0.5), "cfg scale must be >= 0"),
    (dict(class_labels=[0], cfg_scale=float("nan")), "cfg scale must be >= 0"),
    (dict(class_labels=[0], batch_size=0), "batch size must be a positive integer"),
    (dict(class_labels=[0], seed=-1), "seed must be an integer"),
    (dict(class_labels=[0], sampler="magic"), "unknown sampler 'magic'"),
])
def test_bad_arguments_fail_before_sampling(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe.generate(**kwargs)


def test_missing_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Pipeline.from_directory(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no dit.onnx"):
        Pipeline.from_directory(tmp_path)


def test_runtime_runs_without_torch(tiny_model_dir, tiny_latent_dir):
    """The runtime must import, sample and decode with torch (and scikit-learn) unavailable."""
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'sklearn', 'scipy', 'safetensors'):
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        from freedit.runtime.pipeline import Pipeline
        from freedit.benchmarks.quality import DigitsClassifier
        r = Pipeline.from_directory({str(tiny_model_dir)!r}).generate([0, 1], steps=5)
        assert r.samples.shape == (2, 4, 8, 8)
        r = Pipeline.from_directory({str(tiny_latent_dir)!r}).generate([207], steps=3)
        assert r.images.shape == (1, 64, 64, 3)
        assert not any(m.split('.')[0] == 'torch' for m in sys.modules)
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
