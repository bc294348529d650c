"""Images out of the sampler: [-1, 1] floats to uint8, grids, and PNG files written atomically."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """[N,C,H,W] in [-1,1] -> [N,H,W] (one channel) or [N,H,W,C] uint8."""
    img = np.clip((samples + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    img = np.transpose(img, (0, 2, 3, 1))
    return img[..., 0] if img.shape[-1] == 1 else img


def make_grid(images: np.ndarray, ncol: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile uint8 images [N,H,W(,C)] into one image, ``ncol`` per row, nearest-neighbour upscaled."""
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w = images.shape[:3]
    nrow = -(-n // ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad) + images.shape[3:], dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    return grid


def check_writable(path: str | Path) -> Path:
    """Fail before any work if ``path`` cannot be written (missing or read-only folder)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"output path {path} is a folder; give a file name such as {path / 'grid.png'}")
    if not folder.is_dir():
        raise ValueError(f"output folder {folder} does not exist; create it or choose another --out")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"output folder {folder} is not writable; choose another --out")
    return path


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write a PNG through a temporary name, so a failure never leaves a partial file."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
