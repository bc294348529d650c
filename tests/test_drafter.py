"""The drafter across settings: the parent's timestep (`t_feat`) through export, contract, backends and
the round, drafters without it still served, and multi-setting training on a tiny DiT."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from freedit.export.drafter import Drafter, load_drafter, save_drafter  # noqa: E402
from freedit.export.onnx_export import export_drafter  # noqa: E402
from freedit.runtime.backends.base import Backend  # noqa: E402
from freedit.runtime.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from freedit.runtime.contract import ContractError  # noqa: E402
from freedit.runtime.pipeline import Pipeline  # noqa: E402
from freedit.runtime.schedule import Schedule  # noqa: E402


def _timed_drafter(dit, seed: int = 3) -> Drafter:
    """A parent-time drafter whose every weight (the t_feat branch included) is perturbed off its init."""
    torch.manual_seed(seed)
    drafter = Drafter(dit, parent_time=True).eval()
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return drafter


@pytest.fixture(scope="module")
def timed_drafter(tiny_dit):
    return _timed_drafter(tiny_dit)


@pytest.fixture(scope="module")
def timed_dir(tmp_path_factory, tiny_model_dir, timed_drafter):
    folder = tmp_path_factory.mktemp("tiny_free_timed")
    shutil.copy(tiny_model_dir / "dit.onnx", folder / "dit.onnx")
    shutil.copy(tiny_model_dir / "pipeline.json", folder / "pipeline.json")
    assert export_drafter(timed_drafter, folder / "drafter.onnx").passed  # parity with t_feat fed
    return folder


class RecordingBackend(Backend):
    """A real backend whose calls are recorded (the inputs the round feeds each engine)."""

    def __init__(self, inner: Backend):
        self.inner, self.calls, self.name = inner, [], inner.name

    def engines(self):
        return self.inner.engines()

    def info(self, engine):
        return self.inner.info(engine)

    def inputs(self, engine):
        return self.inner.inputs(engine)

    def run(self, engine, inputs):
        self.calls.append((engine, {k: np.array(v) for k, v in inputs.items()}))
        return self.inner.run(engine, inputs)


def test_parent_time_changes_the_draft_and_only_when_asked_for(tiny_dit, timed_drafter):
    g = torch.Generator().manual_seed(0)
    feat, x = torch.randn(3, 4, 32, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, y = torch.tensor([10.0, 400.0, 900.0]), torch.tensor([0, 1, 5])
    with torch.no_grad():
        near, _ = timed_drafter(feat, x, t, y, t + 4)
        far, _ = timed_drafter(feat, x, t, y, t + 40)
    assert (near - far).abs().max() > 1e-3  # the step size reaches the features
    with pytest.raises(ValueError, match="pass t_feat"):
        timed_drafter(feat, x, t, y)
    with pytest.raises(ValueError, match="takes no parent timestep"):
        Drafter(tiny_dit)(feat, x, t, y, t + 4)
    # Untrained, the t_feat branch has no effect: the drafter starts as the single-respacing one.
    fresh, plain = Drafter(tiny_dit, parent_time=True), Drafter(tiny_dit)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(feat, x, t, y, t + 40)[1].numpy(), plain(feat, x, t, y)[1].numpy())


def test_config_round_trips_and_old_drafters_load(tmp_path, tiny_dit, timed_drafter):
    save_drafter(timed_drafter, tmp_path / "d.safetensors")
    loaded = load_drafter(tmp_path / "d.safetensors", tiny_dit)
    assert loaded.config.parent_time and loaded.config == timed_drafter.config
    wide = Drafter(tiny_dit, depth=2, mlp_ratio=8.0)
    save_drafter(wide, tmp_path / "w.safetensors")
    again = load_drafter(tmp_path / "w.safetensors", tiny_dit)
    assert (again.config.depth, again.config.mlp_ratio, again.config.parent_time) == (2, 8.0, False)
    assert again.blocks[0].mlp.fc1.out_features == 8 * tiny_dit.config.hidden_size


def test_exported_drafter_has_t_feat_and_backends_agree(tiny_dit, timed_drafter, timed_dir, tiny_free_dir):
    from freedit.runtime.backends.pytorch import TorchBackend

    ort_backend = OnnxRuntimeBackend({"dit": timed_dir / "dit.onnx", "drafter": timed_dir / "drafter.onnx"})
    assert ort_backend.inputs("drafter") == ("feat", "x", "t", "y", "t_feat")
    assert ort_backend.inputs("dit") == ("x", "t", "y")
    old = OnnxRuntimeBackend({"dit": tiny_free_dir / "dit.onnx", "drafter": tiny_free_dir / "drafter.onnx"})
    assert old.inputs("drafter") == ("feat", "x", "t", "y")  # drafters exported before t_feat
    torch_backend = TorchBackend(tiny_dit, timed_drafter)
    assert torch_backend.inputs("drafter") == ort_backend.inputs("drafter")
    rng = np.random.default_rng(0)
    feed = {"feat": rng.normal(size=(5, 4, 32)).astype(np.float32),
            "x": rng.normal(size=(5, 4, 8, 8)).astype(np.float32),
            "t": np.array([3, 50, 200, 600, 990], np.float32), "y": np.array([0, 1, 2, 3, 5]),
            "t_feat": np.array([7, 90, 240, 640, 999], np.float32)}
    want, got = ort_backend.run("drafter", feed), torch_backend.run("drafter", feed)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=2e-5 * max(1, np.abs(want[name]).max()))


@pytest.mark.parametrize("steps, cfg_scale, guidance", [(20, 2.0, "parent"), (20, 2.0, "drafter"), ("ddim15", 1.0, None)])
def test_round_feeds_the_parent_timestep(timed_dir, steps, cfg_scale, guidance):
    """t_feat of every drafter row = the original timestep one respaced step above the drafted state;
    guided drafts draft null rows only when the guidance is drafted too (draft_guidance "drafter")."""
    inner = OnnxRuntimeBackend({"dit": timed_dir / "dit.onnx", "drafter": timed_dir / "drafter.onnx"}, threads=1)
    backend = RecordingBackend(inner)
    pipe = Pipeline(backend)
    result = pipe.generate([0, 1, 2, 3], sampler="free", steps=steps, cfg_scale=cfg_scale, window=3, seed=1,
                           batch_size=3, draft_guidance=guidance)
    schedule = Schedule.create(result.settings["steps"])
    index = {float(t): i for i, t in enumerate(schedule.timesteps.astype(np.float32))}
    drafts = [inputs for engine, inputs in backend.calls if engine == "drafter"]
    assert drafts and result.summary["drafted"] > 0
    null = pipe.info.null_label
    for inputs in drafts:
        steps_drafted = np.array([index[float(t)] for t in inputs["t"]])
        np.testing.assert_array_equal(inputs["t_feat"], schedule.timesteps[steps_drafted + 1].astype(np.float32))
        if guidance == "drafter":  # [conditional rows; null rows], the same timesteps
            half = len(inputs["t"]) // 2
            assert (inputs["y"][:half] != null).all() and (inputs["y"][half:] == null).all()
            np.testing.assert_array_equal(inputs["t_feat"][:half], inputs["t_feat"][half:])
        else:  # the conditional rows only
            assert (inputs["y"] != null).all()


def test_old_drafter_is_fed_no_t_feat(tiny_free_dir):
    inner = OnnxRuntimeBackend({"dit": tiny_free_dir / "dit.onnx", "drafter": tiny_free_dir / "drafter.onnx"}, threads=1)
    backend = RecordingBackend(inner)
    Pipeline(backend).generate([0, 1], sampler="free", steps=12, window=3, seed=0)
    drafts = [inputs for engine, inputs in backend.calls if engine == "drafter"]
    assert drafts and all(set(inputs) == {"feat", "x", "t", "y"} for inputs in drafts)


def _graph(path, names_and_dtypes):
    class Graph(torch.nn.Module):
        def forward(self, *args):
            return args[0] * 2, args[1] + 1

    shapes = {"feat": (1, 4, 32), "x": (1, 4, 8, 8), "t": (1,), "y": (1,), "t_feat": (1,), "extra": (1,)}
    example = tuple(torch.zeros(shapes[n], dtype=d) for n, d in names_and_dtypes)
    torch.onnx.export(Graph(), example, str(path), dynamo=True, opset_version=18,
                      input_names=[n for n, _ in names_and_dtypes], output_names=["draft_feat", "eps_v"])


@pytest.mark.parametrize("inputs, message", [
    ([("feat", torch.float32), ("x", torch.float32), ("t", torch.float32), ("y", torch.int64),
      ("t_feat", torch.int64)], "input 't_feat' is tensor\\(int64\\) of rank 1, the 'drafter' contract needs tensor\\(float\\)"),
    ([("feat", torch.float32), ("x", torch.float32), ("t", torch.float32), ("y", torch.int64),
      ("extra", torch.float32)], "input\\(s\\) 'extra' are not in the 'drafter' contract"),
])
def test_contract_checks_the_optional_input(tmp_path, inputs, message):
    _graph(tmp_path / "drafter.onnx", inputs)
    with pytest.raises(ContractError, match=message):
        OnnxRuntimeBackend({"drafter": tmp_path / "drafter.onnx"})


def test_training_across_settings(tmp_path, tiny_dit):
    """Two respacings x two CFG scales (one unguided): per-setting trajectories are cached, every
    setting gets its held-out acceptance, and training raises acceptance over the untrained drafter."""
    from freedit.export.train_drafter import DrafterTrainConfig, load_settings, train_drafter

    cfg = DrafterTrainConfig(spacings=("12", "ddim10"), cfg_scales=(1.0, 2.0), trajectories=6, held_out=2,
                             train_steps=200, batch_size=16, settings_per_step=2, divergence="hellinger", threads=1,
                             parent_guidance=True)
    path = train_drafter(tiny_dit, tmp_path, cfg)
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert set(log["held_out_acceptance"]) == {"12@cfg1", "12@cfg2", "ddim10@cfg1", "ddim10@cfg2"}
    for setting in log["held_out_acceptance"].values():
        by_step = setting["drafter"]["by_step"]
        assert 0.0 <= setting["drafter"]["mean"] <= 1.0 and len(by_step) >= 8 and np.isfinite(setting["drafter"]["bins"]).all()
    assert sorted(p.name for p in tmp_path.glob("trajectories_*.pt")) == [
        "trajectories_12_cfg1.pt", "trajectories_12_cfg2.pt", "trajectories_ddim10_cfg1.pt", "trajectories_ddim10_cfg2.pt"]
    # The objective falls on a fixed batch of every setting. (On a random tiny DiT, acceptance is
    # no fair yardstick: the bundled model's card records held-out acceptance per setting.)
    from freedit.export.train_drafter import unrolled_loss

    settings = load_settings(tiny_dit, tmp_path, cfg)  # from the cache this time
    trained = load_drafter(path, tiny_dit)
    assert trained.config.parent_time
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 6, (32,), generator=g), torch.randint(1, s.sched.schedule.num_steps - 1, (32,), generator=g))
               for s in settings]

    def objective(drafter):
        with torch.no_grad():
            return float(sum(unrolled_loss(drafter, s, cfg, m, i0)[0] for s, (m, i0) in zip(settings, batches)))

    before, after = objective(Drafter(tiny_dit, parent_time=True).eval()), objective(trained)
    assert after < 0.8 * before, (before, after)
    both_rows = DrafterTrainConfig(**{**cfg.__dict__, "parent_guidance": False})
    s, (m, i0) = settings[1], batches[1]  # 12@cfg2: the guidance rule changes the guided objective
    assert s.cfg_scale == 2.0
    with torch.no_grad():
        assert float(unrolled_loss(trained, s, both_rows, m, i0)[0]) != pytest.approx(
            float(unrolled_loss(trained, s, cfg, m, i0)[0]), rel=1e-5)

    # The side-by-side benchmark scores drafters on this run's held-out trajectories with the
    # trainer's own measure: it reproduces the trainer's figures for the trained drafter.
    from freedit.benchmarks import drafter_held_out
    from freedit.export.checkpoint import save_dit

    save_dit(tiny_dit, tmp_path / "dit.safetensors")
    save_drafter(Drafter(tiny_dit, parent_time=True).eval(), tmp_path / "untrained.safetensors")
    out = tmp_path / "held_out"
    assert drafter_held_out.main(["--run", str(tmp_path), "--dit", str(tmp_path / "dit.safetensors"), "--threads", "1",
                                  "--drafters", f"trained={path},untrained={tmp_path / 'untrained.safetensors'}",
                                  "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())["settings"]
    for name, setting in log["held_out_acceptance"].items():
        assert report[name]["trained"]["mean"] == pytest.approx(setting["drafter"]["mean"], rel=1e-5)
        assert report[name]["frozen"]["mean"] == pytest.approx(setting["frozen"]["mean"], rel=1e-5)
    assert "| 12@cfg2 |" in out.with_suffix(".md").read_text()


class _OracleDrafter:
    """Drafts the DiT's own features of the state: the drafter no training can beat."""

    def __init__(self, dit):
        self.dit, self.config = dit, type("Config", (), {"parent_time": False})()

    def __call__(self, feat, x, t, y, t_feat=None):
        out, h = self.dit(x, t, y)
        return h, out


