"""Images out of the sampler: [-1, 1] floats to uint8, grids, and PNG files (via runtime/outputs.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from freedit.runtime.outputs import write_outputs


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


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image [H,W] or [H,W,C] encoded as PNG."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write a PNG as runtime/outputs.py writes every output: all of it or nothing, devices in place."""
    write_outputs({path: png_bytes(image)})
