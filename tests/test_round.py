"""The FREE round's two maths: the fused kernels (runtime/csrc/round.cu, run here through the
library's host emulation) against the numpy round (runtime/round_numpy.py), op by op on random
workspaces, then end to end on the digits model, with plain launches, CUDA graphs and micro-batches.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from freedit.errors import CapacityError, ModelOutputError
from freedit.runtime import noise, ops
from freedit.runtime.contract import RELAX_SCORES, VERIFIERS, ModelInfo
from freedit.runtime.round import ATTEMPT_SHIFT, RoundSettings, RoundSpec, check_capacity, layout
from freedit.runtime.round_numpy import NumpyRoundMaths
from freedit.runtime.schedule import Schedule

CSRC = Path(__file__).resolve().parents[1] / "runtime" / "csrc"

# C = 4 with the reference CFG mode (3 of 4 channels guided); 2x2 tokens of width 8
INFO = ModelInfo(input_size=4, in_channels=4, patch_size=2, hidden_size=8, num_classes=5, learn_sigma=True,
                 cfg_mode="reference")
FIXED = ModelInfo(input_size=4, in_channels=1, patch_size=2, hidden_size=8, num_classes=5, learn_sigma=False,
                  cfg_mode="all")


@pytest.fixture(scope="module")
def device(emulated_kernels):
    from freedit.runtime.device import Device

    dev = Device(emulated_kernels)
    yield dev
    dev.close()


@pytest.fixture(scope="module")
def device_maths(device):
    from freedit.runtime.round_device import DeviceRoundMaths

    return DeviceRoundMaths(device)


class Pair:
    """The same workspace state in numpy and on the (emulated) device; ops run on both."""

    def __init__(self, device_maths, spec: RoundSpec, settings: RoundSettings, seed: int = 0):
        self.np_maths, self.dev_maths = NumpyRoundMaths(), device_maths
        self.spec, self.settings = spec, settings
        self.a, self.b = self.np_maths.workspace(spec), device_maths.workspace(spec)
        for ws, m in ((self.a, self.np_maths), (self.b, device_maths)):
            m.configure(ws, settings)
            m.reserve_results(ws, 64)
        self.lane = device_maths.lanes(False, timing=False)[0]
        self.rng = np.random.default_rng(seed)

    def host(self, name):
        return self.b[name].host()

    def sync(self):
        """Device buffers <- numpy buffers: each op then starts from identical inputs."""
        for name, arr in self.a.buffers.items():
            if name in self.b.buffers:
                self.host(name)[...] = arr
        self.b.results_buffer.host()[...] = self.a["results"][:len(self.b.results_buffer.host())]

    def run(self, op: str, *args):
        self.sync()
        getattr(self.np_maths, op)(self.a, *args, None)
        getattr(self.dev_maths, op)(self.b, *args, self.lane)
        self.lane.stream.synchronize()

    def random_state(self, steps_high: int):
        S, a = self.spec.slots, self.a
        step = self.rng.integers(-1, steps_high, S)
        step[0] = steps_high - 1  # at least one active slot with a long window
        a["step"][:] = step
        a["has_parent"][:] = self.rng.integers(0, 2, S)
        a["has_parent"][0] = 1
        a["sample"][:] = self.rng.permutation(64)[:S]
        a["label"][:] = self.rng.integers(0, self.spec.info.num_classes, S)
        for name in ("x", "parent_feat", "parent_eps") + (("parent_gap",) if "parent_gap" in a.buffers else ()):
            a[name][...] = self.rng.normal(0, 1, a[name].shape)
        a["parent_eps"][:, self.spec.info.in_channels:] = self.rng.uniform(-1, 1, a["parent_eps"][:, self.spec.info.in_channels:].shape)

    def compare(self, names, rows=None, rtol=0.0, atol=0.0):
        for name in names:
            got, want = self.host(name), self.a[name]
            if rows is not None:
                got, want = got[:rows], want[:rows]
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def _spec(info=INFO, slots=6, window=3, drafter="free", guided=True, fixed="small", parent_guidance=False):
    return RoundSpec(info, slots=slots, max_window=window, guided=guided, drafter=drafter, t_feat=True,
                     fixed_variance=fixed, parent_guidance=parent_guidance)


def _settings(steps="40", window=3, relax=0.0, ddim=False, table=None, seed=123, relax_score="gap", verifier="step"):
    return RoundSettings(Schedule.create(steps), seed=seed, cfg_scale=2.5, window=window,
                         window_schedule=table, relax=relax, ddim=ddim, relax_score=relax_score, verifier=verifier)


def _full_round(p: Pair, frozen=False, nan_row=None, tol=2e-5):
    """plan -> stage -> drafts -> verify -> decide -> commit, compared after every op."""
    S, G, G_draft = p.spec.slots, p.spec.rows_per_state, p.spec.draft_rows_per_state
    p.run("plan")
    p.compare(["window_of", "first_row"])
    R = int(p.a["report"][S, 0])
    assert int(p.host("report")[S, 0]) == R
    p.compare(["row_slot", "row_pos", "row_step"], rows=R)
    w = p.a["window_of"]
    counts = [int((w >= k).sum()) for k in range(1, int(w.max(initial=0)) + 1)]
    for k, n in enumerate(counts, 1):
        np.testing.assert_array_equal(p.host("draft_src")[k - 1, :n], p.a["draft_src"][k - 1, :n])
        if k > 1:
            np.testing.assert_array_equal(p.host("draft_prev")[k - 1, :n], p.a["draft_prev"][k - 1, :n])
    p.run("stage", R)
    p.compare(["v_t", "v_y", "v_x"], rows=G * R)
    n_prev = 0
    for k, n in enumerate(counts, 1):
        if not frozen:
            p.a["d_feat_out"][...] = p.rng.normal(0, 1, p.a["d_feat_out"].shape)
            p.run("draft_inputs", k, n, n_prev)
            p.compare(["d_feat", "d_x", "d_t", "d_y", "d_tfeat"], rows=G_draft * n)
            p.a["d_eps"][...] = p.rng.normal(0, 0.5, p.a["d_eps"].shape)
            p.a["d_eps"][:, p.spec.info.in_channels:] = p.rng.uniform(-1, 1, p.a["d_eps"][:, p.spec.info.in_channels:].shape)
        p.run("draft_step", k, n, R, frozen)
        dst = p.a["draft_src"][k - 1, :n] + 1
        for name in ("mean_p", "log_var_p"):
            np.testing.assert_allclose(p.host(name)[dst], p.a[name][dst], rtol=tol, atol=tol, err_msg=name)
        np.testing.assert_allclose(p.host("v_x")[dst], p.a["v_x"][dst], rtol=tol, atol=tol)
        n_prev = n
    # the target's output: close to the drafts' so that some drafts pass and some are rejected
    v_eps = p.a["v_eps"]
    v_eps[...] = p.rng.normal(0, 0.5, v_eps.shape)
    v_eps[:, p.spec.info.in_channels:] = p.rng.uniform(-1, 1, v_eps[:, p.spec.info.in_channels:].shape)
    if nan_row is not None:
        v_eps[nan_row, 0, 0, 0] = np.nan
    p.a["v_feat"][...] = p.rng.normal(0, 1, p.a["v_feat"].shape)
    p.run("verify", R)
    p.compare(["eps_q", "mean_q", "log_var_q"], rows=R, rtol=tol, atol=tol)
    p.compare(["report"])  # the non-finite flags
    if counts:
        p.run("decide", R)
        draft = np.flatnonzero(p.a["row_pos"][:R] >= 1)
        np.testing.assert_allclose(p.host("log_r")[draft], p.a["log_r"][draft], rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(p.host("uniform")[draft], p.a["uniform"][draft])
        np.testing.assert_allclose(p.host("gamma")[draft], p.a["gamma"][draft], rtol=1e-6)
        # make about half the positions pass: log r around log U (block verification: w_k ~ 1/2 .. 1/8)
        p.a["log_r"][draft] = p.rng.normal(-0.7, 1.0, len(draft)) if p.settings.block else \
            np.log(p.a["uniform"][draft]) + p.rng.normal(0, 1.0, len(draft))
    p.run("commit", R)
    p.compare(["step", "has_parent", "parent_feat", "parent_eps", "report"]
              + (["parent_gap"] if p.spec.parent_guidance else []))
    p.compare(["x"], rtol=tol, atol=tol)
    np.testing.assert_allclose(p.b.results_buffer.host(), p.a["results"][:len(p.b.results_buffer.host())],
                               rtol=tol, atol=tol)
    return p.a["report"][:S]


@pytest.mark.parametrize("trial", range(3))
def test_round_kernels_match_numpy_learned_sigma(device_maths, trial):
    p = Pair(device_maths, _spec(), _settings(), seed=trial)
    p.random_state(40)
    report = _full_round(p)
    live = p.a["window_of"] >= 0
    assert (report[live, 2] > 0).any(), "no residual sampling was exercised"


@pytest.mark.parametrize("verifier", VERIFIERS)
def test_round_kernels_match_numpy_parent_guidance(device_maths, verifier):
    """Guided drafts from the conditional row and the parent's guidance gap: kernels == numpy, and
    numpy's draft is eps_c + (s - 1) gap on the guided channels (the rest from the conditional row)."""
    for info, trial in ((INFO, 0), (INFO, 1), (FIXED, 2)):
        p = Pair(device_maths, _spec(info, parent_guidance=True), _settings(verifier=verifier), seed=20 + trial)
        p.random_state(40)
        assert p.spec.draft_rows_per_state == 1 and p.spec.engine_rows()["drafter"] == p.spec.slots
        _full_round(p)
        assert p.a["has_parent"][p.a["window_of"] >= 0].all()
    # a window of 0 everywhere (adaptive on a CPU): no drafts, yet every commit records the gap
    p = Pair(device_maths, _spec(window=0, parent_guidance=True), _settings(window=0, verifier=verifier), seed=25)
    p.random_state(40)
    _full_round(p)
    # numpy's draft against the formula, on the last Pair's first draft position
    p = Pair(device_maths, _spec(parent_guidance=True), _settings(verifier=verifier), seed=30)
    p.random_state(40)
    p.np_maths.plan(p.a, None)
    n = int((p.a["window_of"] >= 1).sum())
    p.a["d_eps"][...] = p.rng.normal(0, 0.5, p.a["d_eps"].shape)
    p.np_maths.draft_step(p.a, 1, n, int(p.a["report"][p.spec.slots, 0]), False, None)
    src = p.a["draft_src"][0, :n]
    slots, st = p.a["row_slot"][src], p.a["row_step"][src]
    g = ops.guided_channels(INFO.cfg_mode, INFO.in_channels)
    eps = p.a["d_eps"][:n].copy()
    eps[:, :g] += (p.settings.cfg_scale - 1.0) * p.a["parent_gap"][slots, :g]
    mean, _ = ops.transition(p.settings.schedule, p.a["v_x"][src], eps, st, p.spec.fixed_variance)
    np.testing.assert_allclose(p.a["mean_p"][src + 1], mean.reshape(n, -1), rtol=1e-5, atol=1e-5)


