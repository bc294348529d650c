"""Latents to images for latent DiTs: the model directory's `vae_decoder`, on the DiT's backend.

ImageNet DiTs (DiT-XL/2 etc.) sample 4-channel latents of the SD VAE. The `vae_decoder` graph (the
latent scale inside, runtime/contract.py) turns them into RGB in about [-1, 1], and here into uint8
[N, H, W, 3]. It runs in micro-batches of at most ``batch_size`` latents (and no more rows than a
TensorRT plan's profile allows), each turned into uint8 before the next, so the float images of
one micro-batch are the only large buffer held, whatever N is.
"""
from __future__ import annotations

import numpy as np

from freedit.runtime.backends.base import Backend
from freedit.runtime.contract import ContractError, DecoderInfo, ModelInfo
from freedit.runtime.images import to_uint8

DECODER = "vae_decoder"


def is_latent(in_channels: int) -> bool:
    """Pixel DiTs sample 1 (grey) or 3 (RGB) channels; anything else is a VAE's latents (4 for the SD VAE)."""
    return in_channels not in (1, 3)


def check_decoder_matches(dit: ModelInfo, decoder: DecoderInfo, source: str) -> None:
    """A decoder exported for other latents (channels, size) is refused before any sampling."""
    diff = [f"{what} {got} vs {want} in the DiT" for what, got, want in (
        ("latent channels", decoder.latent_channels, dit.in_channels),
        ("latent size", decoder.latent_size, dit.input_size)) if got != want]
    if not is_latent(dit.in_channels):
        diff.append(f"the DiT samples {dit.in_channels}-channel pixels, not latents")
    if diff:
        raise ContractError(f"{source}: vae_decoder.onnx does not fit this DiT ({'; '.join(diff)}); re-export it with "
                            f"`freedit export --vae ...`")


def check_decode_batch(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"decode batch size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def decode_latents(backend: Backend, latents: np.ndarray, batch_size: int, progress: bool = False) -> np.ndarray:
    """Latents [N, C, h, w] -> uint8 RGB [N, H, W, 3], ``batch_size`` latents per decoder call at most."""
    limit = backend.max_rows(DECODER)
    step = min(check_decode_batch(batch_size), limit) if limit else check_decode_batch(batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(latents), desc="decoding", unit="image", leave=False)
    out = None
    try:
        for start in range(0, len(latents), step):
            chunk = np.ascontiguousarray(latents[start:start + step], dtype=np.float32)
            image = to_uint8(backend.run(DECODER, {"latent": chunk})["image"])
            if out is None:
                out = np.empty((len(latents), *image.shape[1:]), dtype=np.uint8)
            out[start:start + len(chunk)] = image
            if bar:
                bar.update(len(chunk))
    finally:
        if bar:
            bar.close()
    return out
