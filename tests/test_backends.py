"""Every backend behind the one interface drives the same samplers (DESIGN §5).

ONNX Runtime (session.run and I/O binding) and PyTorch run here on the CPU; the CUDA variants and
TensorRT need a GPU: here they must refuse with one clear error, and their GPU tests skip.
"""
from __future__ import annotations

import numpy as np
import pytest

from freedit.errors import BackendUnavailable
from freedit.runtime.backends.onnxruntime import OnnxRuntimeBackend
from freedit.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")


def _random_inputs(info, rows: int, seed: int, feat: bool = False, t_feat: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {"x": rng.normal(size=(rows, info.in_channels, info.input_size, info.input_size)).astype(np.float32),
              "t": rng.integers(0, 1000, rows).astype(np.float32),
              "y": rng.integers(0, info.num_classes + 1, rows).astype(np.int64)}
    if feat:
        inputs = {"feat": rng.normal(size=(rows, info.num_tokens, info.hidden_size)).astype(np.float32), **inputs}
    if t_feat:  # a drafter that takes its input features' timestep (one respaced step above t)
        inputs["t_feat"] = np.minimum(inputs["t"] + rng.integers(1, 50, rows), 999).astype(np.float32)
    return inputs


def _engine_inputs(backend, engine: str, rows: int, seed: int) -> dict[str, np.ndarray]:
    return _random_inputs(backend.info("dit"), rows, seed, feat=engine == "drafter",
                          t_feat="t_feat" in backend.inputs(engine))


@pytest.fixture(scope="module")
def ort_pipe(bundled_dir):
    return Pipeline.from_directory(bundled_dir, threads=2)


@pytest.fixture(scope="module")
def torch_pipe(bundled_dir):
    return Pipeline.from_directory(bundled_dir, backend="torch", threads=2)


def test_torch_backend_matches_onnxruntime_per_call(ort_pipe, torch_pipe):
    for engine in ("dit", "drafter"):
        inputs = _engine_inputs(ort_pipe.backend, engine, 7, seed=3)
        want = ort_pipe.backend.run(engine, inputs)
        got = torch_pipe.backend.run(engine, inputs)
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], atol=2e-5 * max(1, np.abs(want[name]).max()))


def test_io_binding_path_equals_session_run(bundled_dir):
    files = {"dit": bundled_dir / "dit.onnx", "drafter": bundled_dir / "drafter.onnx"}
    plain = OnnxRuntimeBackend(files, threads=1)
    bound = OnnxRuntimeBackend(files, threads=1, io_binding=True)
    for engine in ("dit", "drafter"):
        inputs = _engine_inputs(plain, engine, 5, seed=11)
        want, got = plain.run(engine, inputs), bound.run(engine, inputs)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("sampler", ["sequential", "free"])
def test_samplers_give_the_same_images_on_torch_and_onnxruntime(ort_pipe, torch_pipe, sampler):
    """Same seed, same sampler code, two backends whose outputs differ by ~1e-6: same images. A
    FREE accept decision could in principle flip on such a difference; at most one sample may."""
    labels = [0, 1, 2, 3, 4, 5, 6, 7]
    kw = dict(sampler=sampler, steps=25, seed=5, batch_size=4)
    a, b = ort_pipe.generate(labels, **kw), torch_pipe.generate(labels, **kw)
    assert b.settings["backend"] == "torch-cpu"
    close = [np.allclose(x, y, atol=1e-3) for x, y in zip(a.samples, b.samples)]
    assert sum(close) >= (len(labels) if sampler == "sequential" else len(labels) - 1), close
    if sampler == "free":
        assert [s["target_calls"] for s in a.stats] == pytest.approx([s["target_calls"] for s in b.stats], abs=1)


def test_torch_backend_is_deterministic(torch_pipe):
    kw = dict(sampler="free", steps=20, seed=9, batch_size=3)
    first, second = torch_pipe.generate([3, 1, 4], **kw), torch_pipe.generate([3, 1, 4], **kw)
    np.testing.assert_array_equal(first.samples, second.samples)


def test_gpu_backends_refuse_cleanly_without_a_gpu(bundled_dir):
    from freedit.engine.builder import device_compute_capability

    if device_compute_capability() is not None:
        pytest.skip("this machine has a GPU; the refusal path is for machines without one")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailable, match="no CUDA execution provider"):
            Pipeline.from_directory(bundled_dir, backend="onnxruntime-cuda")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="torch sees no CUDA GPU"):
            Pipeline.from_directory(bundled_dir, backend="torch-cuda")
    with pytest.raises(BackendUnavailable, match="needs an NVIDIA GPU"):
        Pipeline.from_directory(bundled_dir, backend="tensorrt")


