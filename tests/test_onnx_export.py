"""ONNX export per the `dit` contract: parity with PyTorch, dynamic batch, metadata, refusal of foreign graphs."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from freedit.export.onnx_export import check_parity, export_dit  # noqa: E402
from freedit.runtime.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from freedit.runtime.contract import CONFIG_METADATA_KEY, ContractError  # noqa: E402


def test_export_matches_pytorch_for_several_batch_sizes(tiny_dit, tiny_model_dir):
    report = check_parity(tiny_dit, tiny_model_dir / "dit.onnx", batches=(1, 2, 7, 16))
    assert report.passed, report.max_abs_error
    assert max(report.max_abs_error.values()) < 1e-5


def test_export_carries_config_and_contract(tiny_dit, tiny_model_dir):
    session = ort.InferenceSession(str(tiny_model_dir / "dit.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta[CONFIG_METADATA_KEY])["hidden_size"] == tiny_dit.config.hidden_size
    assert [i.name for i in session.get_inputs()] == ["x", "t", "y"]
    assert [o.name for o in session.get_outputs()] == ["eps_v", "feat"]
    info = OnnxRuntimeBackend({"dit": tiny_model_dir / "dit.onnx"}).info("dit")
    assert (info.in_channels, info.num_classes, info.cfg_mode) == (4, 5, "reference")


def test_low_opset_is_refused(tiny_dit, tmp_path):
    with pytest.raises(ValueError, match="opset 17"):
        export_dit(tiny_dit, tmp_path / "x.onnx", opset=17)
    assert not list(tmp_path.iterdir())


def _foreign_onnx(path, names=("a", "b", "c")):
    class Other(torch.nn.Module):
        def forward(self, a, b, c):
            return a * 2, b + 1

    torch.onnx.export(Other(), (torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.int64)), str(path),
                      dynamo=True, opset_version=18, input_names=list(names), output_names=["eps_v", "feat"])


def test_foreign_graph_is_refused_by_name(tmp_path):
    _foreign_onnx(tmp_path / "dit.onnx")
    with pytest.raises(ContractError, match="no input named 'x'"):
        OnnxRuntimeBackend({"dit": tmp_path / "dit.onnx"})


def test_graph_without_metadata_is_refused(tmp_path):
    _foreign_onnx(tmp_path / "dit.onnx", names=("x", "t", "y"))
    with pytest.raises(ContractError, match="rank|metadata"):
        OnnxRuntimeBackend({"dit": tmp_path / "dit.onnx"})


def test_garbage_file_is_refused(tmp_path):
    (tmp_path / "dit.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ContractError, match="not a loadable ONNX model"):
        OnnxRuntimeBackend({"dit": tmp_path / "dit.onnx"})


def test_bundled_onnx_matches_bundled_weights(bundled_dir):
    from freedit.export.checkpoint import load_dit

    model = load_dit(bundled_dir / "digits_dit.safetensors")
    report = check_parity(model, bundled_dir / "dit.onnx", batches=(1, 5))
    assert report.passed, report.max_abs_error


def test_exported_graph_runs_ragged_timesteps(tiny_dit, tiny_model_dir, rng):
    """Rows of one call carry their own timesteps (the verifier relies on it)."""
    session = ort.InferenceSession(str(tiny_model_dir / "dit.onnx"))
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    t = np.array([999.0, 500.0, 3.0], dtype=np.float32)
    y = np.array([0, 4, 5])
    together = session.run(["eps_v"], {"x": x, "t": t, "y": y})[0]
    for i in range(3):
        alone = session.run(["eps_v"], {"x": x[i:i + 1], "t": t[i:i + 1], "y": y[i:i + 1]})[0]
        np.testing.assert_allclose(together[i:i + 1], alone, atol=1e-5)
