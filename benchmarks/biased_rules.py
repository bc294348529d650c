"""Deliberately biased variants of FREE's decide step, to prove that a lossless test has power.

Each rule is a small override of one function of the exact coupling (runtime/coupling.py), active
inside a ``with`` block; the round itself is not copied. The numpy round maths
(runtime/round_numpy.NumpyRoundMaths.commit) calls the coupling's ``accept`` and
``sample_residual`` through the module, so replacing them there changes what every numpy round
decides (the device maths has its own kernels and is not affected: run these with maths="numpy"):

* ``gamma0.8`` (and ``gamma0.9``, ``gamma0.95``): accept with min(1, (q/p)^0.8), i.e. the accept test with a constant gamma = 0.8
  (relax with a fixed temper): drafts where p > q are kept too often.
* ``draft-resample``: on rejection, commit a fresh sample of the draft's own p instead of the
  residual (q - p)^+ (the classic mistake: "just redraw"). Rows with equal covariances take the
  reflection coupling, which this rule leaves alone; the digits DiT learns its variance, so its
  rounds never have them.
* ``accept-all``: every draft accepted, so the output is the drafter's own chain (a gross bias).
* ``block-unclipped`` (block verification only): the prefix weights w_k = w_{k-1} q_k/p_k without
  the clip at 1, so a likely draft pays for an unlikely one (an easy slip when writing DESIGN §3.3.1).

"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import numpy as np

from freedit.runtime import coupling as _TARGET


@contextmanager
def _override(name: str, make):
    """Replace ``_TARGET.<name>`` by ``make(original)`` for the duration of the block."""
    original = getattr(_TARGET, name)
    setattr(_TARGET, name, make(original))
    try:
        yield
    finally:
        setattr(_TARGET, name, original)


def tempered_accept(gamma: float = 0.8):
    """Accept iff log U < min(0, gamma * log r) with a constant gamma < 1."""
    return _override("accept", lambda exact: lambda log_r, u, g=1.0: exact(log_r, u, gamma * np.asarray(g)))


def draft_resample_on_rejection():
    """On rejection, commit y ~ p (drawn with the residual's first proposal noise) instead of (q - p)^+."""

    def make(_exact):
        def resample(mean_p, log_var_p, mean_q, log_var_q, draw, max_attempts=None):
            rows = np.arange(len(mean_p))
            z, _ = draw(rows, np.zeros(len(rows), dtype=np.int64))
            y = (mean_p + np.exp(0.5 * log_var_p) * z).astype(np.float32)
            return y, np.ones(len(rows), dtype=np.int64), np.zeros(len(rows), dtype=bool)

        return resample

    return _override("sample_residual", make)


def accept_every_draft():
    """Every draft accepted: the drafter's own chain."""
    return _override("accept", lambda exact: lambda log_r, u, g=1.0: np.ones(len(log_r), dtype=bool))


def unclipped_block_weights(log_r: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """coupling.block_weights without the clip at 1: the plain running sum of log q/p."""
    running = np.concatenate([np.zeros((len(log_r), 1)), np.cumsum(log_r, axis=1)], axis=1)
    return np.where(np.arange(log_r.shape[1] + 1) <= np.asarray(windows)[:, None], running, -np.inf)


def block_unclipped():
    return _override("block_weights", lambda exact: unclipped_block_weights)


RULES = {"gamma0.8": tempered_accept, "gamma0.9": partial(tempered_accept, 0.9), "gamma0.95": partial(tempered_accept, 0.95),
         "draft-resample": draft_resample_on_rejection, "accept-all": accept_every_draft,
         "block-unclipped": block_unclipped}
