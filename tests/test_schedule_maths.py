"""Schedule, transition, CFG and noise maths pinned to independently written reference formulas.

The references below are written from the maths of facebookresearch/DiT's ``gaussian_diffusion.py``
and ``respace.py`` (derived from openai/guided-diffusion), in the plainest loop form, so that a
slip in ``freedit.runtime`` (vectorised numpy) or ``freedit.export.diffusion`` (torch) shows up.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from freedit.runtime import noise as rng
from freedit.runtime.ops import cfg_combine, ddim_step, ddpm_step, guided_channels, transition
from freedit.runtime.schedule import Schedule, linear_betas, space_timesteps

T = 1000
SPACINGS = ["250", "100", "50", "25", "10", "1000", "10,15,20", "ddim50", "ddim25", "ddim10"]


# --------------------------------------------------------------------------------------------
# Reference maths (scalar Python, float64)
# --------------------------------------------------------------------------------------------
def ref_linear_betas(n: int = T) -> list[float]:
    scale = 1000.0 / n
    start, end = scale * 0.0001, scale * 0.02
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def ref_space_timesteps(n: int, spacing: str) -> list[int]:
    """DiT's respace.space_timesteps: fractional strides accumulated step by step, then rounded."""
    if spacing.startswith("ddim"):
        desired = int(spacing[4:])
        for stride in range(1, n):
            if len(range(0, n, stride)) == desired:
                return list(range(0, n, stride))
        raise ValueError("impossible")
    counts = [int(c) for c in spacing.split(",")]
    size_per, extra = n // len(counts), n % len(counts)
    start, taken = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        assert size >= count
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            taken.append(start + round(cur))
            cur += frac_stride
        start += size
    return sorted(set(taken))


def ref_alphas_cumprod(betas: list[float]) -> list[float]:
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return out


def ref_respaced_betas(spacing: str | None) -> tuple[list[float], list[int]]:
    base = ref_linear_betas()
    if spacing is None:
        return base, list(range(T))
    use = set(ref_space_timesteps(T, spacing))
    last, betas, kept = 1.0, [], []
    for t, abar in enumerate(ref_alphas_cumprod(base)):
        if t in use:
            betas.append(1.0 - abar / last)
            last = abar
            kept.append(t)
    return betas, kept


class RefCoefs:
    """GaussianDiffusion.__init__'s derived arrays, one scalar at a time."""

    def __init__(self, betas: list[float]):
        n = len(betas)
        self.betas = betas
        self.abar = ref_alphas_cumprod(betas)
        self.abar_prev = [1.0] + self.abar[:-1]
        self.sqrt_recip = [math.sqrt(1.0 / a) for a in self.abar]
        self.sqrt_recipm1 = [math.sqrt(1.0 / a - 1.0) for a in self.abar]
        self.post_var = [betas[i] * (1.0 - self.abar_prev[i]) / (1.0 - self.abar[i]) for i in range(n)]
        self.post_logvar_clipped = [math.log(self.post_var[1] if i == 0 else self.post_var[i]) for i in range(n)]
        self.coef1 = [betas[i] * math.sqrt(self.abar_prev[i]) / (1.0 - self.abar[i]) for i in range(n)]
        self.coef2 = [(1.0 - self.abar_prev[i]) * math.sqrt(1.0 - betas[i]) / (1.0 - self.abar[i]) for i in range(n)]
        self.log_betas = [math.log(b) for b in betas]
        # ADM "fixed large": the posterior variance at step 0, beta elsewhere.
        self.large_logvar = [math.log(self.post_var[1] if i == 0 else betas[i]) for i in range(n)]


