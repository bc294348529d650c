"""Sample-quality evaluator for the digits DiT: class accuracy and FD-digits.

The idea is FID at toy scale. A small MLP classifier trained on the real digits supplies
  * ``class_accuracy``: how often a sample conditioned on label y is classified as y, and
  * ``fd_digits``: the Frechet distance between Gaussians fitted to the classifier's last hidden
    layer features of the samples and of all real digits.

Inference is numpy only (no torch, no scikit-learn): the classifier weights and the reference
feature statistics (``ref_mu``, ``ref_sigma``) ship together in ``runtime/assets/digits/classifier.npz``.
scikit-learn is needed only to (re)train that file::

    python -m freedit.benchmarks.quality --out runtime/assets/digits/classifier.npz
"""
from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGE_SIZE = 16
NUM_CLASSES = 10
HIDDEN = (256, 64)
ASSET = "assets/digits/classifier.npz"
RECREATE_CMD = "python -m freedit.benchmarks.quality --out runtime/assets/digits/classifier.npz"


def default_classifier_path() -> Path:
    """Where the packaged classifier lives (inside the installed ``freedit.runtime`` package)."""
    return Path(str(importlib.resources.files("freedit.runtime") / ASSET))


def _flatten(images) -> np.ndarray:
    """[N,1,16,16] or [N,16,16] -> [N,256] float64, with a clear error for anything else."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"expected images of shape [N,1,{IMAGE_SIZE},{IMAGE_SIZE}] or [N,{IMAGE_SIZE},{IMAGE_SIZE}] "
            f"with values in [-1, 1], got shape {tuple(np.shape(images))}"
        )
    if x.shape[0] == 0:
        raise ValueError("expected at least one image, got N=0")
    return x.reshape(len(x), -1).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Classifier (numpy forward pass of a scikit-learn MLP)
# --------------------------------------------------------------------------------------------


class DigitsClassifier:
    """ReLU MLP 256 -> 256 -> 64 -> 10 evaluated in numpy (float64 for stable statistics)."""

    def __init__(self, weights: dict[str, np.ndarray]):
        n_layers = sum(1 for k in weights if k.startswith("w"))
        if n_layers < 2:
            raise ValueError("classifier weights need at least one hidden layer (keys w0, b0, w1, b1, ...)")
        self.weights = [np.asarray(weights[f"w{i}"], np.float64) for i in range(n_layers)]
        self.biases = [np.asarray(weights[f"b{i}"], np.float64) for i in range(n_layers)]
        self.ref_mu = np.asarray(weights["ref_mu"], np.float64) if "ref_mu" in weights else None
        self.ref_sigma = np.asarray(weights["ref_sigma"], np.float64) if "ref_sigma" in weights else None
        self.test_accuracy = float(weights["test_accuracy"]) if "test_accuracy" in weights else None

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "DigitsClassifier":
        """Load weights (and reference statistics) from an .npz; default: the packaged asset."""
        p = Path(path) if path is not None else default_classifier_path()
        if not p.is_file():
            raise FileNotFoundError(
                f"digits classifier not found at {p}; recreate it (needs scikit-learn) with:\n    {RECREATE_CMD}"
            )
        with np.load(p) as data:
            return cls({k: data[k] for k in data.files})

    def _hidden(self, images) -> np.ndarray:
        h = _flatten(images)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = np.maximum(h @ w + b, 0.0)
        return h

    def features(self, images) -> np.ndarray:
        """Last hidden layer activations [N, F] float64 (the FD-digits embedding)."""
        return self._hidden(images)

    def logits(self, images) -> np.ndarray:
        """Pre-softmax class scores [N, 10]."""
        return self._hidden(images) @ self.weights[-1] + self.biases[-1]

    def predict(self, images) -> np.ndarray:
        """Predicted labels [N] int64."""
        return np.argmax(self.logits(images), axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, F] features."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected features of shape [N>=2, F], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) -> 0."""
    vals, vecs = np.linalg.eigh((c + c.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """||mu_a - mu_b||^2 + tr(Ca) + tr(Cb) - 2 tr((Ca Cb)^1/2).

    tr((Ca Cb)^1/2) = tr((sqrt(Ca) Cb sqrt(Ca))^1/2), and the latter matrix is symmetric PSD, so
    its square root comes from eigh with no complex parts or scipy.sqrtm instabilities, even when
    the covariances are singular (dead ReLU units, fewer samples than features).
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu_a.shape} vs {mu_b.shape}, sigma {sigma_a.shape} vs {sigma_b.shape}")
    sa = _psd_sqrt(sigma_a)
    m = sa @ sigma_b @ sa
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean
    return float(max(fd, 0.0))  # clip round-off below zero (identical sets)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [Na, F] and [Nb, F]."""
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate(images, labels=None, reference=None, classifier: DigitsClassifier | None = None) -> dict:
    """Quality of generated digits.

    images: [N,1,16,16] or [N,16,16] in [-1, 1]; labels: the requested class per image (or None to
    skip class_accuracy). reference: None for the packaged statistics of all 1797 real digits,
    a (mu, sigma) pair, or an image array whose features are computed here.
    Returns {'class_accuracy', 'fd_digits', 'n'}.
    """
    clf = classifier if classifier is not None else DigitsClassifier.load()
    feats = clf.features(images)
    n = feats.shape[0]
    result: dict = {"n": int(n)}
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"got {n} images but {labels.shape[0]} labels")
        logits = feats @ clf.weights[-1] + clf.biases[-1]
        result["class_accuracy"] = float(np.mean(np.argmax(logits, axis=1) == labels))
    else:
        result["class_accuracy"] = None
    if reference is None:
        if clf.ref_mu is None or clf.ref_sigma is None:
            raise ValueError(f"classifier has no ref_mu/ref_sigma; pass reference= or rerun: {RECREATE_CMD}")
        ref_mu, ref_sigma = clf.ref_mu, clf.ref_sigma
    elif isinstance(reference, (tuple, list)) and len(reference) == 2:
        ref_mu, ref_sigma = reference
    else:
        ref_mu, ref_sigma = feature_stats(clf.features(reference))
    result["fd_digits"] = frechet_distance_from_stats(*feature_stats(feats), ref_mu, ref_sigma)
    return result


# --------------------------------------------------------------------------------------------
# Training (scikit-learn, imported lazily)
# --------------------------------------------------------------------------------------------


def _shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift [N,16,16] images by (dy, dx) pixels, filling with background (-1) instead of wrapping."""
    pad = np.pad(images, ((0, 0), (1, 1), (1, 1)), constant_values=-1.0)
    return pad[:, 1 - dy : 1 - dy + IMAGE_SIZE, 1 - dx : 1 - dx + IMAGE_SIZE]


def _augment(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """All 9 shifts within +-1 pixel, each with gaussian noise of random std in [0, 0.15].

    Generated samples are rarely perfectly centred or clean; training on jittered, noisy copies
    keeps the classifier (and its features) from overreacting to that.
    """
    x = images[:, 0].astype(np.float64)
    xs, ys = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            s = _shift(x, dy, dx)
            std = rng.uniform(0.0, 0.15, size=(len(s), 1, 1))
            xs.append(np.clip(s + std * rng.standard_normal(s.shape), -1.0, 1.0))
            ys.append(labels)
    return np.concatenate(xs).reshape(-1, IMAGE_SIZE * IMAGE_SIZE), np.concatenate(ys)


def train_classifier(seed: int = 0) -> dict[str, np.ndarray]:
    """Train the MLP on the augmented 'train' split; return {'w0','b0',...} float32 arrays."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from freedit.export.digits_data import load_digits_split

    images, labels = load_digits_split("train")
    x, y = _augment(images, labels, np.random.default_rng(seed))
    mlp = MLPClassifier(
        hidden_layer_sizes=HIDDEN,
        activation="relu",
        alpha=1e-3,
        batch_size=128,
        learning_rate_init=1e-3,
        max_iter=60,
        random_state=seed,
    )
    with warnings.catch_warnings():
        # A fixed epoch budget is deliberate (reproducible, quick); not converging to tol is fine.
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(x, y)
    if list(mlp.classes_) != list(range(NUM_CLASSES)):
        raise RuntimeError(f"unexpected classes {mlp.classes_}")
    out: dict[str, np.ndarray] = {}
    for i, (w, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_)):
        out[f"w{i}"] = w.astype(np.float32)
        out[f"b{i}"] = b.astype(np.float32)
    return out


