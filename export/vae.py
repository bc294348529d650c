"""The SD VAE decoder for latent DiTs (DiT-XL/2 etc.), through diffusers' AutoencoderKL (extra `vae`).

DiT samples latents of the Stable Diffusion VAE (stabilityai/sd-vae-ft-ema or -mse) and decodes
them with ``vae.decode(latent / 0.18215)``; the `vae_decoder` graph includes that scaling, so the
runtime hands it the sampler's final latents as they are.
"""
from __future__ import annotations

from pathlib import Path

import torch

from freedit.runtime.contract import CONTRACT_METADATA_KEY

SD_VAE_SCALE = 0.18215  # DiT's sample.py: vae.decode(samples / 0.18215)
# The architecture of stabilityai/sd-vae-ft-ema (its config.json), for random-weight engines.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu",
                     block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=256,
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


class VaeDecoderGraph(torch.nn.Module):
    """The `vae_decoder` contract: latent [B,4,h,w] -> image [B,3,8h,8w] in about [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, latent):
        # A 1-tuple, like the other graphs' output tuples (parity and polygraphy zip names with outputs).
        return (self.decoder(self.post_quant_conv(latent / SD_VAE_SCALE)),)


def load_vae(source: str, **config_overrides):
    """``source``: a diffusers folder or hub id (stabilityai/sd-vae-ft-ema), or "random" for the SD VAE
    architecture with random weights (engine sizing and tests; images are noise)."""
    try:
        from diffusers import AutoencoderKL
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the VAE decoder needs diffusers: pip install 'freedit[vae]'", name="diffusers") from None
    if source == "random":
        torch.manual_seed(0)
        return AutoencoderKL(**{**SD_VAE_CONFIG, **config_overrides}).eval()
    if Path(source).exists() and not (Path(source) / "config.json").is_file():
        raise ValueError(f"{source} is not a diffusers AutoencoderKL folder (no config.json)")
    return AutoencoderKL.from_pretrained(source).eval()


def vae_spec(vae, latent_size: int):
    from freedit.export.onnx_export import GraphSpec

    channels = vae.config.latent_channels

    def inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"latent": torch.randn(batch, channels, latent_size, latent_size, generator=g) * SD_VAE_SCALE * 5}

    meta = {CONTRACT_METADATA_KEY: "vae_decoder", "freedit.vae_scale": str(SD_VAE_SCALE)}
    return GraphSpec("vae_decoder", VaeDecoderGraph(vae).eval(), inputs, ("image",), meta)