def ref_p_mean_variance(c: RefCoefs, x, eps, v, steps, fixed="small"):
    """p_mean_variance for eps prediction, row by row (each row its own step)."""
    means, logvars, x0s = [], [], []
    for row in range(x.shape[0]):
        i = int(steps[row])
        x0 = c.sqrt_recip[i] * x[row] - c.sqrt_recipm1[i] * eps[row]
        mean = c.coef1[i] * x0 + c.coef2[i] * x[row]
        if v is not None:
            frac = (v[row] + 1.0) / 2.0
            logvar = frac * c.log_betas[i] + (1.0 - frac) * c.post_logvar_clipped[i]
        elif fixed == "small":
            logvar = np.full(x[row].shape, c.post_logvar_clipped[i])
        else:
            logvar = np.full(x[row].shape, c.large_logvar[i])
        means.append(mean)
        logvars.append(logvar)
        x0s.append(x0)
    return np.stack(means), np.stack(logvars), np.stack(x0s)


def ref_ddim(c: RefCoefs, x, eps, steps, eta, z):
    out = []
    for row in range(x.shape[0]):
        i = int(steps[row])
        x0 = c.sqrt_recip[i] * x[row] - c.sqrt_recipm1[i] * eps[row]
        e = (c.sqrt_recip[i] * x[row] - x0) / c.sqrt_recipm1[i]
        a, ap = c.abar[i], c.abar_prev[i]
        sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
        sample = x0 * math.sqrt(ap) + math.sqrt(1 - ap - sigma**2) * e
        if i != 0:
            sample = sample + sigma * z[row]
        out.append(sample)
    return np.stack(out)


def ragged_steps(n_steps: int, rows: int, rng_: np.random.Generator) -> np.ndarray:
    """Per-row step indices, always including the first and last step."""
    steps = rng_.integers(0, n_steps, size=rows)
    steps[0], steps[1] = 0, n_steps - 1
    if n_steps > 2:
        steps[2] = 1
    return steps


# --------------------------------------------------------------------------------------------
# Betas and respacing
# --------------------------------------------------------------------------------------------
def test_linear_betas_match_dit():
    betas = linear_betas()
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and betas[-1] == pytest.approx(0.02, rel=1e-15)
    np.testing.assert_allclose(betas, ref_linear_betas(), rtol=1e-13, atol=0)
    assert np.all(np.diff(betas) > 0)
    # ADM scales the endpoints by 1000 / T for other chain lengths.
    np.testing.assert_allclose(linear_betas(500), ref_linear_betas(500), rtol=1e-13)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_space_timesteps_matches_dit_rule(spacing):
    kept = space_timesteps(T, spacing)
    assert kept == ref_space_timesteps(T, spacing)
    assert kept == sorted(set(kept)) and kept[0] == 0
    if spacing.startswith("ddim"):
        assert len(kept) == int(spacing[4:])
    elif "," not in spacing:
        assert len(kept) == int(spacing) and kept[-1] == T - 1