def test_round_kernels_match_numpy_fixed_variance_reflection(device_maths):
    for fixed in ("small", "large"):
        p = Pair(device_maths, _spec(FIXED, fixed=fixed), _settings(), seed=7)
        p.random_state(40)
        report = _full_round(p)
        live = p.a["window_of"] >= 0
        assert (report[live, 2] == 0).all()  # equal covariances: reflection, no proposals
        assert (report[live, 1] < p.a["window_of"][live]).any(), "no rejection was exercised"


def test_round_kernels_frozen_relax_unguided_and_window_table(device_maths):
    for score in RELAX_SCORES:  # relax's gamma (compared in _full_round) under each score
        p = Pair(device_maths, _spec(drafter="frozen"), _settings(relax=3.0, relax_score=score), seed=11)
        p.random_state(40)
        _full_round(p, frozen=True)
        draft = np.flatnonzero(p.a["row_pos"][:int(p.a["report"][p.spec.slots, 0])] >= 1)
        assert len(draft) and (p.a["gamma"][draft] < 1).all() and np.ptp(p.a["gamma"][draft]) > 0
    table = np.random.default_rng(0).integers(0, 4, 40)
    p = Pair(device_maths, _spec(guided=False), _settings(table=table, window=0), seed=12)
    p.random_state(40)
    _full_round(p)