def test_unknown_backend_and_missing_weights_are_refused(bundled_dir, tiny_model_dir):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        Pipeline.from_directory(bundled_dir, backend="cuda")
    with pytest.raises(FileNotFoundError, match="torch backend needs the DiT weights"):
        Pipeline.from_directory(tiny_model_dir, backend="torch")


@pytest.mark.slow
def test_torch_compiled_backend_matches_eager(bundled_dir, torch_pipe):
    compiled = Pipeline.from_directory(bundled_dir, backend="torch-compiled", threads=2)
    inputs = _random_inputs(torch_pipe.info, 6, seed=2)
    want, got = torch_pipe.backend.run("dit", inputs), compiled.backend.run("dit", inputs)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["onnxruntime-cuda", "torch-cuda", "torch-cuda-compiled"])
def test_gpu_backend_matches_cpu(bundled_dir, ort_pipe, backend):
    from freedit.engine.builder import device_compute_capability

    if device_compute_capability() is None:
        pytest.skip("no CUDA GPU: cudaGetDeviceCount found none")
    try:
        pipe = Pipeline.from_directory(bundled_dir, backend=backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    for engine in ("dit", "drafter"):
        inputs = _engine_inputs(ort_pipe.backend, engine, 9, seed=4)
        want, got = ort_pipe.backend.run(engine, inputs), pipe.backend.run(engine, inputs)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-3 * max(1, np.abs(want[name]).max()))


def test_bound_session_makes_one_binding_per_row_count(bundled_dir):
    """The round binds its buffers once; ONNX Runtime keeps one I/O binding per row count over them
    (no per-call binding or output allocation) and writes into the bound memory."""
    backend = OnnxRuntimeBackend({"dit": bundled_dir / "dit.onnx"}, threads=1)
    info = backend.info("dit")
    big = _random_inputs(info, 8, seed=5)
    outputs = {"eps_v": np.zeros((8, info.out_channels, info.input_size, info.input_size), np.float32),
               "feat": np.zeros((8, info.num_tokens, info.hidden_size), np.float32)}
    bound = backend.bind("dit", big, outputs, lane=None)
    for rows in (3, 5, 3, 8, 5):
        outputs["eps_v"][:] = np.nan
        bound.run(rows)
        want = backend.run("dit", {k: v[:rows] for k, v in big.items()})
        for name in want:
            np.testing.assert_array_equal(outputs[name][:rows], want[name])
        assert np.isnan(outputs["eps_v"][rows:]).all()  # rows past the call are untouched
    assert sorted(bound.bindings) == [3, 5, 8]


def test_torch_precision_is_selectable_and_stated(bundled_dir, torch_pipe):
    bf16 = Pipeline.from_directory(bundled_dir, backend="torch", threads=2, precision="bf16")
    assert bf16.backend.name == "torch-cpu-bf16" and bf16.backend.precision == "bf16"
    inputs = _random_inputs(bf16.info, 4, seed=1)
    want, got = torch_pipe.backend.run("dit", inputs), bf16.backend.run("dit", inputs)
    err = np.abs(got["eps_v"] - want["eps_v"]).max() / np.abs(want["eps_v"]).max()
    assert 1e-5 < err < 5e-2, err  # bf16 matrix multiplies: close to fp32, not equal
    result = bf16.generate([1, 2], sampler="sequential", steps=10, seed=0)
    assert result.settings["precision"] == "bf16"
    assert torch_pipe.generate([1], sampler="sequential", steps=5).settings["precision"] == "fp32"
    with pytest.raises(ValueError, match="chooses the torch backends' precision"):
        Pipeline.from_directory(bundled_dir, precision="bf16")
    with pytest.raises(ValueError, match="unknown torch precision"):
        Pipeline.from_directory(bundled_dir, backend="torch", precision="fp8")


def test_tensorrt_context_calls_are_checked():
    """set_input_shape's result is checked (a plan cannot execute without a GPU here: the context is a
    stand-in answering as TensorRT does for a shape outside the profile)."""
    from freedit.runtime.backends import tensorrt as trt_backend

    class Context:
        def __init__(self):
            self.calls = []

        def set_input_shape(self, name, shape):
            self.calls.append((name, shape))
            return shape[0] <= 4

    class TRT:
        @staticmethod
        def describe():
            return "TensorRT-RTX (stand-in)"

    engine = object.__new__(trt_backend._Engine)
    engine.context, engine.trt, engine.profile = Context(), TRT(), 0
    engine.set_shapes({"x": (4, 1, 16, 16)})
    with pytest.raises(RuntimeError, match=r"input 'x' cannot take shape \(5, 1, 16, 16\)"):
        engine.set_shapes({"x": (5, 1, 16, 16)})
