"""Exactness of FREE's coupling, against laws known in closed form.

(a) ``runtime/coupling.py`` on Gaussians p = N(mu_p, diag s_p^2), q = N(mu_q, diag s_q^2): the accept
    rate is 1 - TV(p, q), the committed samples (accepted drafts + residual samples) are distributed
    as q, residual proposals average 1 per decided row; the same checks REJECT deliberately wrong
    rules (so they are not vacuous); relax (gamma < 1) only ever accepts more, gamma = 1 is exact.
(b) End to end on ``analytic_model.AnalyticBackend`` (class-conditional Gaussian data, Bayes-optimal
    eps, a deliberately poor drafter): the sequential sampler matches the closed-form law of x_0
    (validating the oracle); FREE and frozen match it too while rejecting often; a biased variant
    fails the same test; relax lambda = 0 is bit-identical to FREE; batch size changes nothing.

Every statistical check uses fixed seeds and thresholds of p > 1e-3 (KS; the d per-coordinate KS
tests of one sample share that level, Bonferroni) or 5 standard errors.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats

from analytic_model import AnalyticBackend
from freedit.benchmarks.biased_rules import unclipped_block_weights
from freedit.runtime import coupling
from freedit.runtime.pipeline import Pipeline
from freedit.runtime.schedule import Schedule

ALPHA = 1e-3  # KS p-value threshold (fixed seeds: the outcome is deterministic)
Z = 5.0  # tolerance in standard errors


# =================================================================================================
# Goodness of fit: x [n, d] against N(mu, diag s^2); a list of failures (empty = consistent)
# =================================================================================================
def gof_failures(x: np.ndarray, mu: np.ndarray, s: np.ndarray, alpha: float = ALPHA) -> list[str]:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    w = (x - np.asarray(mu, dtype=np.float64).reshape(1, -1)) / np.asarray(s, dtype=np.float64).reshape(1, -1)
    n, d = w.shape
    fails = []
    for j in range(d):  # Bonferroni over the d marginals: the family of KS tests has level alpha
        p = stats.kstest(w[:, j], "norm").pvalue
        if p < alpha / d:
            fails.append(f"KS dim {j}: p={p:.2e}")
    p = stats.kstest((w**2).sum(axis=1), stats.chi2(d).cdf).pvalue
    if p < alpha:
        fails.append(f"chi2({d}) on the whitened squared norm: p={p:.2e}")
    mean, var = w.mean(axis=0), w.var(axis=0, ddof=1)
    bad = np.flatnonzero(np.abs(mean) > Z / np.sqrt(n))
    if len(bad):
        fails.append(f"whitened mean off in dims {bad[:8].tolist()}: {mean[bad[:8]].round(4).tolist()}")
    bad = np.flatnonzero(np.abs(var - 1.0) > Z * np.sqrt(2.0 / (n - 1)))
    if len(bad):
        fails.append(f"whitened variance off in dims {bad[:8].tolist()}: {var[bad[:8]].round(4).tolist()}")
    return fails


# =================================================================================================
# (a) The coupling on Gaussians with known answers
# =================================================================================================
def rows_for(d: int) -> int:
    return 40_000 if d < 64 else 20_000


class Pair:
    """p = N(mu_p, s_p^2), q = N(mu_q, s_q^2) per dimension, with whitened mean distance ``delta``
    (|(mu_p - mu_q) / s_p|) and per-dimension std ratios s_q / s_p = exp(+-log_ratio / sqrt(d))."""

    def __init__(self, d: int, delta: float, log_ratio: float, seed: int):
        rng = np.random.default_rng(seed)
        self.d = d
        self.mu_p = rng.normal(0.0, 1.0, d)
        self.s_p = np.exp(rng.uniform(-0.5, 0.5, d))
        direction = rng.normal(size=d)
        direction /= np.linalg.norm(direction)
        self.mu_q = self.mu_p + delta * self.s_p * direction
        signs = np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
        self.s_q = self.s_p * np.exp(signs * log_ratio / np.sqrt(d)) if log_ratio else self.s_p.copy()
        # The runtime works in float32 (means, log-variances): round once, use the rounded values everywhere.
        self.mu_p, self.mu_q = (m.astype(np.float32).astype(np.float64) for m in (self.mu_p, self.mu_q))
        self.lv_p = (2.0 * np.log(self.s_p)).astype(np.float32)
        self.lv_q = (2.0 * np.log(self.s_q)).astype(np.float32) if log_ratio else self.lv_p.copy()
        self.s_p, self.s_q = np.exp(0.5 * self.lv_p.astype(np.float64)), np.exp(0.5 * self.lv_q.astype(np.float64))
        self.delta = float(np.linalg.norm((self.mu_p - self.mu_q) / self.s_p))
        self.equal = bool(np.array_equal(self.lv_p, self.lv_q))

    def rows(self, a: np.ndarray, n: int) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=np.float32), (n, self.d)))

    def tv(self) -> tuple[float, float]:
        """(TV(p, q), its standard error): closed form, 1-D quadrature or Monte Carlo."""
        if self.equal:
            return 2.0 * stats.norm.cdf(self.delta / 2.0) - 1.0, 0.0
        if self.d == 1:
            return tv_quadrature(self.mu_p[0], self.s_p[0], self.mu_q[0], self.s_q[0]), 0.0
        return tv_monte_carlo(self, n=400_000, seed=99)


def tv_quadrature(mu_p, s_p, mu_q, s_q) -> float:
    """TV = integral of (p - q)^+ in 1-D, by adaptive quadrature split at the crossing points."""
    p, q = stats.norm(mu_p, s_p), stats.norm(mu_q, s_q)
    # log p = log q is a quadratic in x: its real roots are where (p - q) changes sign.
    a = 0.5 / s_q**2 - 0.5 / s_p**2
    b = mu_p / s_p**2 - mu_q / s_q**2
    c = 0.5 * mu_q**2 / s_q**2 - 0.5 * mu_p**2 / s_p**2 + np.log(s_q / s_p)
    roots = np.roots([a, b, c]) if abs(a) > 1e-15 else np.array([-c / b])
    roots = sorted(r.real for r in np.atleast_1d(roots) if abs(r.imag) < 1e-12)
    lo = min(mu_p - 12 * s_p, mu_q - 12 * s_q)
    hi = max(mu_p + 12 * s_p, mu_q + 12 * s_q)
    edges = [lo, *[r for r in roots if lo < r < hi], hi]
    return float(sum(integrate.quad(lambda x: max(0.0, p.pdf(x) - q.pdf(x)), e0, e1, epsabs=1e-12, limit=200)[0]
                     for e0, e1 in zip(edges[:-1], edges[1:])))


def tv_monte_carlo(pair: Pair, n: int, seed: int) -> tuple[float, float]:
    """TV = E_p[max(0, 1 - q/p)], an independent Monte Carlo estimate and its standard error."""
    rng = np.random.default_rng(seed)
    vals = []
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        x = pair.mu_p + pair.s_p * rng.standard_normal((m, pair.d))
        log_r = (stats.norm.logpdf(x, pair.mu_q, pair.s_q) - stats.norm.logpdf(x, pair.mu_p, pair.s_p)).sum(axis=1)
        vals.append(np.maximum(0.0, -np.expm1(log_r)))
    vals = np.concatenate(vals)
    return float(vals.mean()), float(vals.std() / np.sqrt(n))


def run_coupling(pair: Pair, n: int, seed: int, gamma=1.0):
    """One batched coupled_step on n independent rows; numpy-Generator noise for everything."""
    rng = np.random.default_rng(seed)
    x = (pair.rows(pair.mu_p, n) + pair.rows(pair.s_p, n) * rng.standard_normal((n, pair.d), dtype=np.float32))
    x = x.astype(np.float32)
    u = rng.uniform(size=n)
    residual_rng = np.random.default_rng(seed + 1)
    next_attempt = np.zeros(n, dtype=np.int64)

    def residual_draw(rows, attempts):
        # attempts of a row come in order 0, 1, 2, ... (chunks may hold several)
        for row in np.unique(rows):
            mine = attempts[rows == row]
            assert list(mine) == list(range(next_attempt[row], next_attempt[row] + len(mine)))
            next_attempt[row] += len(mine)
        return (residual_rng.standard_normal((len(rows), pair.d), dtype=np.float32),
                residual_rng.uniform(size=len(rows)))

    committed, ok, props, caps = coupling.coupled_step(x, pair.rows(pair.mu_p, n), pair.rows(pair.lv_p, n),
                                                       pair.rows(pair.mu_q, n), pair.rows(pair.lv_q, n), u, gamma,
                                                       residual_draw)
    return x, committed, ok, props, caps


def accept_rate_failure(ok: np.ndarray, tv: float, tv_se: float) -> str | None:
    n, expected = len(ok), 1.0 - tv
    se = np.sqrt(max(tv * (1.0 - tv), 1e-12) / n + tv_se**2)
    rate = ok.mean()
    return None if abs(rate - expected) <= Z * se + 1e-9 else f"accept rate {rate:.5f} vs 1 - TV = {expected:.5f}"


# (d, whitened |mu_p - mu_q|, log std ratio: 0 = equal covariances, the reflection path)
CASES = [(d, delta, lr) for d in (1, 4, 64) for delta in (0.1, 1.0, 5.0) for lr in (0.0, 0.4)]


@pytest.mark.parametrize("d,delta,log_ratio", CASES, ids=[f"d{d}-delta{dl}-{'eq' if lr == 0 else 'uneq'}"
                                                            for d, dl, lr in CASES])
def test_coupling_accept_rate_and_committed_law(d, delta, log_ratio):
    pair = Pair(d, delta, log_ratio, seed=10 * d + int(10 * delta))
    n = rows_for(d)
    x, committed, ok, props, caps = run_coupling(pair, n, seed=1000 + d)
    tv, tv_se = pair.tv()
    assert pair.equal == (log_ratio == 0.0)
    assert accept_rate_failure(ok, tv, tv_se) is None, (accept_rate_failure(ok, tv, tv_se), tv)
    np.testing.assert_array_equal(committed[ok], x[ok])  # accepted rows commit the draft itself
    assert committed.dtype == np.float32 and committed.shape == x.shape
    fails = gof_failures(committed, pair.mu_q, pair.s_q)
    assert not fails, fails
    assert not caps.any()
    if pair.equal:  # reflection: one shot, no extra randomness
        assert not props.any()
    else:  # rejection sampling of the residual: 1/TV proposals per rejection, 1 per decided row
        assert np.all(props[ok] == 0) and np.all(props[~ok] >= 1)
        se = np.sqrt(2.0 * (1.0 - tv) / tv / n)  # per row: 0 w.p. 1 - TV, else Geometric(TV)
        assert abs(props.mean() - 1.0) < Z * se + Z * tv_se / tv, (props.mean(), tv)


@pytest.mark.parametrize("d", [1, 4, 64])
def test_coupling_zero_distance_accepts_everything(d):
    pair = Pair(d, 0.0, 0.0, seed=d)
    x, committed, ok, props, caps = run_coupling(pair, rows_for(d), seed=7)
    assert ok.all() and not props.any() and not caps.any()
    np.testing.assert_array_equal(committed, x)  # output = draft, bit for bit
    fails = gof_failures(committed, pair.mu_q, pair.s_q)
    assert not fails, fails


@pytest.mark.parametrize("d", [1, 4, 64])
def test_coupling_equal_means_unequal_covariances(d):
    """Delta = 0 but s_p != s_q: the residual path alone carries the difference."""
    pair = Pair(d, 0.0, 0.4, seed=d + 5)
    n = rows_for(d)
    x, committed, ok, props, caps = run_coupling(pair, n, seed=8)
    tv, tv_se = pair.tv()
    assert 0.05 < tv < 0.95
    assert accept_rate_failure(ok, tv, tv_se) is None
    fails = gof_failures(committed, pair.mu_q, pair.s_q)
    assert not fails, fails
    assert not caps.any() and abs(props.mean() - 1.0) < Z * np.sqrt(2.0 * (1.0 - tv) / tv / n) + Z * tv_se / tv


def test_tv_reference_values():
    """The TV oracles agree with each other (closed form vs quadrature vs Monte Carlo)."""
    pair = Pair(1, 1.3, 0.0, seed=3)
    closed = 2.0 * stats.norm.cdf(pair.delta / 2.0) - 1.0
    assert tv_quadrature(pair.mu_p[0], pair.s_p[0], pair.mu_q[0], pair.s_q[0]) == pytest.approx(closed, abs=1e-8)
    mc, se = tv_monte_carlo(Pair(4, 1.3, 0.0, seed=3), n=200_000, seed=5)
    assert abs(mc - (2.0 * stats.norm.cdf(Pair(4, 1.3, 0.0, seed=3).delta / 2.0) - 1.0)) < Z * se
    uneq = Pair(1, 0.7, 0.5, seed=4)
    mc, se = tv_monte_carlo(uneq, n=200_000, seed=6)
    assert abs(mc - uneq.tv()[0]) < Z * se


# --- power: the same checks reject deliberately wrong rules ---------------------------------------
def _reflect_identity(x, mean_p, mean_q, log_var):
    return np.asarray(x, dtype=np.float32)  # commits the rejected draft itself


def _reflect_translate(x, mean_p, mean_q, log_var):
    return (mean_q + (x - mean_p)).astype(np.float32)  # translation instead of reflection


def _residual_from_q(mean_p, log_var_p, mean_q, log_var_q, draw):
    z, _ = draw(np.arange(len(mean_q)), np.zeros(len(mean_q), dtype=np.int64))  # q instead of (q - p)^+
    y = (mean_q + np.exp(0.5 * log_var_q) * z).astype(np.float32)
    return y, np.ones(len(y), dtype=np.int64), np.zeros(len(y), dtype=bool)


WRONG_RULES = {
    "commit-rejected-draft": dict(reflect=_reflect_identity, equal_variance=lambda a, b: np.ones(len(a), bool)),
    "residual-from-q": dict(sample_residual=_residual_from_q, equal_variance=lambda a, b: np.zeros(len(a), bool)),
    "translate-not-reflect": dict(reflect=_reflect_translate),
    "accept-relaxed": dict(accept=lambda lr, u, gamma=1.0: np.log(u) < np.minimum(0.0, 0.5 * lr)),
    "accept-with-p-over-q": dict(accept=lambda lr, u, gamma=1.0: np.log(u) < np.minimum(0.0, -lr)),
}


# translation only replaces the reflection: equal covariances only
POWER_CASES = [(rule, d, lr) for rule in WRONG_RULES for d, lr in [(1, 0.0), (4, 0.4), (64, 0.0), (64, 0.4)]
               if not (rule == "translate-not-reflect" and lr)]


@pytest.mark.parametrize("rule,d,log_ratio", POWER_CASES)
def test_checks_have_power_against_wrong_rules(rule, d, log_ratio, monkeypatch):
    for name, fn in WRONG_RULES[rule].items():
        monkeypatch.setattr(coupling, name, fn)
    pair = Pair(d, 1.0, log_ratio, seed=77 + d)
    x, committed, ok, props, caps = run_coupling(pair, rows_for(d), seed=5)
    tv, tv_se = pair.tv()
    # Every wrong rule changes the committed law: the goodness-of-fit checks alone must see it ...
    assert gof_failures(committed, pair.mu_q, pair.s_q), f"the law checks did not notice {rule!r}"
    # ... and a wrong accept test also shows in the accept rate.
    if rule.startswith("accept"):
        assert accept_rate_failure(ok, tv, tv_se), f"the accept-rate check did not notice {rule!r}"


# --- relax ------------------------------------------------------------------------------------------
def test_relax_accepts_at_least_as_often_and_gamma_one_is_exact():
    rng = np.random.default_rng(3)
    log_r = rng.normal(-1.0, 2.0, 100_000)
    u = rng.uniform(size=100_000)
    exact = coupling.accept(log_r, u, 1.0)
    np.testing.assert_array_equal(exact, np.log(u) < np.minimum(0.0, log_r))
    np.testing.assert_array_equal(exact, coupling.accept(log_r, u))
    np.testing.assert_array_equal(exact, coupling.accept(log_r, u, np.ones_like(log_r)))
    for gamma in (0.9, 0.5, 0.1, 0.0, rng.uniform(0.0, 1.0, len(u))):
        relaxed = coupling.accept(log_r, u, gamma)
        assert np.all(relaxed >= exact)  # the relaxed test accepts every row the exact one does
        assert relaxed.sum() > exact.sum()
    assert coupling.accept(log_r, u, 0.0).all()


@pytest.mark.parametrize("gamma", [1.0, 0.6, 0.2])
def test_relaxed_accept_rate_known_answer(gamma):
    """Equal covariances: log r ~ N(-D^2/2, D^2) under p, so P(accept) = E[min(1, r^gamma)] =
    Phi(-D/2) + exp(gamma m + gamma^2 D^2 / 2) Phi(-(m + gamma D^2) / D) with m = -D^2/2."""
    pair = Pair(4, 1.5, 0.0, seed=21)
    n = rows_for(4)
    _, _, ok, _, _ = run_coupling(pair, n, seed=22, gamma=gamma)
    D, m = pair.delta, -pair.delta**2 / 2.0
    expected = (stats.norm.cdf(m / D)
                + np.exp(gamma * m + gamma**2 * D**2 / 2.0) * stats.norm.cdf(-(m + gamma * D**2) / D))
    assert abs(ok.mean() - expected) < Z * np.sqrt(expected * (1 - expected) / n)


def test_coupled_step_gamma_one_bit_identical():
    pair = Pair(4, 1.0, 0.4, seed=9)
    a = run_coupling(pair, 5000, seed=4, gamma=1.0)
    b = run_coupling(pair, 5000, seed=4, gamma=np.ones(5000))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    c = run_coupling(pair, 5000, seed=4, gamma=0.5)
    assert np.all(c[2] >= a[2]) and c[2].sum() > a[2].sum()


def test_residual_cap_is_reported():
    """The residual sampler's cap: with TV ~ 1e-3 a rejected row needs ~1000 proposals, so with a
    cap of 1000 about (1 - TV)^1000 ~ 37% of such rows hit it; they must be flagged with the
    proposal count at the cap. (The default cap, 2**20, makes a hit a < 4e-7 event per decision.)"""
    d, n, cap = 4, 400, 1000
    pair = Pair(d, 2.0 * stats.norm.ppf(0.5 + 0.5e-3), 0.0, seed=1)  # equal covariances: TV = 1e-3
    lv_q = pair.rows(pair.lv_q, n)
    lv_q[:, 0] += np.float32(1e-6)  # force the rejection-sampling path (unequal covariances)
    rng = np.random.default_rng(0)

    def draw(rows, attempts):
        return rng.standard_normal((len(rows), d), dtype=np.float32), rng.uniform(size=len(rows))

    out, props, caps = coupling.sample_residual(pair.rows(pair.mu_p, n), pair.rows(pair.lv_p, n),
                                                pair.rows(pair.mu_q, n), lv_q, draw, max_attempts=cap)
    caps_seen = caps.mean()
    assert np.all(props[caps] == cap)
    assert np.all(props[~caps] < cap)
    expected = (1.0 - 1e-3) ** cap
    assert abs(caps_seen - expected) < Z * np.sqrt(expected * (1 - expected) / n)
    assert coupling.MAX_RESIDUAL_ATTEMPTS >= 1 << 20


def test_low_tv_rejections_finish_without_cap():
    """The case that used to hit the cap: TV ~ 1e-3 rejections now complete, exactly as q's residual."""
    d, n = 4, 400
    pair = Pair(d, 2.0 * stats.norm.ppf(0.5 + 0.5e-3), 0.0, seed=1)
    lv_q = pair.rows(pair.lv_q, n)
    lv_q[:, 0] += np.float32(1e-6)
    rng = np.random.default_rng(0)

    def draw(rows, attempts):
        return rng.standard_normal((len(rows), d), dtype=np.float32), rng.uniform(size=len(rows))

    out, props, caps = coupling.sample_residual(pair.rows(pair.mu_p, n), pair.rows(pair.lv_p, n),
                                                pair.rows(pair.mu_q, n), lv_q, draw)
    assert not caps.any()
    assert 500 < props.mean() < 2000  # about 1 / TV proposals per rejected row
    # every kept sample lies where q > p (the residual's support)
    lr = coupling.log_ratio(out, pair.rows(pair.mu_p, n), pair.rows(pair.lv_p, n), pair.rows(pair.mu_q, n), lv_q)
    assert np.all(lr > 0)


