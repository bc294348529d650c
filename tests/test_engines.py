"""Export -> ONNX Runtime parity -> TensorRT-RTX plan, for the digits DiT + drafter and DiT-S/2.

The TensorRT-RTX builder runs here without a GPU (ahead-of-time build), so every plan in these
tests is a real one. What cannot run here is executing a plan; `freedit check` says so.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from freedit.cli import main

pytest.importorskip("torch")
trt_rtx = pytest.importorskip("tensorrt_rtx", reason="the test extra installs tensorrt-rtx-cu13")

from freedit.engine.directory import build_directory, open_engines  # noqa: E402
from freedit.engine.manifest import sha256_files  # noqa: E402
from freedit.runtime.contract import onnx_files  # noqa: E402
from freedit.engine.profiles import BuildSettings  # noqa: E402
from freedit.engine.tensorrt_api import load_tensorrt  # noqa: E402
from freedit.errors import StalePlanError  # noqa: E402


def run_cli(*argv: str) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def rtx():
    trt = load_tensorrt("auto")
    if trt.kind != "tensorrt-rtx":
        pytest.skip("full TensorRT is installed; these tests pin down the TensorRT-RTX path")
    return trt


@pytest.fixture(scope="module")
def s2_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("s2") / "DiT-S-2-random-256.pt"
    assert run_cli("init-checkpoint", "--config", "DiT-S/2", "--image-size", "256", "--out", path) == 0
    return path


def _onnx_meta(path: Path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _check_manifest(plan: Path, onnx_path: Path, precision: str, rows_max: int):
    m = json.loads(plan.with_name(plan.name + ".json").read_text())
    assert m["onnx"]["sha256"] == sha256_files(onnx_files(onnx_path))
    assert m["onnx"]["precision"] == precision
    assert m["plan"]["bytes"] == plan.stat().st_size and m["plan"]["sha256"] == sha256_files([plan])
    assert m["builder"] == {"kind": "tensorrt-rtx", "module": "tensorrt_rtx", "version": trt_rtx.__version__}
    assert m["targets"] == ["80", "86", "89", "120"]
    dynamic = m["profiles"][0]
    assert dynamic["name"] == "dynamic" and dynamic["rows"][2] == rows_max
    for lo, opt, hi in dynamic["shapes"].values():
        assert lo[0] == 1 and hi[0] == rows_max
    return m


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_digits_export_parity_and_rtx_build(tmp_path, precision, rtx):
    out = tmp_path / f"digits_{precision}"
    assert run_cli("export", "--checkpoint", "bundled", "--precision", precision, "--out", out, "--quiet") == 0
    for graph in ("dit", "drafter"):
        assert _onnx_meta(out / f"{graph}.onnx")["freedit.precision"] == precision
    # Parity was checked during export (it refuses to write otherwise); check it again from outside.
    from freedit.export.checkpoint import load_dit
    from freedit.export.onnx_export import check_parity
    from freedit.runtime.pipeline import default_model_dir

    report = check_parity(load_dit(default_model_dir() / "digits_dit.safetensors"), out / "dit.onnx",
                          batches=(1, 5), precision=precision)
    assert report.passed, report.describe()
    if precision == "fp16":
        assert report.max_abs_error["eps_v"] > 1e-6  # the islands really are fp16, not a relabelled fp32 graph
    assert run_cli("build", out, "--batch-sizes", "1,8", "--window", "8", "--static-batches", "1", "--no-progress") == 0
    m = _check_manifest(out / "engines" / "dit.plan", out / "dit.onnx", precision, rows_max=8 * 9 * 2)
    assert [p["rows"] for p in m["profiles"]] == [[1, 144, 144], [2, 2, 2], [18, 18, 18]]
    _check_manifest(out / "engines" / "drafter.plan", out / "drafter.onnx", precision, rows_max=16)
    engines = open_engines(out, rtx, device_cc=None)
    assert set(engines.plans) == {"dit", "drafter"} and engines.settings.window == 8


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_dit_s2_random_export_and_rtx_build(tmp_path, s2_checkpoint, precision, rtx):
    out = tmp_path / f"s2_{precision}"
    assert run_cli("export", "--checkpoint", s2_checkpoint, "--config", "DiT-S/2", "--precision", precision,
                   "--out", out, "--quiet") == 0
    assert json.loads(_onnx_meta(out / "dit.onnx")["freedit.config"])["hidden_size"] == 384
    assert run_cli("build", out, "--batch-sizes", "2", "--window", "4", "--no-progress") == 0
    plan = out / "engines" / "dit.plan"
    _check_manifest(plan, out / "dit.onnx", precision, rows_max=2 * 5 * 2)
    # fp16 weights halve the GEMM weights; the fp32 islands (adaLN etc.) keep it above half.
    if precision == "fp16":
        fp32_equiv = 4 * 33_000_000
        assert plan.stat().st_size < 0.8 * fp32_equiv


def test_up_to_date_plans_are_kept_and_stale_ones_rebuilt(tmp_path, tiny_dit, rtx):
    from freedit.export.onnx_export import export_dit

    export_dit(tiny_dit, tmp_path / "dit.onnx")
    settings = BuildSettings(batch_sizes=(2,), window=3)
    first = build_directory(tmp_path, rtx, settings, progress=False)
    assert [o.action for o in first] == ["built"]
    plan = tmp_path / "engines" / "dit.plan"
    stamp = plan.stat().st_mtime_ns
    assert [o.action for o in build_directory(tmp_path, rtx, settings, progress=False)] == ["up to date"]
    assert plan.stat().st_mtime_ns == stamp
    # New settings: rebuilt, and the reason names the change.
    again = build_directory(tmp_path, rtx, BuildSettings(batch_sizes=(2,), window=5), progress=False)
    assert again[0].action == "rebuilt" and "window 3 -> 5" in again[0].reasons[0]
    # Re-exported ONNX (other weights): the runtime refuses the old plan, the builder rebuilds it.
    import torch

    other = type(tiny_dit)(tiny_dit.config)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0.0, 0.1)
    export_dit(other, tmp_path / "dit.onnx")
    with pytest.raises(StalePlanError, match="dit.onnx changed since the plan was built"):
        open_engines(tmp_path, rtx, device_cc=None)
    rebuilt = build_directory(tmp_path, rtx, BuildSettings(batch_sizes=(2,), window=5), progress=False)
    assert rebuilt[0].action == "rebuilt" and "changed since" in rebuilt[0].reasons[0]
    open_engines(tmp_path, rtx, device_cc=None)


def test_plans_too_small_for_the_request_are_refused_before_sampling(tmp_path, tiny_free_dir, rtx):
    """`freedit build` defaults (batches 1 and 8, window 8) hold 16 drafter rows with CFG; the digits
    model's generate defaults (batch 64, window 8) need 128: a one-line error up front, naming what to
    change, instead of failing at round 2."""
    from freedit.errors import CapacityError
    from freedit.runtime.contract import ModelInfo
    from freedit.runtime.round import RoundSpec, check_capacity

    for name in ("dit.onnx", "drafter.onnx"):
        shutil.copy(tiny_free_dir / name, tmp_path / name)
    build_directory(tmp_path, rtx, BuildSettings(), progress=False)
    rows = open_engines(tmp_path, rtx, device_cc=None).max_rows()
    assert rows == {"dit": 8 * 9 * 2, "drafter": 8 * 2}
    info = ModelInfo(input_size=16, in_channels=1, patch_size=4, hidden_size=96, num_classes=10, learn_sigma=True,
                     cfg_mode="all")
    with pytest.raises(CapacityError, match=r"engine 'dit' holds at most 144 rows, but batch 64 with window 8 needs "
                                            r"1152.*lower --batch-size or --window, or rebuild the plans"):
        check_capacity(rows, RoundSpec(info, slots=64, max_window=8, guided=True, drafter="free"), str(tmp_path))
    check_capacity(rows, RoundSpec(info, slots=8, max_window=8, guided=True, drafter="free"), str(tmp_path))


def test_runtime_refuses_foreign_or_mismatched_plans(tmp_path, tiny_dit, rtx):
    from freedit.export.onnx_export import export_dit

    export_dit(tiny_dit, tmp_path / "dit.onnx")
    build_directory(tmp_path, rtx, BuildSettings(batch_sizes=(1,), window=2), progress=False)
    engines = tmp_path / "engines"
    plan, manifest = engines / "dit.plan", engines / "dit.plan.json"
    # A GPU the plan was not built for (TensorRT-RTX has no SM 9.0 target: an H100).
    with pytest.raises(StalePlanError, match="this GPU is 90"):
        open_engines(tmp_path, rtx, device_cc="90")
    open_engines(tmp_path, rtx, device_cc="89")
    # Another builder version than the one installed.
    original = manifest.read_text()
    data = json.loads(original)
    data["builder"]["version"] = "1.0.0.0"
    manifest.write_text(json.dumps(data))
    with pytest.raises(StalePlanError, match="built by tensorrt-rtx 1.0.0.0"):
        open_engines(tmp_path, rtx, device_cc=None)
    manifest.write_text(original)
    # A plan swapped for another one (same name, no matching manifest).
    good = plan.read_bytes()
    plan.write_bytes(good[: len(good) // 2] + bytes(len(good) - len(good) // 2))
    with pytest.raises(StalePlanError, match="not the plan its manifest describes"):
        open_engines(tmp_path, rtx, device_cc=None)
    plan.write_bytes(good)
    # No manifest at all: foreign.
    manifest.unlink()
    with pytest.raises(StalePlanError, match="has no manifest"):
        open_engines(tmp_path, rtx, device_cc=None)


def test_external_data_export_builds_and_stale_data_is_removed(tmp_path, tiny_dit, rtx):
    from freedit.export.onnx_export import check_parity, export_dit

    export_dit(tiny_dit, tmp_path / "dit.onnx", external_data=True)
    data = tmp_path / "dit.onnx.data"
    assert data.is_file() and data.stat().st_size > (tmp_path / "dit.onnx").stat().st_size
    assert onnx_files(tmp_path / "dit.onnx") == [tmp_path / "dit.onnx", data]
    assert check_parity(tiny_dit, tmp_path / "dit.onnx").passed
    build_directory(tmp_path, rtx, BuildSettings(batch_sizes=(1,), window=1), progress=False)
    # The manifest's checksum covers the weights: changing them makes the plan stale.
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(StalePlanError, match="changed since"):
        open_engines(tmp_path, rtx, device_cc=None)
    # Re-exporting inline drops the now unreferenced .data file and leaves no staging folder.
    export_dit(tiny_dit, tmp_path / "dit.onnx")
    assert not data.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit.onnx", "engines"]


def test_bf16_export_checked_with_the_onnx_reference_and_built(tmp_path, tiny_dit, rtx):
    from freedit.export.onnx_export import export_dit

    report = export_dit(tiny_dit, tmp_path / "dit.onnx", opset=22, precision="bf16")
    assert report.runner == "onnx.reference" and report.passed
    assert max(report.max_abs_error.values()) > 1e-4  # bf16 islands are really there
    build_directory(tmp_path, rtx, BuildSettings(batch_sizes=(1,), window=1), progress=False)
    assert json.loads((tmp_path / "engines" / "dit.plan.json").read_text())["onnx"]["precision"] == "bf16"


def test_opset23_attention_is_built_decomposable(tmp_path, rtx):
    import onnx

    assert run_cli("export", "--checkpoint", "bundled", "--opset", "23", "--out", tmp_path, "--quiet") == 0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "dit.onnx")).graph.node}
    assert "Attention" in ops  # opset 23's native op, which fp32 TensorRT-RTX builds only decomposed
    assert run_cli("build", tmp_path, "--no-progress") == 0


def test_vae_decoder_export_parity(tmp_path):
    pytest.importorskip("diffusers")
    from freedit.export.onnx_export import export_graph
    from freedit.export.vae import SD_VAE_SCALE, load_vae, vae_spec

    # The SD VAE's decoder layout at a quarter of its width: same blocks, a test-sized model.
    vae = load_vae("random", block_out_channels=[32, 64, 64, 64], norm_num_groups=16)
    spec = vae_spec(vae, latent_size=4)
    report = export_graph(spec, tmp_path / "vae_decoder.onnx")
    assert report.passed, report.describe()
    import onnxruntime as ort
    import torch

    latent = np.random.default_rng(0).normal(size=(2, 4, 4, 4)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "vae_decoder.onnx")).run(None, {"latent": latent})[0]
    with torch.no_grad():  # the 1/0.18215 of DiT's sample.py is inside the graph
        want = vae.decode(torch.from_numpy(latent) / SD_VAE_SCALE).sample.numpy()
    assert got.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_check_passes_on_an_export_and_fails_on_a_tampered_one(tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "digits"
    assert run_cli("export", "--checkpoint", "bundled", "--out", out, "--quiet") == 0
    assert run_cli("check", out, "--json", tmp_path / "check.json") == 0
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["passed"] is True
    ran = [p for p in report["pairs"] if not p["skipped"]]
    assert {(p["graph"], p["candidate"]) for p in ran} == {("dit", "onnxruntime"), ("drafter", "onnxruntime")}
    assert all("no CUDA GPU" in p["skipped"] for p in report["pairs"] if p["skipped"])
    assert all(m["max_rel_to_scale"] < 1e-4 for p in ran for m in p["metrics"].values())
    # Scale the final linear's weight by 1.01 (hidden 96 -> patch 4 x 4 x 2 channels): check must notice.
    model = onnx.load(str(out / "dit.onnx"))
    for init in model.graph.initializer:
        if sorted(init.dims) == [32, 96]:
            w = numpy_helper.to_array(init) * 1.01
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
            break
    else:
        pytest.fail("final layer weight not found in the graph")
    onnx.save(model, str(out / "dit.onnx"))
    capsys.readouterr()
    assert run_cli("check", out, "--json", tmp_path / "check.json") == 1
    assert "verdict: FAIL" in capsys.readouterr().out
    dit_pair = next(p for p in json.loads((tmp_path / "check.json").read_text())["pairs"]
                    if p["graph"] == "dit" and not p["skipped"])
    assert dit_pair["passed"] is False


@pytest.mark.slow
def test_dit_xl2_export_with_external_data_and_rtx_fp16_build(tmp_path):
    """What benchmarks/engines_xl.py records: 675M parameters, fp32 > 2 GB -> external data."""
    ckpt = tmp_path / "DiT-XL-2-random-256.pt"
    assert run_cli("init-checkpoint", "--config", "DiT-XL/2", "--out", ckpt) == 0
    out = tmp_path / "xl_fp16"
    for precision, folder in (("fp32", tmp_path / "xl_fp32"), ("fp16", out)):
        assert run_cli("export", "--checkpoint", ckpt, "--config", "DiT-XL/2", "--precision", precision,
                       "--out", folder, "--quiet") == 0
    assert (tmp_path / "xl_fp32" / "dit.onnx.data").stat().st_size > 2 * 10**9
    assert run_cli("build", out, "--no-progress") == 0
    _check_manifest(out / "engines" / "dit.plan", out / "dit.onnx", "fp16", rows_max=8 * 9 * 2)


# -- issue 15, item 10: the engine unit does not trust its own index --------------------------------

def _unit(folder: Path, rtx, dit, drafter_dir: Path | None = None) -> Path:
    """A model folder (tiny DiT, plus the drafter of ``drafter_dir``) with its engines built."""
    import shutil

    from freedit.export.onnx_export import export_dit

    folder.mkdir(exist_ok=True)
    export_dit(dit, folder / "dit.onnx")
    if drafter_dir is not None:
        shutil.copy(drafter_dir / "drafter.onnx", folder / "drafter.onnx")
    build_directory(folder, rtx, BuildSettings(batch_sizes=(1,), window=1), progress=False)
    return folder / "engines"


def _edit_index(engines: Path, edit) -> None:
    index = json.loads((engines / "engines.json").read_text())
    edit(index)
    (engines / "engines.json").write_text(json.dumps(index))


def test_index_records_checksums_of_every_plan_and_manifest(tmp_path, tiny_dit, tiny_free_dir, rtx):
    engines = _unit(tmp_path / "m", rtx, tiny_dit, tiny_free_dir)
    index = json.loads((engines / "engines.json").read_text())
    assert index["format"] == 2 and set(index["graphs"]) == {"dit", "drafter"}
    for graph, entry in index["graphs"].items():
        assert entry["plan"] == f"{graph}.plan"
        assert entry["plan_sha256"] == sha256_files([engines / entry["plan"]])
        assert entry["manifest_sha256"] == sha256_files([engines / f"{graph}.plan.json"])
    assert set(open_engines(tmp_path / "m", rtx, device_cc=None).plans) == {"dit", "drafter"}


def test_index_pointing_outside_the_unit_is_refused(tmp_path, tiny_dit, rtx):
    import shutil

    engines = _unit(tmp_path / "m", rtx, tiny_dit)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("dit.plan", "dit.plan.json"):  # a complete, consistent plan - but not the unit's
        shutil.copy(engines / name, outside / name.replace("dit", "x"))
    _edit_index(engines, lambda i: i["graphs"]["dit"].update(plan="../../outside/x.plan"))
    with pytest.raises(StalePlanError, match="is not a file inside"):
        open_engines(tmp_path / "m", rtx, device_cc=None)
    (engines / "link.plan").symlink_to(outside / "x.plan")  # a plain name that resolves elsewhere
    _edit_index(engines, lambda i: i["graphs"]["dit"].update(plan="link.plan"))
    with pytest.raises(StalePlanError, match="is not a file inside"):
        open_engines(tmp_path / "m", rtx, device_cc=None)


def test_index_without_the_drafter_is_an_incomplete_unit(tmp_path, tiny_dit, tiny_free_dir, rtx):
    engines = _unit(tmp_path / "m", rtx, tiny_dit, tiny_free_dir)
    _edit_index(engines, lambda i: i["graphs"].pop("drafter"))
    with pytest.raises(StalePlanError, match="incomplete unit: no plan for drafter"):
        open_engines(tmp_path / "m", rtx, device_cc=None)


def test_plan_swapped_together_with_a_matching_manifest_is_caught(tmp_path, tiny_dit, rtx):
    """Another model's plan, with a manifest rewritten to describe it and to claim this ONNX: every
    check of the manifest passes; the index's checksums do not."""
    import torch

    engines = _unit(tmp_path / "m", rtx, tiny_dit)
    other = type(tiny_dit)(tiny_dit.config)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0.0, 0.1)
    foreign = _unit(tmp_path / "other", rtx, other)
    manifest = json.loads((engines / "dit.plan.json").read_text())
    plan = (foreign / "dit.plan").read_bytes()
    (engines / "dit.plan").write_bytes(plan)
    manifest["plan"].update(bytes=len(plan), sha256=sha256_files([engines / "dit.plan"]))
    (engines / "dit.plan.json").write_text(json.dumps(manifest))
    with pytest.raises(StalePlanError) as info:
        open_engines(tmp_path / "m", rtx, device_cc=None)
    message = str(info.value)
    assert "dit.plan.json is not the manifest engines.json recorded" in message
    assert "dit.plan is not the plan engines.json recorded" in message
    assert "not the plan its manifest describes" not in message  # the manifest alone would have passed