def test_cfg_weights_shift_the_draws_and_equal_weights_change_nothing():
    """Weighted draws follow the weights (strong guidance drawn about twice as often as the others),
    equal weights reproduce the unweighted permutation stream bit for bit (drafters trained before
    weights existed retrain identically), and a malformed weight list is refused."""
    import torch

    from freedit.export.train_drafter import DrafterTrainConfig, draw_settings, setting_weights

    assert setting_weights(DrafterTrainConfig(spacings=("25", "50"), cfg_scales=(1.0, 4.0))) is None
    assert setting_weights(DrafterTrainConfig(spacings=("25", "50"), cfg_scales=(1.0, 4.0), cfg_weights=(3, 3))) is None
    weights = setting_weights(DrafterTrainConfig(spacings=("25", "50"), cfg_scales=(1.0, 1.5, 4.0),
                                                 cfg_weights=(1, 1, 2)))
    assert weights.tolist() == [1, 1, 2, 1, 1, 2]  # spacing-major, as load_settings orders the settings
    for bad in [(1, 2), (1, 0, 2), (2, 2)]:  # too few (even if alike), or not positive
        with pytest.raises(ValueError, match="one per CFG scale"):
            setting_weights(DrafterTrainConfig(cfg_scales=(1.0, 1.5, 4.0), cfg_weights=bad))

    a, b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert [draw_settings(6, None, 2, a) for _ in range(50)] == \
        [torch.randperm(6, generator=b)[:2].tolist() for _ in range(50)]

    gen = torch.Generator().manual_seed(1)
    counts = np.zeros(6)
    for _ in range(4000):
        drawn = draw_settings(6, weights, 1, gen)
        assert len(drawn) == 1
        counts[drawn] += 1
    # expected 1000 for the CFG-4 settings, 500 for the others; binomial std ~ 20
    assert np.all(np.abs(counts - 4000 * weights.numpy() / 8) < 120), counts
    pairs = [draw_settings(6, weights, 2, gen) for _ in range(200)]
    assert all(len(set(p)) == 2 for p in pairs)  # distinct settings within one optimizer step