# =================================================================================================
# (b) End to end: the analytic backend, whose final law is known in closed form
# =================================================================================================
STEPS, CFG, WINDOW, N, SEED = "50", 2.0, 4, 3000, 11


@pytest.fixture(scope="module")
def backend():
    return AnalyticBackend()


@pytest.fixture(scope="module")
def pipe(backend):
    return Pipeline(backend, {"steps": STEPS, "cfg_scale": CFG, "window": WINDOW, "batch_size": N})


@pytest.fixture(scope="module")
def labels():
    return np.arange(N) % 3


@pytest.fixture(scope="module")
def schedule():
    return Schedule.create(STEPS)


def law_failures(backend, schedule, samples, labels, cfg: float = CFG) -> list[str]:
    fails = []
    for y in np.unique(labels):
        mean, var = backend.exact_final_law(schedule, int(y), cfg)
        std = np.full(mean.shape, np.sqrt(var))
        fails += [f"class {y}: {f}" for f in gof_failures(samples[labels == y], mean, std)]
    return fails


_RUNS: dict = {}


def generate(pipe, labels, sampler, **kw):
    key = (sampler, tuple(sorted(kw.items())))
    if key not in _RUNS:
        _RUNS[key] = pipe.generate(labels, sampler=sampler, seed=SEED, **kw)
    return _RUNS[key]


