"""The exact coupling of speculative sampling (DESIGN §3.3), batched over rows, numpy only.

A draft x ~ p = N(mu_p, diag e^{lv_p}) is accepted with probability min(1, q(x)/p(x)); on
rejection the committed state is drawn from the residual (q - p)^+, so the committed state is
distributed exactly as q = N(mu_q, diag e^{lv_q}) whatever p is:
  * equal covariances: reflection maximal coupling, one shot, no extra randomness;
  * unequal covariances (learned sigma): rejection sampling of the residual (propose y ~ q, keep
    with probability max(0, 1 - p(y)/q(y))). A rejected row needs 1/TV(p, q) proposals on average
    (one per decided step overall), so a row whose TV is small can need thousands: proposals are
    drawn only for pending rows, in chunks that double, and the first success in attempt order is
    kept (the same law as one at a time). A huge cap bounds the work; hits are reported.
Block verification (DESIGN §3.3.1) uses the same sampler with a weight w <= 1 per row.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

_LOG_2PI = math.log(2.0 * math.pi)

#: Residual proposals per rejected row before giving up (expected: 1 / TV(p, q) per rejection).
#: A decision hits it with probability TV (1 - TV)^cap <= 1 / (e cap), i.e. < 4e-7 per decision.
MAX_RESIDUAL_ATTEMPTS = 1 << 20
#: Bound on proposal elements drawn per chunk (memory), and on a chunk's length.
_CHUNK_ELEMENTS, _MAX_CHUNK = 1 << 22, 4096


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).astype(np.float64)


def log_density(x: np.ndarray, mean: np.ndarray, log_var: np.ndarray) -> np.ndarray:
    """Per-row log N(x; mean, diag exp(log_var)), summed over all elements, float64."""
    x, mean, log_var = _flat(x), _flat(mean), _flat(log_var)
    return -0.5 * (((x - mean) ** 2) * np.exp(-log_var) + log_var + _LOG_2PI).sum(axis=1)


def log_ratio(x, mean_p, log_var_p, mean_q, log_var_q) -> np.ndarray:
    """log q(x) - log p(x) per row (the accept statistic)."""
    return log_density(x, mean_q, log_var_q) - log_density(x, mean_p, log_var_p)


def accept(log_r: np.ndarray, uniform: np.ndarray, gamma: np.ndarray | float = 1.0) -> np.ndarray:
    """Accept iff log U < min(0, gamma * log r); gamma = 1 is the exact test, gamma < 1 relaxes it."""
    return np.log(uniform) < np.minimum(0.0, np.asarray(gamma) * log_r)


def reflect(x: np.ndarray, mean_p: np.ndarray, mean_q: np.ndarray, log_var: np.ndarray) -> np.ndarray:
    """Reflection coupling for equal covariances: the residual sample from a rejected draft x.

    z = (x - mu_p)/sigma, d = (mu_p - mu_q)/sigma, e = d/|d|: x' = mu_q + sigma (z - 2 (e.z) e).
    """
    shape = x.shape
    x, mean_p, mean_q = _flat(x), _flat(mean_p), _flat(mean_q)
    sigma = np.exp(0.5 * _flat(log_var))
    z = (x - mean_p) / sigma
    d = (mean_p - mean_q) / sigma
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    e = np.divide(d, norm, out=np.zeros_like(d), where=norm > 0)
    out = mean_q + sigma * (z - 2.0 * (e * z).sum(axis=1, keepdims=True) * e)
    return out.reshape(shape).astype(np.float32)


def sample_residual(mean_p, log_var_p, mean_q, log_var_q,
                    draw: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                    max_attempts: int = MAX_RESIDUAL_ATTEMPTS, log_weight: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sample (q - p)^+ per row by rejection.

    ``draw(rows, attempts)`` returns the proposal noise (z [len, ...], u [len]) of attempt number
    ``attempts[j]`` of row ``rows[j]``: keyed noise, so the result does not depend on chunking.
    Returns (samples float32, proposals used per row, cap_hit per row). A row that hits the cap
    keeps its last proposal, an exactness violation the caller must report.

    With ``log_weight`` (log w <= 0 per row) it is one level of block verification (DESIGN
    §3.3.1): each proposal y ~ q ends the level with probability max(0, w - p(y)/q(y)), the
    residual of w q - p, or passes it on to the level below with probability 1 - w; the returned
    tuple gains ``stopped`` per row (False: passed on). w = 1 is the plain residual, bit for bit.
    """
    rows = mean_q.shape[0]
    per_row = int(np.prod(mean_q.shape[1:]))
    out = np.zeros(mean_q.shape, dtype=np.float32)
    proposals = np.zeros(rows, dtype=np.int64)
    lw = np.zeros(rows) if log_weight is None else np.asarray(log_weight, dtype=np.float64)
    passed = np.zeros(rows, dtype=bool)
    pending = np.arange(rows)
    sigma_q = np.exp(0.5 * log_var_q)
    done, chunk = 0, 1
    while len(pending) and done < max_attempts:
        k = int(min(chunk, max_attempts - done, max(1, _CHUNK_ELEMENTS // (len(pending) * per_row))))
        r = np.repeat(pending, k)
        z, u = draw(r, np.tile(np.arange(done, done + k), len(pending)))
        y = (mean_q[r] + sigma_q[r] * z).astype(np.float32)
        # stop with probability w - p(y)/q(y) = -w expm1(-(log r + log w)) where that is > 0
        lr = log_ratio(y, mean_p[r], log_var_p[r], mean_q[r], log_var_q[r]) + lw[r]
        w = np.exp(lw[r])
        stop_mass = np.where(lr > 0, -w * np.expm1(-np.maximum(lr, 0.0)), 0.0)
        keep = ((lr > 0) & (u < stop_mass)).reshape(len(pending), k)
        pass_on = ((u >= stop_mass) & (u < stop_mass - np.expm1(lw[r]))).reshape(len(pending), k)
        ended = keep | pass_on
        hit = ended.any(axis=1)
        first = np.where(hit, ended.argmax(axis=1), k - 1)
        y = y.reshape((len(pending), k) + mean_q.shape[1:])
        out[pending] = y[np.arange(len(pending)), first]  # rows still pending are overwritten later
        passed[pending] = hit & pass_on[np.arange(len(pending)), first]
        proposals[pending] = done + first + 1
        pending = pending[~hit]
        done += k
        chunk = min(2 * chunk, _MAX_CHUNK)
    cap_hit = np.zeros(rows, dtype=bool)
    cap_hit[pending] = True
    if log_weight is None:
        return out, proposals, cap_hit
    return out, proposals, cap_hit, ~passed


def block_weights(log_r: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """log w_k of block verification per row: w_0 = 1, w_k = min(1, w_{k-1} q_k(x_k) / p_k(x_k)).

    ``log_r`` [rows, K] holds log q/p of draft positions 1..K (entries past a row's window are
    ignored); returns [rows, K + 1], -inf past each row's window.
    """
    rows, K = log_r.shape
    out = np.full((rows, K + 1), -np.inf)
    out[:, 0] = 0.0
    for k in range(1, K + 1):
        out[:, k] = np.where(k <= windows, np.minimum(0.0, out[:, k - 1] + log_r[:, k - 1]), -np.inf)
    return out


def block_verify(log_r: np.ndarray, windows: np.ndarray, top_uniform: np.ndarray,
                 level: Callable[[np.ndarray, int, np.ndarray], tuple], out: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block verification of n drafted windows (DESIGN §3.3.1): (accepted drafts, proposals, cap hits).

    ``log_r`` [n, K]: log q/p of draft positions 1..K (past a row's window ignored); ``windows`` [n];
    ``top_uniform`` [n]: the uniform of the top level (all drafts stand with probability w_L);
    ``level(rows, i, log_w)`` samples level i of those rows, i.e. returns sample_residual(...,
    log_weight=log_w) for the draft of position i + 1 against the target's transition from x~_i.
    ``out`` [n, E] receives the committed sample where accepted < window (the round's new state).
    """
    n, K = log_r.shape
    lw = block_weights(log_r, windows)
    accepted = np.where(np.log(top_uniform) < lw[np.arange(n), windows], windows, -1)
    proposals = np.zeros(n, dtype=np.int64)
    caps = np.zeros(n, dtype=bool)
    for i in range(K - 1, -1, -1):
        todo = np.flatnonzero((accepted < 0) & (windows > i))
        if not len(todo):
            continue
        y, props, cap, stopped = level(todo, i, lw[todo, i])
        proposals[todo] += props
        caps[todo] |= cap
        end = stopped | cap  # a cap hit keeps its last proposal, reported as an exactness violation
        out[todo[end]] = y[end].reshape(int(end.sum()), out.shape[1])
        accepted[todo[end]] = i
    return accepted, proposals, caps


def equal_variance(log_var_p: np.ndarray, log_var_q: np.ndarray) -> np.ndarray:
    """Rows whose covariances are identical (reflection applies)."""
    return np.all(_flat(log_var_p) == _flat(log_var_q), axis=1)


def coupled_step(x_draft, mean_p, log_var_p, mean_q, log_var_q, u_accept, gamma, residual_draw):
    """Decide one window position for a set of rows: (committed, accepted, proposals, cap_hit).

    ``residual_draw(rows, attempts)`` supplies the residual proposals' noise (see sample_residual).
    """
    lr = log_ratio(x_draft, mean_p, log_var_p, mean_q, log_var_q)
    ok = accept(lr, u_accept, gamma)
    committed = np.array(x_draft, dtype=np.float32, copy=True)
    proposals = np.zeros(len(ok), dtype=np.int64)
    cap_hit = np.zeros(len(ok), dtype=bool)
    rejected = ~ok
    if rejected.any():
        same = equal_variance(log_var_p, log_var_q) & rejected
        if same.any():
            committed[same] = reflect(x_draft[same], mean_p[same], mean_q[same], log_var_q[same])
        other = rejected & ~same
        if other.any():
            idx = np.flatnonzero(other)
            res, props, caps = sample_residual(mean_p[idx], log_var_p[idx], mean_q[idx], log_var_q[idx],
                                               lambda rows, attempts: residual_draw(idx[rows], attempts))
            committed[idx], proposals[idx], cap_hit[idx] = res, props, caps
    return committed, ok, proposals, cap_hit