def test_space_timesteps_known_values():
    assert space_timesteps(T, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(T, "ddim10") == list(range(0, 1000, 100))
    assert space_timesteps(T, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(T, "1000") == list(range(1000))
    # Sections of 334, 333, 333 timesteps; 10, 15 and 20 steps inside them.
    kept = space_timesteps(T, "10,15,20")
    assert len(kept) == 45 and kept[:2] == [0, 37] and kept[9] == 333 and kept[10] == 334 and kept[-1] == 999
    assert space_timesteps(T, 250) == space_timesteps(T, "250") == space_timesteps(T, " 250 ")


# Exact .5 ties: DiT accumulates the stride then rounds (e.g. "21" keeps 499, not 500).
@pytest.mark.parametrize("spacing", ["21", "23", "999", "259,72,145"])
def test_space_timesteps_ties_match_dit_accumulation(spacing):
    assert space_timesteps(T, spacing) == ref_space_timesteps(T, spacing)


@pytest.mark.parametrize("spacing, fragment", [
    ("0", "at least 1"),
    ("-3", "at least 1"),
    ("abc", "'abc'"),
    ("10,x", "'10,x'"),
    ("ddimabc", "'ddimabc'"),
    ("ddim0", "at least 1"),
    ("ddim999", "exactly 999"),
    ("ddim1", "exactly 1"),
    ("2000", "2000"),
    ("10,500,10", "500"),
])
def test_space_timesteps_errors(spacing, fragment):
    with pytest.raises(ValueError) as info:
        space_timesteps(T, spacing)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------------------------
# Respaced coefficients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", [None, *SPACINGS])
def test_respaced_coefficients_match_reference(spacing):
    sched = Schedule.create(spacing)
    betas, kept = ref_respaced_betas(spacing)
    ref = RefCoefs(betas)
    assert sched.num_steps == len(betas)
    np.testing.assert_array_equal(sched.timesteps, kept)
    rtol = 1e-11
    np.testing.assert_allclose(sched.betas, ref.betas, rtol=rtol)
    np.testing.assert_allclose(sched.alphas_cumprod, ref.abar, rtol=rtol)
    np.testing.assert_allclose(sched.alphas_cumprod_prev, ref.abar_prev, rtol=rtol)
    np.testing.assert_allclose(sched.sqrt_recip_alphas_cumprod, ref.sqrt_recip, rtol=rtol)
    np.testing.assert_allclose(sched.sqrt_recipm1_alphas_cumprod, ref.sqrt_recipm1, rtol=rtol)
    np.testing.assert_allclose(sched.posterior_variance, ref.post_var, rtol=rtol)
    np.testing.assert_allclose(sched.posterior_log_variance_clipped, ref.post_logvar_clipped, rtol=rtol)
    np.testing.assert_allclose(sched.posterior_mean_coef1, ref.coef1, rtol=rtol)
    np.testing.assert_allclose(sched.posterior_mean_coef2, ref.coef2, rtol=rtol)
    np.testing.assert_allclose(sched.log_betas, ref.log_betas, rtol=rtol)
    # The respaced chain hits the base chain's alpha-bar exactly at the kept timesteps.
    base_abar = ref_alphas_cumprod(ref_linear_betas())
    np.testing.assert_allclose(sched.alphas_cumprod, [base_abar[t] for t in kept], rtol=1e-10)
    assert sched.posterior_variance[0] == 0.0


def test_full_respacing_equals_base_chain():
    np.testing.assert_allclose(Schedule.create("1000").betas, Schedule.create().betas, rtol=1e-10)
    np.testing.assert_array_equal(Schedule.create("").betas, linear_betas())


@pytest.mark.parametrize("spacing", [None, "250", "ddim25", "10,15,20"])
def test_transition_table_columns(spacing):
    s = Schedule.create(spacing)
    table = s.transition_table()
    assert table.shape == (s.num_steps, 6) and table.dtype == np.float64
    named = [s.sqrt_recip_alphas_cumprod, s.sqrt_recipm1_alphas_cumprod, s.posterior_mean_coef1,
             s.posterior_mean_coef2, s.posterior_log_variance_clipped, s.log_betas]
    for j, column in enumerate(named):
        np.testing.assert_array_equal(table[:, j], column)


# --------------------------------------------------------------------------------------------
# Transitions (numpy)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", [None, "250", "50", "10", "ddim25", "10,15,20"])
def test_learned_range_transition_ragged(spacing):
    sched = Schedule.create(spacing)
    ref = RefCoefs(ref_respaced_betas(spacing)[0])
    g = np.random.default_rng(7)
    rows, c = 7, 4
    steps = ragged_steps(sched.num_steps, rows, g)
    x = g.standard_normal((rows, c, 4, 4)).astype(np.float32)
    eps_v = np.concatenate([g.standard_normal((rows, c, 4, 4)), g.uniform(-1.2, 1.2, (rows, c, 4, 4))], axis=1)
    eps_v = eps_v.astype(np.float32)
    mean, log_var = transition(sched, x, eps_v, steps)
    ref_mean, ref_logvar, _ = ref_p_mean_variance(ref, x.astype(np.float64), eps_v[:, :c].astype(np.float64),
                                                  eps_v[:, c:].astype(np.float64), steps)
    assert mean.dtype == np.float32 and log_var.dtype == np.float32
    assert mean.shape == x.shape and log_var.shape == x.shape
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_var, ref_logvar, rtol=1e-5, atol=1e-5)
    # Each row alone gives the same answer as inside the ragged batch.
    for row in range(rows):
        m1, lv1 = transition(sched, x[row:row + 1], eps_v[row:row + 1], steps[row:row + 1])
        np.testing.assert_array_equal(m1[0], mean[row])
        np.testing.assert_array_equal(lv1[0], log_var[row])


@pytest.mark.parametrize("fixed", ["small", "large"])
@pytest.mark.parametrize("spacing", [None, "250", "ddim10"])
def test_fixed_variance_transition(fixed, spacing):
    sched = Schedule.create(spacing)
    ref = RefCoefs(ref_respaced_betas(spacing)[0])
    g = np.random.default_rng(3)
    rows = 6
    steps = ragged_steps(sched.num_steps, rows, g)
    x = g.standard_normal((rows, 3, 5, 5)).astype(np.float32)
    eps = g.standard_normal((rows, 3, 5, 5)).astype(np.float32)
    mean, log_var = transition(sched, x, eps, steps, fixed_variance=fixed)
    ref_mean, ref_logvar, _ = ref_p_mean_variance(ref, x.astype(np.float64), eps.astype(np.float64), None, steps,
                                                  fixed=fixed)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_var, ref_logvar, rtol=1e-6, atol=1e-6)
    assert log_var.shape == x.shape