def test_oracle_one_step_matches_runtime_transition(backend, schedule):
    """The oracle's per-step affine law equals ops.transition on the guided backend output."""
    from freedit.runtime import ops

    rng = np.random.default_rng(0)
    for step in (schedule.num_steps - 1, 30, 7, 1, 0):
        for label in range(3):
            x = rng.normal(0.0, 1.5, (5, 1, 4, 4)).astype(np.float32)
            t = np.full(10, schedule.timesteps[step], dtype=np.float32)
            y = np.array([label] * 5 + [backend.info("dit").null_label] * 5)
            out = backend.run("dit", {"x": np.concatenate([x, x]), "t": t, "y": y})
            eps_v = ops.cfg_combine(out["eps_v"][:5], out["eps_v"][5:], CFG, 1, "all")
            assert eps_v.shape == (5, 2, 4, 4) and out["feat"].shape == (10, 4, 4)
            mean, log_var = ops.transition(schedule, x, eps_v, np.full(5, step))
            a, b, lv = backend.step_law(schedule, step, label, CFG)
            np.testing.assert_allclose(mean, a * x + b, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(log_var, lv, rtol=1e-5, atol=1e-6)


def test_sequential_matches_closed_form(backend, pipe, labels, schedule):
    result = generate(pipe, labels, "sequential")
    fails = law_failures(backend, schedule, result.samples, labels)
    assert not fails, fails


def _check_speculative(result, sampler):
    s = result.summary
    rejections = s["decided"] - s["accepted"]
    assert s["acceptance"] < 0.9 and rejections > 1000, s  # the drafter really is poor
    assert s["residual_cap_hits"] == 0, s
    # unequal covariances everywhere: 1/TV proposals per rejection, ~1 per decided position
    assert abs(s["residual_proposals"] / s["decided"] - 1.0) < 0.07, s
    assert s["mean_target_calls"] < result.settings["num_steps"] / 1.5, s  # it does speed things up


@pytest.mark.parametrize("sampler,kw", [("free", {}), ("frozen", {}), ("free", {"draft_guidance": "drafter"})],
                         ids=["free", "frozen", "free-both-rows-drafted"])
def test_speculative_matches_closed_form(backend, pipe, labels, schedule, sampler, kw):
    """free drafts the conditional row with the parent's guidance gap (the default), or both rows."""
    result = generate(pipe, labels, sampler, **kw)
    assert result.settings.get("draft_guidance") == (kw.get("draft_guidance", "parent") if sampler == "free" else None)
    _check_speculative(result, sampler)
    fails = law_failures(backend, schedule, result.samples, labels)
    assert not fails, fails


def test_free_with_equal_covariance_drafter(labels, schedule):
    """A drafter whose v equals the target's: every rejection goes through the reflection."""
    backend = AnalyticBackend(drafter_v_offset=0.0)
    pipe = Pipeline(backend, {"steps": STEPS, "cfg_scale": CFG, "window": WINDOW, "batch_size": N})
    result = pipe.generate(labels, sampler="free", seed=SEED + 1)
    s = result.summary
    assert s["acceptance"] < 0.9 and s["decided"] - s["accepted"] > 1000 and s["residual_proposals"] == 0, s
    fails = law_failures(backend, schedule, result.samples, labels)
    assert not fails, fails


@pytest.mark.parametrize("sampler", ["free", "frozen"])
def test_block_verification_matches_closed_form_and_commits_more(backend, pipe, labels, schedule, sampler):
    """DESIGN §3.3.1: the same law as per-step verification, in fewer target calls."""
    step = generate(pipe, labels, sampler)
    block = generate(pipe, labels, sampler, verifier="block")
    s = block.summary
    assert block.settings["verifier"] == "block" and s["residual_cap_hits"] == 0, s
    assert s["decided"] - s["accepted"] > 1000, s  # levels below the top were sampled, often
    assert s["mean_target_calls"] < 0.98 * step.summary["mean_target_calls"], (s, step.summary)
    fails = law_failures(backend, schedule, block.samples, labels)
    assert not fails, fails


def test_block_verification_with_equal_covariances(labels, schedule):
    """Equal covariances (no reflection under block verification: every level is the rejection sampler)."""
    backend = AnalyticBackend(drafter_v_offset=0.0)
    pipe = Pipeline(backend, {"steps": STEPS, "cfg_scale": CFG, "window": WINDOW, "batch_size": N})
    result = pipe.generate(labels, sampler="free", seed=SEED + 3, verifier="block")
    assert result.summary["residual_cap_hits"] == 0 and result.summary["residual_proposals"] > 1000
    fails = law_failures(backend, schedule, result.samples, labels)
    assert not fails, fails


#: variant -> (coupling patches, generate arguments, acceptance it must exceed)
BIASED = {
    "relax-lambda-1000": ({}, dict(sampler="free-relax", relax=1000.0), 0.95),
    "accept-every-draft": (dict(accept=lambda log_r, u, gamma=1.0: np.ones(len(log_r), dtype=bool)),
                           dict(sampler="free"), 0.95),
    "residual-from-q": (dict(sample_residual=_residual_from_q), dict(sampler="free"), 0.7),
    "block-unclipped-weights": (dict(block_weights=unclipped_block_weights), dict(sampler="free", verifier="block"), 0.8),
}


@pytest.mark.parametrize("variant", list(BIASED))
def test_biased_variants_are_rejected(backend, pipe, labels, schedule, monkeypatch, variant):
    """Power: accepting (nearly) every draft, drawing the residual from q instead of (q - p)^+, or
    block weights not clipped at 1 change the law of x_0; the same end-to-end test sees it."""
    patches, kw, acceptance = BIASED[variant]
    for name, fn in patches.items():
        monkeypatch.setattr(coupling, name, fn)
    result = pipe.generate(labels, seed=SEED, **kw)
    assert result.summary["acceptance"] > acceptance
    assert law_failures(backend, schedule, result.samples, labels), f"{variant} went unnoticed"


def test_free_unguided_matches_closed_form(backend, labels, schedule):
    """cfg_scale = 1: one row per state (no null rows); the drafter gets per-state features."""
    pipe = Pipeline(backend, {"steps": STEPS, "cfg_scale": 1.0, "window": WINDOW, "batch_size": N})
    result = pipe.generate(labels, sampler="free", seed=SEED + 2)
    _check_speculative(result, "free")
    fails = law_failures(backend, schedule, result.samples, labels, cfg=1.0)
    assert not fails, fails


def test_relax_zero_is_bit_identical_to_free(pipe, labels):
    free = generate(pipe, labels, "free")
    relax0 = pipe.generate(labels, sampler="free-relax", relax=0.0, seed=SEED)
    np.testing.assert_array_equal(relax0.samples, free.samples)
    assert relax0.summary["acceptance"] == free.summary["acceptance"]
    assert [s["decisions"] for s in relax0.stats] == [s["decisions"] for s in free.stats]


@pytest.mark.parametrize("sampler,kw", [("sequential", {}), ("free", {}), ("frozen", {}),
                                        ("free-relax", {"relax": 0.5}), ("free", {"verifier": "block"})])
def test_batch_size_does_not_change_samples(backend, sampler, kw):
    pipe = Pipeline(backend, {"steps": "25", "cfg_scale": CFG, "window": WINDOW})
    labels = np.arange(40) % 3
    small = pipe.generate(labels, sampler=sampler, seed=5, batch_size=7, **kw)
    large = pipe.generate(labels, sampler=sampler, seed=5, batch_size=64, **kw)
    np.testing.assert_array_equal(small.samples, large.samples)
    assert [s.get("decisions") for s in small.stats] == [s.get("decisions") for s in large.stats]
    if sampler != "sequential":
        assert small.summary["decided"] > small.summary["accepted"]  # rejections did happen


def test_low_tv_drafter_never_hits_the_cap():
    """Regression: a drafter whose errors cancel near t ~ 530 (TV ~ 4e-3 there) used to hit the
    old 1000-proposal cap about once per 3000 samples, committing a draw from q instead of the
    residual. With chunked proposals and the 2**20 cap it must not."""
    result = Pipeline(AnalyticBackend(drafter_eps_bias=+0.08)).generate(
        np.arange(3000) % 3, sampler="free", steps="50", cfg_scale=2.0, seed=1, batch_size=3000, window=4)
    assert result.summary["residual_cap_hits"] == 0


# =================================================================================================
# (c) Every committed transition of the analytic chain against its closed-form law
# =================================================================================================
def _analytic_transition_z(verifier: str, rule: str | None = None, n: int = 2000) -> tuple[float, float]:
    """(z-score of the mean of sum(z)/sqrt(E), chi-square p of sum |z|^2) over every committed
    transition 1..T-2 of 100-step chains (L = 8), z = (x' - a x - b) / sigma from step_law. The
    analytic drafter's error has one sign on every element, so sum(z) is the direction a bias takes."""
    from contextlib import nullcontext

    from freedit.benchmarks.biased_rules import RULES
    from freedit.benchmarks.transition_test import Chains, recording

    backend = AnalyticBackend()
    pipe = Pipeline(backend, {"steps": "100", "cfg_scale": CFG, "window": 8, "batch_size": n})
    labels, schedule = np.arange(n) % 3, Schedule.create("100")
    chains = Chains(schedule.num_steps)
    with (RULES[rule]() if rule else nullcontext()), recording(chains):
        pipe.generate(labels, sampler="free", seed=SEED + 7, verifier=verifier, maths="numpy")
    a = chains.array(chains.complete()).astype(np.float64)
    z = []
    for i in range(1, schedule.num_steps - 1):
        for y in range(3):
            slope, offset, log_var = backend.step_law(schedule, i, y, CFG)
            rows = a[labels == y]
            z.append(((rows[:, i - 1] - slope * rows[:, i] - offset) * np.exp(-0.5 * log_var)).reshape(len(rows), -1))
    z = np.concatenate(z)
    proj = z.sum(axis=1) / np.sqrt(z.shape[1])
    return float(proj.mean() * np.sqrt(len(proj))), float(stats.chi2.sf((z ** 2).sum(), z.size))


@pytest.mark.parametrize("verifier", ["step", "block"])
def test_every_committed_transition_has_the_closed_form_law(verifier):
    """Per transition, not only at x_0 (DESIGN §3.4.1's test with the exact law in hand): step and
    block verification pass; gamma 0.9 (step) and unclipped block weights are rejected by the same
    statistic at the same size."""
    z, chi_p = _analytic_transition_z(verifier)
    assert abs(z) < 3.5 and 1e-4 < chi_p < 1 - 1e-4, (z, chi_p)
    biased, _ = _analytic_transition_z(verifier, "gamma0.9" if verifier == "step" else "block-unclipped")
    assert biased > 6, biased