def test_training_pairs_each_state_with_its_own_features(tiny_dit):
    """The trainer's and the held-out report's target at transition i is the DiT's output at the
    state that transition starts from. (It once was the parent's: every drafter learned the wrong
    target and the held-out acceptance scored against it.)"""
    from freedit.export.diffusion import TorchSchedule
    from freedit.export.train_drafter import collect_trajectories, held_out_acceptance, transition_input

    sched = TorchSchedule(Schedule.create("8"))
    traj = collect_trajectories(tiny_dit, sched, 3, 2.0, seed=1)
    m, null = torch.arange(3), tiny_dit.config.num_classes
    with torch.no_grad():
        for i in range(sched.schedule.num_steps):
            x, t, y = transition_input(traj, sched, m, torch.full_like(m, i))
            _, h = tiny_dit(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
            stored = torch.cat([traj.feat[:, i, 0], traj.feat[:, i, 1]]).float()
            assert torch.allclose(h, stored, atol=2e-2 * float(h.abs().max())), i  # stored in fp16
    oracle = held_out_acceptance(tiny_dit, _OracleDrafter(tiny_dit), traj, sched, 2.0)
    frozen = held_out_acceptance(tiny_dit, None, traj, sched, 2.0)
    assert oracle["mean"] > 0.99 and frozen["mean"] < oracle["mean"] - 0.05, (oracle["mean"], frozen["mean"])
