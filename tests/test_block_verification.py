"""Block verification (DESIGN §3.3.1) is exact: its parts against closed forms, and whole chains
of a toy Gaussian Markov chain (known transitions, unequal draft variances) against the target
law, with the power of the same check shown on a subtly wrong variant (weights not clipped at 1).
The real model's chains go through the transition test (tests/test_lossless_power.py)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from freedit.benchmarks.biased_rules import unclipped_block_weights
from freedit.runtime import coupling


def _rng_draw(rng, dims):
    def draw(rows, attempts):
        return rng.standard_normal((len(rows), dims)), rng.random(len(rows))

    return draw


def test_block_weights_are_the_clipped_running_product():
    log_r = np.log(np.array([[0.5, 4.0, 0.25], [2.0, 0.5, 8.0]]))
    lw = coupling.block_weights(log_r, np.array([3, 2]))
    np.testing.assert_allclose(np.exp(lw[0]), [1.0, 0.5, 1.0, 0.25])  # 0.5 * 4 clipped to 1
    np.testing.assert_allclose(np.exp(lw[1, :3]), [1.0, 1.0, 0.5])
    assert lw[1, 3] == -np.inf  # past the window


def test_weight_one_is_the_plain_residual_bit_for_bit():
    rng = np.random.default_rng(3)
    mp, mq = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    lvp, lvq = rng.normal(-1, 0.2, size=(5, 6)), rng.normal(-1, 0.2, size=(5, 6))
    noise_bank = rng.standard_normal((5, 4096, 6)), rng.random((5, 4096))

    def draw(rows, attempts):
        return noise_bank[0][rows, attempts], noise_bank[1][rows, attempts]

    plain = coupling.sample_residual(mp, lvp, mq, lvq, draw)
    weighted = coupling.sample_residual(mp, lvp, mq, lvq, draw, log_weight=np.zeros(5))
    for a, b in zip(plain, weighted):
        np.testing.assert_array_equal(a, b)
    assert weighted[3].all()  # weight 1: never passed on


@pytest.mark.parametrize("w", [0.3, 0.8])
def test_a_level_stops_with_h_and_draws_the_residual_of_w_q_minus_p(w):
    """1-D, q wider than p (so w q > p in its tails for any w): P(stop) = Z / (Z + 1 - w) with Z = int (w q - p)^+, the stopped samples follow
    (w q - p)^+ / Z, and a level costs 1 / (Z + 1 - w) proposals on average."""
    rng = np.random.default_rng(7)
    n = 40_000
    mp, lvp, mq, lvq = 0.0, 0.0, 0.9, 2 * np.log(1.3)
    grid = np.linspace(-12, 12, 240_001)
    resid = np.maximum(w * stats.norm.pdf(grid, mq, 1.3) - stats.norm.pdf(grid, mp, 1.0), 0.0)
    Z = np.trapezoid(resid, grid)
    cdf = np.cumsum(resid) / resid.sum()
    full = lambda v: np.full((n, 1), v)  # noqa: E731
    y, props, caps, stopped = coupling.sample_residual(full(mp), full(lvp), full(mq), full(lvq), _rng_draw(rng, 1),
                                                       log_weight=np.full(n, np.log(w)))
    h = Z / (Z + 1 - w)
    assert not caps.any()
    assert abs(stopped.mean() - h) < 4 * np.sqrt(h * (1 - h) / n)
    mean_props = 1 / (Z + 1 - w)
    assert abs(props.mean() - mean_props) < 4 * np.sqrt((1 - (Z + 1 - w)) / (Z + 1 - w) ** 2 / n)
    ks = stats.kstest(y[stopped, 0], lambda v: np.interp(v, grid, cdf))
    assert ks.pvalue > 1e-3, ks


# -- a toy Markov chain, sampled by block verification round after round -------------------------
DIMS, T, L = 2, 6, 3
SIGMA_Q, SIGMA_P = 0.5, 0.56  # unequal: the rejection residual, as for learned-sigma DiTs
OFFSET = np.array([0.45, -0.25]) * SIGMA_Q  # the draft's mean error


def _mean_q(x, t):
    return 0.9 * x + 0.1 * t


def _log_density(x, mean, sigma):
    return (-0.5 * ((x - mean) / sigma) ** 2 - np.log(sigma)).sum(axis=-1)


def toy_chains(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n chains of T transitions (t = T .. 1) by block verification with window L: every committed
    (parent, child, t) triple, and the mean acceptance."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIMS))
    left = np.full(n, T)  # transitions still to commit; the state is before transition t = left
    parents, children, ts, accepted_all = [], [], [], []
    lvp, lvq = np.full((n, DIMS), 2 * np.log(SIGMA_P)), np.full((n, DIMS), 2 * np.log(SIGMA_Q))
    while (left > 0).any():
        live = np.flatnonzero(left > 0)
        m, w = len(live), np.minimum(L, left[live] - 1)
        states = [x[live]]  # x~_0 .. x~_L
        log_r = np.zeros((m, L))
        for k in range(1, L + 1):
            t = left[live] - k + 1
            mp = _mean_q(states[-1], t[:, None]) + OFFSET
            nxt = mp + SIGMA_P * rng.standard_normal((m, DIMS))
            log_r[:, k - 1] = _log_density(nxt, _mean_q(states[-1], t[:, None]), SIGMA_Q) - _log_density(nxt, mp, SIGMA_P)
            states.append(nxt)
        states = np.stack(states, axis=1)  # [m, L + 1, DIMS]

        def level(rows, i, log_w):
            src = states[rows, i]
            t = (left[live][rows] - i)[:, None]
            mq = _mean_q(src, t)
            return coupling.sample_residual(mq + OFFSET, lvp[:len(rows)], mq, lvq[:len(rows)], _rng_draw(rng, DIMS),
                                            log_weight=log_w)

        out = np.zeros((m, DIMS))
        accepted, _, caps = coupling.block_verify(log_r, w, rng.random(m), level, out)
        assert not caps.any()
        accepted_all.append(accepted / np.maximum(w, 1))
        for j in range(m):
            a, start = int(accepted[j]), int(left[live[j]])
            chain = list(states[j, :a + 1])
            if a == w[j]:  # the bonus step from q at x~_w
                chain.append(_mean_q(chain[-1], start - a) + SIGMA_Q * rng.standard_normal(DIMS))
            else:
                chain.append(out[j])
            for k in range(len(chain) - 1):
                parents.append(chain[k])
                children.append(chain[k + 1])
                ts.append(start - k)
            x[live[j]] = chain[-1]
        left[live] -= accepted + 1
    return np.array(parents), np.array(children), np.array(ts), float(np.concatenate(accepted_all).mean())


def _direction_z(parents, children, ts) -> tuple[float, float]:
    """(z-score of the mean projection on the draft's offset, KS p-value) of the standardised
    transitions z = (child - mu_q(parent)) / sigma_q, N(0, I) under exactness."""
    z = (children - _mean_q(parents, ts[:, None])) / SIGMA_Q
    e = OFFSET / np.linalg.norm(OFFSET)
    proj = z @ e
    return float(proj.mean() * np.sqrt(len(proj))), float(stats.kstest(z.ravel(), "norm").pvalue)


def test_toy_chains_follow_the_target_law_and_a_wrong_weight_is_caught(monkeypatch):
    parents, children, ts, acceptance = toy_chains(20_000, seed=1)
    assert len(ts) == 20_000 * T and 0.3 < acceptance < 0.95  # drafts accepted and rejected
    z_dir, ks_p = _direction_z(parents, children, ts)
    assert abs(z_dir) < 3.5 and ks_p > 1e-3, (z_dir, ks_p)
    for t in range(1, T + 1):  # per transition too (the chi-square of |z|^2 per step)
        at = ts == t
        zt = ((children[at] - _mean_q(parents[at], t)) / SIGMA_Q).ravel()
        assert stats.chi2.sf((zt ** 2).sum(), zt.size) > 1e-4 and stats.chi2.cdf((zt ** 2).sum(), zt.size) > 1e-4

    # The same check's power: weights not clipped at 1 (an easy slip) favour the drafts.
    monkeypatch.setattr(coupling, "block_weights", unclipped_block_weights)
    z_biased, _ = _direction_z(*toy_chains(20_000, seed=2)[:3])
    assert z_biased > 6, z_biased
