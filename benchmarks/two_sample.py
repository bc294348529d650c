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


# --------------------------------------------------------------------------------------------
# Within-class tests: the class each image was asked for is known, balanced and shared by both
# samples, so comparing class by class removes the between-class variance that dominates the
# features and leaves a bias inside a class nothing to hide behind. Permutations shuffle the
# sample labels within each class, which keeps the test exact under the null.
# --------------------------------------------------------------------------------------------


def _check_pair(a, b, classes_a, classes_b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    classes_a, classes_b = np.asarray(classes_a), np.asarray(classes_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(classes_a) != len(a) or len(classes_b) != len(b):
        raise ValueError(f"need two [N, d] feature arrays with the same d and one class per row, got {a.shape} "
                         f"({len(classes_a)} classes) and {b.shape} ({len(classes_b)} classes)")
    return a, b, classes_a, classes_b


def _groups(a, b, classes_a, classes_b) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class present in both samples: (pooled rows, is-from-a mask), features scaled by the pooled std."""
    pooled = np.concatenate([a, b])
    pooled = pooled / (pooled.std(0) + 1e-8)
    classes = np.concatenate([classes_a, classes_b])
    from_a = np.concatenate([np.ones(len(a), bool), np.zeros(len(b), bool)])
    out = []
    for c in np.intersect1d(classes_a, classes_b):
        rows = classes == c
        if from_a[rows].sum() >= 2 and (~from_a[rows]).sum() >= 2:
            out.append((pooled[rows], from_a[rows]))
    if not out:
        raise ValueError("no class has at least 2 rows in both samples")
    return out


def _energy(d: np.ndarray, s: np.ndarray) -> float:
    """n m / (n + m) * (2 E|X-Y| - E|X-X'| - E|Y-Y'|) for the split s (True = first sample), V-statistics."""
    s = s.astype(np.float64)
    n, m = s.sum(), len(s) - s.sum()
    ds = d @ s
    xx, xy = s @ ds, (1.0 - s) @ ds
    yy = d.sum() - 2.0 * xy - xx
    return float(n * m / (n + m) * (2.0 * xy / (n * m) - xx / n**2 - yy / m**2))


def energy_test(a, b, classes_a, classes_b, permutations: int = 1000, seed: int = 0) -> dict:
    """Within-class energy distance (Szekely & Rizzo) of features a vs b, summed over classes, and its
    permutation p-value. Sensitive to any difference of the class-conditional laws."""
    a, b, classes_a, classes_b = _check_pair(a, b, classes_a, classes_b)
    groups = [(np.sqrt(_sq_dists(z)), s) for z, s in _groups(a, b, classes_a, classes_b)]
    observed = sum(_energy(d, s) for d, s in groups)
    rng = np.random.default_rng(seed)
    exceed = sum(sum(_energy(d, rng.permutation(s)) for d, s in groups) >= observed for _ in range(permutations))
    return {"energy": observed, "p_value": (exceed + 1) / (permutations + 1), "permutations": permutations,
            "classes": len(groups), "n_a": len(a), "n_b": len(b)}


def _lda_accuracy(z: np.ndarray, s: np.ndarray, folds: np.ndarray, ridge: float) -> float:
    """Cross-fitted accuracy of Fisher's linear discriminant telling s = True rows from the others."""
    correct = 0
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        za, zb = z[train & s], z[train & ~s]
        centred = np.concatenate([za - za.mean(0), zb - zb.mean(0)])
        cov = centred.T @ centred / max(len(centred) - 2, 1)
        w = np.linalg.solve(cov + ridge * np.trace(cov) / len(cov) * np.eye(len(cov)), za.mean(0) - zb.mean(0))
        threshold = w @ (za.mean(0) + zb.mean(0)) / 2
        correct += int(((z[test] @ w > threshold) == s[test]).sum())
    return correct / len(z)


def classifier_test(a, b, classes_a, classes_b, permutations: int = 200, folds: int = 5, ridge: float = 0.1,
                    seed: int = 0) -> dict:
    """Classifier two-sample test (Lopez-Paz & Oquab, ICLR 2017) on class-centred features: a linear
    discriminant learns to tell a from b on some folds and is scored on the others; the p-value
    compares its accuracy with the accuracies after within-class permutations of the sample labels.
    Centring every class on its pooled mean (label-blind, so the permutations stay exact) asks
    the classifier for a bias shared across classes rather than the classes themselves."""
    a, b, classes_a, classes_b = _check_pair(a, b, classes_a, classes_b)
    groups = _groups(a, b, classes_a, classes_b)
    z = np.concatenate([g - g.mean(0) for g, _ in groups])
    s_parts = [s for _, s in groups]
    rng = np.random.default_rng(seed)
    fold = np.concatenate([rng.permutation(np.arange(len(s)) % folds) for s in s_parts])
    observed = _lda_accuracy(z, np.concatenate(s_parts), fold, ridge)
    null = [_lda_accuracy(z, np.concatenate([rng.permutation(s) for s in s_parts]), fold, ridge)
            for _ in range(permutations)]
    exceed = sum(v >= observed for v in null)
    return {"accuracy": observed, "null_mean": float(np.mean(null)), "p_value": (exceed + 1) / (permutations + 1),
            "permutations": permutations, "folds": folds, "n_a": len(a), "n_b": len(b)}


# --------------------------------------------------------------------------------------------
# One run's summary figures against a reference sampler run over several seeds (the acceptance
# matrix: is this entry's class accuracy / FD-digits what the sequential sampler gives?).
# --------------------------------------------------------------------------------------------


def error_count_test(errors: int, n: int, ref_errors: int, ref_n: int) -> float:
    """Two-sided Fisher exact p that errors / n and the pooled reference's ref_errors / ref_n share one rate."""
    from scipy.stats import fisher_exact

    if not (0 <= errors <= n and 0 <= ref_errors <= ref_n and n > 0 and ref_n > 0):
        raise ValueError(f"error counts out of range: {errors}/{n}, {ref_errors}/{ref_n}")
    return float(fisher_exact([[errors, n - errors], [ref_errors, ref_n - ref_errors]])[1])


def prediction_t_test(value: float, reference) -> float:
    """Two-sided p that value is one more draw from the normal law of the k reference values.

    t = (value - mean) / (std * sqrt(1 + 1/k)) has k - 1 degrees of freedom: the reference's own
    mean and std are estimates, so this is the prediction interval, not mean +- z std."""
    from scipy.stats import t as student

    ref = np.asarray(reference, np.float64)
    if ref.ndim != 1 or len(ref) < 2 or not np.isfinite(ref).all() or not np.isfinite(value):
        raise ValueError("need >= 2 finite reference values and a finite value")
    scale = ref.std(ddof=1) * np.sqrt(1 + 1 / len(ref))
    if scale == 0:
        return 1.0 if value == ref[0] else 0.0
    return float(2 * student.sf(abs(value - ref.mean()) / scale, len(ref) - 1))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values: family-wise error control under any dependence between the tests
    (entries of one matrix share labels and seed, so they are not independent)."""
    p = np.asarray(p_values, np.float64)
    order = np.argsort(p)
    adjusted = np.maximum.accumulate(np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order]))
    out = np.empty_like(p)
    out[order] = adjusted
    return out