def test_round_kernels_sequential_ddim_and_last_steps(device_maths):
    for ddim in (False, True):
        p = Pair(device_maths, _spec(window=0, drafter=None), _settings(steps="ddim20" if ddim else "20", window=0,
                                                                        ddim=ddim), seed=3)
        p.random_state(3)  # steps 0..2: the noiseless last step and finished samples included
        p.a["step"][1] = 0
        report = _full_round(p)
        live = p.a["window_of"] >= 0
        assert (report[live, 0] == p.a["step"][live]).all()
        finished = p.a["sample"][1]  # it took its last step: its state is in the results
        np.testing.assert_allclose(p.b.results_buffer.host()[finished], p.a["x"][1], rtol=2e-5, atol=2e-5)
        assert np.abs(p.a["x"][1]).max() > 0


def test_non_finite_target_output_is_flagged(device_maths):
    p = Pair(device_maths, _spec(), _settings(), seed=5)
    p.random_state(40)
    report = _full_round(p, nan_row=0)
    assert report[p.a["row_slot"][0], 3] & 2


def test_round_constants_match_python(device_maths):
    """round.cu hard-codes the noise purposes, the attempt shift and the residual cap."""
    from freedit.runtime.coupling import MAX_RESIDUAL_ATTEMPTS

    text = (CSRC / "round.cu").read_text()
    consts = dict(re.findall(r"(k[A-Z]\w*) = (\d+)", text.split("kMaxResidualAttempts")[0]))
    for name, purpose in (("kInit", "INIT"), ("kStep", "STEP"), ("kDraft", "DRAFT"), ("kAccept", "ACCEPT"),
                          ("kResidual", "RESIDUAL"), ("kResidualAccept", "RESIDUAL_ACCEPT")):
        assert int(consts[name]) == int(noise.Purpose[purpose]), name
    assert f"kAttemptShift = {ATTEMPT_SHIFT};" in text
    assert "kMaxResidualAttempts = 1 << 20;" in text and MAX_RESIDUAL_ATTEMPTS == 1 << 20