def test_transition_rejects_unknown_fixed_variance():
    sched = Schedule.create("10")
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="small"):
        transition(sched, x, x, np.array([3]), fixed_variance="medium")


def test_ddpm_step_adds_no_noise_at_step_zero():
    g = np.random.default_rng(11)
    mean = g.standard_normal((4, 4, 3, 3)).astype(np.float32)
    log_var = g.uniform(-8, -1, (4, 4, 3, 3)).astype(np.float32)
    z = g.standard_normal((4, 4, 3, 3)).astype(np.float32)
    steps = np.array([0, 5, 0, 1])
    out = ddpm_step(mean, log_var, steps, z)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], mean[0])
    np.testing.assert_array_equal(out[2], mean[2])
    for row in (1, 3):
        ref = mean[row].astype(np.float64) + np.exp(0.5 * log_var[row].astype(np.float64)) * z[row]
        np.testing.assert_allclose(out[row], ref, rtol=1e-6, atol=1e-6)
        assert not np.allclose(out[row], mean[row])


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["ddim50", "ddim10", "250", "10,15,20"])
def test_ddim_step_matches_reference(eta, spacing):
    sched = Schedule.create(spacing)
    ref = RefCoefs(ref_respaced_betas(spacing)[0])
    g = np.random.default_rng(5)
    rows, c = 6, 4
    steps = ragged_steps(sched.num_steps, rows, g)
    x = g.standard_normal((rows, c, 4, 4)).astype(np.float32)
    eps_v = g.standard_normal((rows, 2 * c, 4, 4)).astype(np.float32)  # v is ignored by DDIM
    z = g.standard_normal((rows, c, 4, 4)).astype(np.float32)
    out = ddim_step(sched, x, eps_v, steps, noise=z if eta > 0 else None, eta=eta)
    expected = ref_ddim(ref, x.astype(np.float64), eps_v[:, :c].astype(np.float64), steps, eta, z.astype(np.float64))
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # At step 0 DDIM returns the predicted x0, whatever eta.
    _, _, x0 = ref_p_mean_variance(ref, x.astype(np.float64), eps_v[:, :c].astype(np.float64), None, steps)
    np.testing.assert_allclose(out[0], x0[0], rtol=1e-5, atol=1e-5)


def test_ddim_eta_needs_noise():
    sched = Schedule.create("ddim10")
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(sched, x, x, np.array([3]), noise=None, eta=0.5)


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------
def ref_cfg_row(cond_row, uncond_row, scale, guided):
    out = cond_row.astype(np.float64).copy()
    for ch in range(guided):
        out[ch] = uncond_row[ch] + scale * (cond_row[ch] - uncond_row[ch])
    return out