@pytest.mark.parametrize("edit, needle", [
    (lambda i: i.update(format=None), "index format None"),
    (lambda i: i.update(graphs={"dit": "dit.plan"}), "index format"),  # format 1's layout, relabelled
    (lambda i: i["graphs"]["dit"].pop("plan_sha256"), "not a complete engine index"),
    (lambda i: i["graphs"].update(bogus=i["graphs"]["dit"]), "unknown graph(s) ['bogus']"),
])
def test_malformed_index_is_one_line(tmp_path, tiny_dit, rtx, edit, needle):
    engines = _unit(tmp_path / "m", rtx, tiny_dit)
    if needle == "index format" and "format" in json.loads((engines / "engines.json").read_text()):
        _edit_index(engines, lambda i: i.pop("format"))
    _edit_index(engines, edit)
    with pytest.raises(StalePlanError, match=__import__("re").escape(needle)):
        open_engines(tmp_path / "m", rtx, device_cc=None)


def test_build_with_a_manifest_missing_plan_or_a_corrupted_onnx_is_one_line(tmp_path, tiny_dit, rtx, capfd):
    engines = _unit(tmp_path / "m", rtx, tiny_dit)
    manifest = json.loads((engines / "dit.plan.json").read_text())
    manifest.pop("plan")
    (engines / "dit.plan.json").write_text(json.dumps(manifest))
    capfd.readouterr()
    assert run_cli("build", tmp_path / "m", "--no-progress") == 2
    err = capfd.readouterr().err
    assert "not a complete manifest (plan is missing or not dict)" in err and "Traceback" not in err
    data = (tmp_path / "m" / "dit.onnx").read_bytes()
    (tmp_path / "m" / "dit.onnx").write_bytes(data[: len(data) // 3])
    assert run_cli("build", tmp_path / "m", "--force", "--no-progress") == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("freedit build: error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "is not a readable ONNX file" in errors[0]