def test_round_kernels_match_numpy_block_verification(device_maths):
    """DESIGN §3.3.1 in round.cu: the weights, the top level, the weighted levels (learned sigma and
    equal covariances alike) and the round-keyed draws, against round_numpy."""
    levels = []
    for trial, (info, fixed) in enumerate([(INFO, "small")] * 3 + [(FIXED, "large")]):
        p = Pair(device_maths, _spec(info, fixed=fixed, window=4), _settings(window=4, verifier="block"),
                 seed=30 + trial)
        p.random_state(40)
        report = _full_round(p)
        live = p.a["window_of"] >= 0
        assert (report[live, 2] > 0).any(), "no level was sampled"
        levels += list(zip(report[live, 1], p.a["window_of"][live]))
    assert any(0 < a < w for a, w in levels) and any(a == w > 0 for a, w in levels) and any(
        a == 0 < w for a, w in levels), levels  # the top, an inner level and level 0 all ended rounds


def test_block_rounds_key_their_draws_by_round_and_step_rounds_do_not():
    """Stream 0 is the plain key (step verification's bits are unchanged); block verification's
    stream (the round's start step + 1) gives every round its own draws of the same transition."""
    plain = noise.normal(7, np.arange(3), 12, noise.Purpose.DRAFT, (4,))
    np.testing.assert_array_equal(noise.normal(7, np.arange(3), 12, noise.Purpose.DRAFT, (4,), 0), plain)
    a = noise.normal(7, np.arange(3), 12, noise.Purpose.DRAFT, (4,), np.array([15, 15, 14]))
    b = noise.normal(7, np.arange(3), 12, noise.Purpose.DRAFT, (4,), 16)
    assert not np.isclose(a, plain).any() and not np.isclose(a, b).any()
    for step, stream in ((1, 1 << 16), (1 << 16, 1)):
        with pytest.raises(ValueError, match="below 2\\*\\*16"):
            noise.uniform(7, [0], step, noise.Purpose.ACCEPT, 1, stream)
    maths = NumpyRoundMaths()
    ws = maths.workspace(_spec())
    ws["step"][:3] = [30, 12, 7]
    for verifier, want in (("step", 0), ("block", [31, 13, 8])):
        maths.configure(ws, RoundSettings(Schedule.create("40"), seed=1, cfg_scale=2.5, window=3, verifier=verifier))
        np.testing.assert_array_equal(maths._stream(ws, np.arange(3)), want)


def test_layout_is_what_the_descriptor_points_at():
    """Every pointer field of the C descriptor that names a workspace buffer exists in the layout."""
    from freedit.runtime.round_device import _POINTERS

    header = (CSRC / "freedit_kernels.h").read_text()
    struct = header[header.index("typedef struct freedit_round"):header.index("} freedit_round;")]
    fields = re.findall(r"\*\s*(\w+);", struct)
    assert tuple(fields) == _POINTERS
    names = set(layout(_spec())) | set(layout(_spec(parent_guidance=True)))
    tables = {"window_table", "table", "timesteps", "ddim_table", "relax_table", "results"}
    assert set(_POINTERS) - tables <= names