@pytest.mark.parametrize("mode, guided", [("reference", 3), ("all", 4)])
def test_cfg_combine_channels(mode, guided):
    g = np.random.default_rng(2)
    cond = g.standard_normal((3, 8, 4, 4)).astype(np.float32)
    uncond = g.standard_normal((3, 8, 4, 4)).astype(np.float32)
    scale = 4.0
    out = cfg_combine(cond, uncond, scale, channels=4, mode=mode)
    assert out.shape == cond.shape and out.dtype == np.float32
    for row in range(3):
        np.testing.assert_allclose(out[row], ref_cfg_row(cond[row], uncond[row], scale, guided), rtol=1e-6, atol=1e-6)
    # Unguided eps channels and all of v are the conditional row's, bit for bit.
    np.testing.assert_array_equal(out[:, guided:], cond[:, guided:])
    assert not np.allclose(out[:, :guided], cond[:, :guided])
    # Inputs are untouched.
    assert not np.shares_memory(out, cond)


def test_cfg_combine_scale_one_is_conditional_and_bad_mode_rejected():
    g = np.random.default_rng(4)
    cond = g.standard_normal((2, 8, 2, 2)).astype(np.float32)
    uncond = g.standard_normal((2, 8, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(cfg_combine(cond, uncond, 1.0, 4, "all"), cond, atol=1e-6)
    assert guided_channels("reference", 4) == 3 and guided_channels("all", 4) == 4
    assert guided_channels("reference", 2) == 2
    with pytest.raises(ValueError, match="reference"):
        cfg_combine(cond, uncond, 2.0, 4, "some")


@pytest.mark.parametrize("mode", ["reference", "all"])
def test_cfg_combine_matches_forward_with_cfg(mode):
    from freedit.export.dit import DiT, DiTConfig

    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                    num_classes=10, learn_sigma=True, cfg_mode=mode)
    model = DiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    b = 3
    x_half = torch.randn(b, 4, 8, 8)
    x = torch.cat([x_half, torch.randn(b, 4, 8, 8)])  # DiT ignores the second half's x
    t = torch.tensor([999, 500, 3] * 2)
    y = torch.tensor([1, 7, 2, 10, 10, 10])  # conditional half, then the null label
    scale = 4.0
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, scale).numpy()
        out, _ = model(torch.cat([x_half, x_half]), t, y)
    out = out.numpy()
    cond, uncond = out[:b], out[b:]
    ours = cfg_combine(cond, uncond, scale, channels=4, mode=mode)
    assert guided.shape == (2 * b, 8, 8, 8)
    np.testing.assert_allclose(ours, guided[:b], rtol=1e-5, atol=1e-5)
    g = 3 if mode == "reference" else 4
    # DiT's layout: both halves carry the guided eps; the rest stays per row.
    np.testing.assert_allclose(guided[b:, :g], guided[:b, :g], rtol=0, atol=0)
    np.testing.assert_array_equal(guided[b:, g:], uncond[:, g:])
    for row in range(b):
        np.testing.assert_allclose(guided[row], ref_cfg_row(cond[row], uncond[row], scale, g), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Torch transition / posterior / q_sample
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", [None, "250", "ddim25"])
def test_torch_schedule_matches_numpy(spacing):
    from freedit.export.diffusion import TorchSchedule

    sched = Schedule.create(spacing)
    ref = RefCoefs(ref_respaced_betas(spacing)[0])
    ts = TorchSchedule(sched)
    np.testing.assert_array_equal(ts.timesteps.numpy(), sched.timesteps.astype(np.float32))
    g = np.random.default_rng(9)
    rows, c = 7, 4
    steps = ragged_steps(sched.num_steps, rows, g)
    x = g.standard_normal((rows, c, 4, 4)).astype(np.float32)
    x0 = g.standard_normal((rows, c, 4, 4)).astype(np.float32)
    z = g.standard_normal((rows, c, 4, 4)).astype(np.float32)
    eps_v = np.concatenate([g.standard_normal((rows, c, 4, 4)), g.uniform(-1, 1, (rows, c, 4, 4))], 1)
    eps_v = eps_v.astype(np.float32)
    st = torch.from_numpy(steps)

    mean_t, logvar_t = ts.transition(torch.from_numpy(x), torch.from_numpy(eps_v), st)
    mean_n, logvar_n = transition(sched, x, eps_v, steps)
    np.testing.assert_allclose(mean_t.numpy(), mean_n, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(logvar_t.numpy(), logvar_n, rtol=1e-5, atol=1e-5)

    pmean, plogvar = ts.posterior(torch.from_numpy(x0), torch.from_numpy(x), st)
    for row in range(rows):
        i = int(steps[row])
        ref_mean = ref.coef1[i] * x0[row].astype(np.float64) + ref.coef2[i] * x[row].astype(np.float64)
        np.testing.assert_allclose(pmean[row].numpy(), ref_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(plogvar[row].numpy(), np.full((c, 4, 4), ref.post_logvar_clipped[i]), rtol=1e-6)

    xt = ts.q_sample(torch.from_numpy(x0), st, torch.from_numpy(z)).numpy()
    for row in range(rows):
        i = int(steps[row])
        ref_xt = math.sqrt(ref.abar[i]) * x0[row] + math.sqrt(1.0 - ref.abar[i]) * z[row].astype(np.float64)
        np.testing.assert_allclose(xt[row], ref_xt, rtol=1e-5, atol=1e-6)


def test_q_sample_then_true_eps_recovers_posterior():
    """With the true eps, the model mean equals the posterior mean (self-consistency of the chain)."""
    from freedit.export.diffusion import TorchSchedule

    sched = Schedule.create("250")
    ts = TorchSchedule(sched)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 4, 4, generator=g)
    z = torch.randn(5, 4, 4, 4, generator=g)
    steps = torch.tensor([0, 1, 100, 200, 249])
    xt = ts.q_sample(x0, steps, z)
    mean, _ = ts.transition(xt, torch.cat([z, torch.zeros_like(z)], 1), steps)
    post_mean, _ = ts.posterior(x0, xt, steps)
    torch.testing.assert_close(mean, post_mean, rtol=1e-3, atol=2e-3)


# --------------------------------------------------------------------------------------------
# Noise: Philox4x32-10 and its keying
# --------------------------------------------------------------------------------------------
def ref_philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    m0, m1, w0, w1, mask = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & mask, p1 & mask, ((p0 >> 32) ^ c3 ^ k1) & mask, p0 & mask
    return c0, c1, c2, c3


KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert ref_philox4x32_10(counter, key) == expected  # the reference itself is right
    out = rng.philox4x32(np.array([counter], dtype=np.uint32), key)
    assert out.dtype == np.uint32 and out.shape == (1, 4)
    assert tuple(int(v) for v in out[0]) == expected


def test_philox_vectorised_matches_scalar_reference():
    g = np.random.default_rng(0)
    counters = g.integers(0, 2**32, size=(3, 5, 4), dtype=np.uint64).astype(np.uint32)
    key = (0x89ABCDEF, 0x01234567)
    out = rng.philox4x32(counters, key)
    assert out.shape == (3, 5, 4)
    for idx in np.ndindex(3, 5):
        assert tuple(int(v) for v in out[idx]) == ref_philox4x32_10(tuple(int(v) for v in counters[idx]), key)


def test_noise_emits_no_warnings():
    """The key schedule wraps mod 2**32 without numpy overflow warnings (they fail -W error runs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rng.philox4x32(np.full((1, 4), 0xFFFFFFFF, np.uint32), (0xFFFFFFFF, 0xFFFFFFFF))
        rng.normal(2**64 - 1, [0, 2**32 - 1], 2**32 - 1, rng.Purpose.RESIDUAL_ACCEPT, (3, 3))


def test_uniform_layout_is_counter_block_sample_step_purpose():
    """uniform[j] of sample s = word j%4 of Philox((j//4, s, step, purpose), (seed_lo, seed_hi)), mapped to (0,1)."""
    seed = (0x12345678 << 32) | 0x9ABCDEF0
    u = rng.uniform(seed, [3, 11], 42, rng.Purpose.DRAFT, 10)
    assert u.shape == (2, 10) and u.dtype == np.float64
    for r, sample in enumerate([3, 11]):
        for j in range(10):
            word = ref_philox4x32_10((j // 4, sample, 42, int(rng.Purpose.DRAFT)), (0x9ABCDEF0, 0x12345678))[j % 4]
            assert u[r, j] == (word + 0.5) / 2.0**32


def test_draws_do_not_depend_on_batch_composition():
    shape = (4, 6, 6)
    batch = rng.normal(1234, [0, 1, 2, 3, 9], 17, rng.Purpose.STEP, shape)
    assert batch.shape == (5, *shape) and batch.dtype == np.float32
    for r, sample in enumerate([0, 1, 2, 3, 9]):
        np.testing.assert_array_equal(rng.normal(1234, [sample], 17, rng.Purpose.STEP, shape)[0], batch[r])
    np.testing.assert_array_equal(rng.normal(1234, [9, 2], 17, rng.Purpose.STEP, shape), batch[[4, 2]])
    # Per-row steps: a ragged batch gives each row the draw of its own (sample, step).
    ragged = rng.normal(1234, [2, 9], np.array([5, 17]), rng.Purpose.STEP, shape)
    np.testing.assert_array_equal(ragged[1], batch[4])
    np.testing.assert_array_equal(ragged[0], rng.normal(1234, [2], 5, rng.Purpose.STEP, shape)[0])
    # Different step, purpose, seed or sample give different numbers.
    base = rng.normal(1234, [2], 17, rng.Purpose.STEP, shape)[0]
    for other in (rng.normal(1234, [2], 18, rng.Purpose.STEP, shape)[0],
                  rng.normal(1234, [2], 17, rng.Purpose.DRAFT, shape)[0],
                  rng.normal(1235, [2], 17, rng.Purpose.STEP, shape)[0],
                  rng.normal(1234 + 2**32, [2], 17, rng.Purpose.STEP, shape)[0],
                  rng.normal(1234, [3], 17, rng.Purpose.STEP, shape)[0]):
        assert not np.any(other == base)
    # The same key twice gives the same bits; uniform draws of different lengths share a prefix.
    np.testing.assert_array_equal(rng.normal(1234, [2], 17, rng.Purpose.STEP, shape)[0], base)
    np.testing.assert_array_equal(rng.uniform(5, [1], 0, rng.Purpose.ACCEPT, 3)[0],
                                  rng.uniform(5, [1], 0, rng.Purpose.ACCEPT, 9)[0, :3])


def test_normal_is_standard_normal():
    from scipy import stats

    z = rng.normal(2024, np.arange(8), 0, rng.Purpose.INIT, (4, 32, 32)).astype(np.float64).reshape(-1)
    assert z.size == 32768
    assert abs(z.mean()) < 4.0 / math.sqrt(z.size)
    assert abs(z.var() - 1.0) < 0.04
    assert np.all(np.isfinite(z))
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # Odd element counts work (Box-Muller pairs padded) and agree with the even-count prefix.
    odd = rng.normal(2024, [0], 0, rng.Purpose.INIT, (3, 5, 5))
    assert odd.shape == (1, 3, 5, 5)
    even = rng.normal(2024, [0], 0, rng.Purpose.INIT, (76,))
    np.testing.assert_array_equal(odd.reshape(-1), even[0, :75])


def test_uniform_in_open_unit_interval(monkeypatch):
    from scipy import stats

    u = rng.uniform(99, np.arange(16), 3, rng.Purpose.ACCEPT, 2048).reshape(-1)
    assert u.dtype == np.float64
    assert np.all(u > 0.0) and np.all(u < 1.0)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # The extreme words map strictly inside (0, 1), and so Box-Muller stays finite.
    extremes = np.array([[0, 0xFFFFFFFF, 0, 0xFFFFFFFF]], dtype=np.uint32)
    monkeypatch.setattr(rng, "_blocks", lambda *args: extremes)
    u = rng.uniform(0, [0], 0, rng.Purpose.ACCEPT, 4)
    assert np.all(u > 0.0) and np.all(u < 1.0)
    assert np.all(np.isfinite(rng.normal(0, [0], 0, rng.Purpose.INIT, (4,))))
