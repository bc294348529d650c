"""The scikit-learn digits data set (bundled with scikit-learn, no download) at DiT's scale.

8x8 images with values 0..16 are upsampled (bilinear, align_corners=False semantics) to 16x16
and mapped to [-1, 1]. The split is fixed so the DiT, the classifier and the evaluator agree.
"""
from __future__ import annotations

import numpy as np

IMAGE_SIZE = 16
NUM_CLASSES = 10


def upsample_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """[N, h, w] -> [N, size, size], half-pixel centres (like torch's align_corners=False)."""
    n, h, w = images.shape

    def weights(src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(size) + 0.5) * src / size - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, pos - lo

    ylo, yhi, yf = weights(h)
    xlo, xhi, xf = weights(w)
    rows = images[:, ylo, :] * (1 - yf)[None, :, None] + images[:, yhi, :] * yf[None, :, None]
    return rows[:, :, xlo] * (1 - xf)[None, None, :] + rows[:, :, xhi] * xf[None, None, :]


def load_digits_split(split: str = "train", size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(images [N,1,size,size] float32 in [-1,1], labels [N] int64) for split 'train', 'test' or 'all'.

    'test' is every fifth image (360 of 1797), fixed; 'train' is the rest.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = upsample_bilinear(data.images.astype(np.float64) / 16.0, size) * 2.0 - 1.0
    images = images[:, None].astype(np.float32)
    labels = data.target.astype(np.int64)
    test = np.arange(len(labels)) % 5 == 0
    if split == "all":
        return images, labels
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose train, test or all")
    keep = test if split == "test" else ~test
    return images[keep], labels[keep]