# ---- end to end on the digits model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def emulation_found(emulated_build):
    """Pipelines asked for maths="device" without a GPU load the emulation from here."""
    import os

    before = os.environ.get("FREEDIT_KERNELS_EMU_LIB")
    os.environ["FREEDIT_KERNELS_EMU_LIB"] = str(emulated_build.library)
    yield
    if before is None:
        os.environ.pop("FREEDIT_KERNELS_EMU_LIB")
    else:
        os.environ["FREEDIT_KERNELS_EMU_LIB"] = before


@pytest.fixture(scope="module")
def digits(bundled_dir, emulation_found):
    from freedit.runtime.pipeline import Pipeline

    pipe = Pipeline.from_directory(bundled_dir, threads=1)
    yield pipe
    pipe.close()


def _decisions(result):
    return [s.get("accepted") for s in result.stats], [s["target_calls"] for s in result.stats]


@pytest.mark.parametrize("sampler,kw", [("free", {}), ("frozen", {}), ("free-relax", {"relax": 0.5}),
                                        ("free-relax", {"relax": 4.0, "relax_score": "variance"}),
                                        ("free", {"verifier": "block"}), ("frozen", {"verifier": "block"}),
                                        ("sequential", {}), ("ddim", {})])
def test_device_round_equals_numpy_round_on_digits(digits, sampler, kw):
    labels = [3, 1, 4, 1, 5, 9, 2]
    args = dict(sampler=sampler, steps=30, seed=4, batch_size=4, window=4, **kw)
    host = digits.generate(labels, maths="numpy", **args)
    dev = digits.generate(labels, maths="device", graphs=False, **args)
    assert dev.settings["maths"] == "device" and host.settings["maths"] == "numpy"
    assert _decisions(dev) == _decisions(host)
    np.testing.assert_allclose(dev.samples, host.samples, rtol=1e-4, atol=1e-4)


