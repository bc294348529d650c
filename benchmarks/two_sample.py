"""Two-sample tests for the lossless claim: are FREE's samples distributed as the sequential sampler's?

The statistic is the unbiased squared MMD with a Gaussian kernel (bandwidth: median pairwise
distance of the pooled sample) on the digits classifier's features, with a permutation p-value
(Gretton et al., JMLR 2012). A chi-square test on the classifier's predicted labels is a cruder
second view.
"""
from __future__ import annotations

import numpy as np


def _sq_dists(z: np.ndarray) -> np.ndarray:
    sq = (z * z).sum(1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)


def _mmd2_from_kernel(k: np.ndarray, n: int) -> float:
    """Unbiased MMD^2 for the first n rows/cols vs the rest of a pooled kernel matrix."""
    m = len(k) - n
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2.0 * kxy.mean())


def mmd_test(a: np.ndarray, b: np.ndarray, permutations: int = 500, seed: int = 0) -> dict:
    """MMD^2 of samples a [n, d] vs b [m, d] and its permutation p-value."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [N, d] feature arrays with the same d and N >= 2, got {a.shape} and {b.shape}")
    pooled = np.concatenate([a, b])
    pooled = (pooled - pooled.mean(0)) / (pooled.std(0) + 1e-8)
    d2 = _sq_dists(pooled)
    bandwidth = np.median(d2[np.triu_indices(len(pooled), 1)])
    k = np.exp(-d2 / max(bandwidth, 1e-12))
    observed = _mmd2_from_kernel(k, len(a))
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(permutations):
        p = rng.permutation(len(pooled))
        exceed += _mmd2_from_kernel(k[np.ix_(p, p)], len(a)) >= observed
    return {"mmd2": observed, "p_value": (exceed + 1) / (permutations + 1), "permutations": permutations,
            "n_a": len(a), "n_b": len(b)}


def label_chi2_test(pred_a: np.ndarray, pred_b: np.ndarray, num_classes: int = 10) -> dict:
    """Chi-square test of homogeneity on predicted labels (classes seen in either sample)."""
    from scipy.stats import chi2_contingency

    table = np.stack([np.bincount(pred_a, minlength=num_classes), np.bincount(pred_b, minlength=num_classes)])
    table = table[:, table.sum(0) > 0]
    stat, p, dof, _ = chi2_contingency(table)
    return {"chi2": float(stat), "p_value": float(p), "dof": int(dof)}
