"""Parity checks fail on non-finite outputs (issue 15, item 3).

The graphs here are the tiny DiT's real export with one node appended that multiplies an output by
NaN or inf (everywhere, or in one element): the names and shapes keep the contract, so only the
values are wrong. Python's max() drops NaN, which made such a graph report error 0.0 and pass.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from freedit.cli import main  # noqa: E402
from freedit.export.onnx_export import check_graph_parity, check_parity, dit_spec  # noqa: E402


def poisoned(src, dst, output: str, value: float, everywhere: bool = True):
    """Copy of ``src`` whose ``output`` is multiplied by ``value`` (all elements, or only the first)."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    for node in graph.node:  # the graph keeps computing from the clean value; only the output is poisoned
        node.output[:] = [f"{output}_clean" if o == output else o for o in node.output]
        node.input[:] = [f"{output}_clean" if i == output else i for i in node.input]
    shape = [d.dim_value for d in next(o for o in graph.output if o.name == output).type.tensor_type.shape.dim][1:]
    factor = np.full(shape, value, np.float32) if everywhere else np.ones(shape, np.float32)
    if not everywhere:
        factor.flat[0] = value
    graph.initializer.append(numpy_helper.from_array(factor, "poison"))
    graph.node.append(helper.make_node("Mul", [f"{output}_clean", "poison"], [output]))
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("output, value, everywhere", [
    ("eps_v", float("nan"), True), ("eps_v", float("nan"), False), ("feat", float("inf"), False),
])
def test_check_graph_parity_fails_on_nonfinite(tmp_path, tiny_dit, tiny_model_dir, output, value, everywhere):
    bad = poisoned(tiny_model_dir / "dit.onnx", tmp_path / "dit.onnx", output, value, everywhere)
    report = check_graph_parity(dit_spec(tiny_dit), bad)
    assert not report.passed, report.describe()
    assert report.nonfinite[output] > 0 and report.max_abs_error[output] == float("inf")
    assert "non-finite" in report.describe()
    other = "feat" if output == "eps_v" else "eps_v"
    assert report.nonfinite[other] == 0 and report.max_abs_error[other] < 1e-4  # the clean output still matches
    assert check_parity(tiny_dit, tiny_model_dir / "dit.onnx").passed  # the unpoisoned export passes


def test_polygraphy_comparison_fails_on_nan(tmp_path, tiny_dit, tiny_model_dir):
    from freedit.engine.check import check_onnx

    bad = poisoned(tiny_model_dir / "dit.onnx", tmp_path / "dit.onnx", "eps_v", float("nan"))
    result = check_onnx(dit_spec(tiny_dit), bad, "fp32")
    assert result.passed is False and result.metrics["eps_v"]["nonfinite"] > 0
    assert result.metrics["feat"]["nonfinite"] == 0
    assert check_onnx(dit_spec(tiny_dit), tiny_model_dir / "dit.onnx", "fp32").passed


def test_freedit_check_reports_nan_graph_as_fail(capfd, tmp_path, tiny_dit, tiny_model_dir):
    import json

    from freedit.export.checkpoint import save_dit

    save_dit(tiny_dit, tmp_path / "tiny.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    poisoned(tiny_model_dir / "dit.onnx", model / "dit.onnx", "eps_v", float("nan"))
    capfd.readouterr()
    rc = main(["check", str(model), "--checkpoint", str(tmp_path / "tiny.safetensors"), "--json",
               str(tmp_path / "report.json")])
    out = capfd.readouterr().out
    assert rc == 1 and "dit: onnxruntime vs pytorch: FAIL" in out and "NON-FINITE" in out and "verdict: FAIL" in out
    report = json.loads((tmp_path / "report.json").read_text())  # strict JSON: no NaN tokens
    assert report["passed"] is False and report["pairs"][0]["metrics"]["eps_v"]["nonfinite"] > 0