def test_device_round_graphs_and_micro_batches_change_nothing(digits):
    labels = list(range(10))
    args = dict(steps=40, seed=1, window=4)
    plain = digits.generate(labels, maths="device", graphs=False, batch_size=5, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # graphs capture here (ONNX Runtime runs as host nodes): no fallback
        graphed = digits.generate(labels, maths="device", graphs=True, batch_size=5, **args)
    two = digits.generate(labels, maths="device", batch_size=3, micro_batches=2, **args)
    ctx = digits._context
    assert any(g is not None for ws in ctx.workspaces for g in ws.graphs.values()), "no graph was captured"
    np.testing.assert_array_equal(plain.samples, graphed.samples)
    np.testing.assert_array_equal(plain.samples, two.samples)
    assert _decisions(plain) == _decisions(graphed) == _decisions(two)
    assert two.summary["draft_busy_s"] > 0 and two.summary["verify_busy_s"] > 0


def test_failed_capture_falls_back_with_one_warning(digits, monkeypatch):
    from freedit.runtime import round_device

    labels = list(range(6))
    args = dict(steps=30, seed=2, window=3, batch_size=3, maths="device")
    reference = digits.generate(labels, graphs=False, **args)

    ctx = digits._context
    for ws in ctx.workspaces:  # the target engine refuses to be captured, as some backends do
        bound = ws.engines["dit"].bound

        def run(rows, original=bound.run, stream=bound.stream):
            if stream.capturing():
                raise round_device.CaptureUnsupported("this engine refuses capture")
            return original(rows)

        monkeypatch.setattr(bound, "run", run)
    ctx.maths.graphs_enabled = True
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed .*refuses capture.*plain launches") as caught:
        result = digits.generate(labels, graphs=True, **args)
    assert len([w for w in caught if "capture failed" in str(w.message)]) == 1
    np.testing.assert_array_equal(result.samples, reference.samples)


@pytest.mark.parametrize("maths", ["numpy", "device"])
def test_non_finite_model_output_stops_generation_naming_the_step(maths, emulation_found):
    from analytic_model import AnalyticBackend
    from freedit.runtime.pipeline import Pipeline

    class NaNBelow(AnalyticBackend):  # a model that breaks at low noise levels
        def run(self, engine, inputs):
            out = super().run(engine, inputs)
            if engine == "dit" and (inputs["t"] < 300).any():
                out["eps_v"] = np.where((inputs["t"] < 300)[:, None, None, None], np.nan, out["eps_v"])
            return out

    pipe = Pipeline(NaNBelow(), {"steps": "50", "cfg_scale": 2.0, "window": 3})
    with pytest.raises(ModelOutputError, match=r"non-finite values .* at respaced step \d+ \(timestep 2\d\d\)"):
        pipe.generate([0, 1, 2], seed=0, maths=maths)


def test_capacity_is_checked_before_sampling(tmp_path):
    """A plan built with `freedit build` defaults holds 16 drafter rows: batch 64 with window 8
    (the generate defaults of the digits model) needs 128, refused up front with what to change."""
    spec = RoundSpec(INFO, slots=64, max_window=8, guided=True, drafter="free")
    with pytest.raises(CapacityError, match=r"engine 'drafter' holds at most 16 rows, but batch 64 with window 8 "
                                            r"needs 128.*--batch-size or --window.*--batch-sizes/--window"):
        check_capacity({"dit": 2000, "drafter": 16}, spec, "plans")
    check_capacity({"dit": 144, "drafter": 16}, RoundSpec(INFO, slots=8, max_window=8, guided=True, drafter="free"),
                   "plans")


def test_host_overhead_benchmark_schema(emulation_found, tmp_path):
    """A tiny run of `freedit bench --host-overhead`'s measurement: the device path's host work per
    round is a handful of launches and a 20-byte report per slot; the numpy path launches nothing."""
    from freedit.benchmarks import host_overhead

    entries = [host_overhead.measure(path, "digits", 2, 3, rounds=2, graphs=graphs)
               for path, graphs in (("numpy", False), ("device", False), ("device", True))]
    keys = {"path", "host_ms_per_round", "kernel_launches_per_round", "h2d_bytes_per_round", "d2h_bytes_per_round"}
    assert all(keys <= set(e) for e in entries)
    numpy_path, plain, graphed = entries
    assert numpy_path["kernel_launches_per_round"] == 0 and numpy_path["h2d_bytes_per_round"] > 0
    # plan + stage + 3 x (drafter inputs + draft step) + verify + decide + commit
    assert plain["kernel_launches_per_round"] == graphed["kernel_launches_per_round"] == 11
    assert graphed["graph_launches_per_round"] == 2 and plain["graph_launches_per_round"] == 0
    assert plain["d2h_bytes_per_round"] == graphed["d2h_bytes_per_round"] == (2 + 1) * 5 * 4
    assert plain["h2d_bytes_per_round"] == 0
    files = host_overhead.write(entries, tmp_path, "test")
    assert all(p.is_file() for p in files)
    assert json.loads(files[0].read_text())["entries"][1]["path"] == "device"


def test_torch_backend_binds_the_device_round(bundled_dir, emulation_found):
    """The torch backend's bound path on device buffers (host memory in the emulation): the same
    decisions and images as its numpy path."""
    pytest.importorskip("torch")
    from freedit.runtime.pipeline import Pipeline

    pipe = Pipeline.from_directory(bundled_dir, backend="torch", threads=1)
    args = dict(steps=20, seed=6, window=3, batch_size=3)
    host = pipe.generate([0, 5, 8], maths="numpy", **args)
    dev = pipe.generate([0, 5, 8], maths="device", **args)
    assert _decisions(dev) == _decisions(host)
    np.testing.assert_allclose(dev.samples, host.samples, rtol=1e-4, atol=1e-4)
    pipe.close()


def test_device_memory_of_another_gpu_is_refused(emulated_kernels):
    """A device array on the wrong device: one line naming both GPUs, before any launch (the
    emulation reports two devices here; each allocation remembers its device)."""
    from freedit.runtime.device import Device

    emu = emulated_kernels.emulation
    previous = emu.set_device_count(2)
    try:
        on_one = Device(emulated_kernels, device_id=1)
        a = on_one.alloc((2, 8), "float32")
        b = on_one.alloc((2, 8), "float32")
        on_zero = Device(emulated_kernels, device_id=0)  # makes GPU 0 current on this thread
        with pytest.raises(ValueError, match=r"mean: device memory of GPU 1, but the kernels run on GPU 0"):
            emulated_kernels.ddpm_step(a, a, on_zero.alloc((2,), "int32"), b, b)
        on_one.make_current()
        emulated_kernels.ddpm_step(a, a, on_one.alloc((2,), "int32"), b, b)  # same device: accepted
        with pytest.raises(ValueError, match="device 2 does not exist: 2 CUDA device"):
            Device(emulated_kernels, device_id=2)
        on_one.close()
        on_zero.close()
    finally:
        emu.set_device_count(previous)
        emulated_kernels.lib.freedit_rt_set_device(0)