def real_vs_real_fd(seed: int = 0, classifier: DigitsClassifier | None = None) -> float:
    """FD-digits between two disjoint random halves of all real digits (the floor a model can hope for)."""
    from freedit.export.digits_data import load_digits_split

    clf = classifier if classifier is not None else DigitsClassifier.load()
    images, _ = load_digits_split("all")
    perm = np.random.default_rng(seed).permutation(len(images))
    half = len(images) // 2
    return frechet_distance(clf.features(images[perm[:half]]), clf.features(images[perm[half:]]))


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz to a temp file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # a file object, so numpy doesn't append '.npz' to the name
            np.savez(f, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a packaged asset must be world-readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    """Train the classifier, store weights + reference stats, print test accuracy and real-vs-real FD."""
    parser = argparse.ArgumentParser(prog="python -m freedit.benchmarks.quality", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=None, help="output .npz (default: the packaged asset)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else default_classifier_path()

    from freedit.export.digits_data import load_digits_split

    t0 = time.perf_counter()
    weights = train_classifier(args.seed)
    clf = DigitsClassifier(weights)
    test_x, test_y = load_digits_split("test")
    acc = float(np.mean(clf.predict(test_x) == test_y))
    all_x, _ = load_digits_split("all")
    mu, sigma = feature_stats(clf.features(all_x))
    arrays = dict(weights)
    arrays["ref_mu"] = mu.astype(np.float64)
    arrays["ref_sigma"] = sigma.astype(np.float64)
    arrays["test_accuracy"] = np.array(acc, np.float64)
    arrays["seed"] = np.array(args.seed, np.int64)
    _save_atomic(out, arrays)
    rr = real_vs_real_fd(args.seed, DigitsClassifier(arrays))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB) in {time.perf_counter() - t0:.1f}s")
    print(f"test-split accuracy: {acc:.4f} ({int(round(acc * len(test_y)))}/{len(test_y)})")
    print(f"real-vs-real FD-digits (two random halves of all {len(all_x)} digits): {rr:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
