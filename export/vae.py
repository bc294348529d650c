"""The SD VAE decoder for latent DiTs (DiT-XL/2 etc.), through diffusers' AutoencoderKL (extra `vae`).

DiT samples latents of the Stable Diffusion VAE (stabilityai/sd-vae-ft-ema or -mse) and decodes
them with ``vae.decode(latent / 0.18215)``; the `vae_decoder` graph includes that scaling (the VAE
config's ``scaling_factor``, 0.18215 for the SD VAE), so the runtime hands it the sampler's final
latents as they are.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from freedit.errors import ExportError
from freedit.runtime.contract import CONTRACT_METADATA_KEY, DECODER_METADATA_KEY

SD_VAE_SCALE = 0.18215  # DiT's sample.py: vae.decode(samples / 0.18215)
# The architecture of stabilityai/sd-vae-ft-ema (its config.json), for random-weight engines.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu",
                     block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=256,
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


class VaeDecoderGraph(torch.nn.Module):
    """The `vae_decoder` contract: latent [B,C,h,w] -> image [B,3,8h,8w] in about [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder
        self.scale, self.shift = float(vae.config.scaling_factor), vae.config.shift_factor

    def forward(self, latent):
        z = latent / self.scale
        if self.shift is not None:
            z = z + self.shift
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        # A 1-tuple, like the other graphs' output tuples (parity and polygraphy zip names with outputs).
        return (self.decoder(z),)


def random_config(source: str) -> dict:
    """``random``: the SD VAE's architecture; ``random:W``: the same layout with widths W, 2W, 4W, 4W
    (the SD VAE is W = 128), for tests and sizing at a fraction of the cost."""
    if source == "random":
        return dict(SD_VAE_CONFIG)
    width = source.removeprefix("random:")
    if not width.isdigit() or int(width) % 4 or not 4 <= int(width) <= 512:
        raise ValueError(f"--vae {source!r}: random:W takes a base width W that is a multiple of 4 in 4..512 "
                         f"(the SD VAE is random:128)")
    w = int(width)
    return {**SD_VAE_CONFIG, "block_out_channels": [w, 2 * w, 4 * w, 4 * w], "norm_num_groups": w // 4}


def load_vae(source: str, **config_overrides):
    """``source``: a diffusers AutoencoderKL folder (or a pipeline folder with ``vae/``), a hub id
    (stabilityai/sd-vae-ft-ema), or "random" / "random:W" for the SD VAE architecture with random
    weights (engine sizing and tests; images are noise)."""
    try:
        from diffusers import AutoencoderKL
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the VAE decoder needs diffusers: pip install 'freedit[vae]'", name="diffusers") from None
    if source.startswith("random"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return AutoencoderKL(**{**random_config(source), **config_overrides}).eval()
    path = Path(source)
    if path.exists():
        if (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise ValueError(f"{source} is not a diffusers AutoencoderKL folder (no config.json)")
        try:
            cls = json.loads((path / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path / 'config.json'} is not readable JSON ({exc})") from None
        if cls != "AutoencoderKL":
            raise ValueError(f"{path / 'config.json'}: _class_name {cls!r} is not the SD VAE's AutoencoderKL")
        source = str(path)
    return AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False).eval()  # no `accelerate` needed


def check_vae_fits(vae, latent_channels: int, source: str) -> None:
    """The decoder must take the DiT's latents: refuse a VAE with another latent channel count."""
    if vae.config.latent_channels != latent_channels:
        raise ExportError(f"{source}: the VAE has latent_channels {vae.config.latent_channels}, the DiT samples "
                          f"{latent_channels}-channel latents")


def decoder_metadata(vae, latent_size: int) -> dict:
    """What the runtime checks a decoder against (runtime/contract.py DecoderInfo)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return {"latent_channels": int(vae.config.latent_channels), "latent_size": int(latent_size),
            "image_size": int(latent_size * factor), "scaling_factor": float(vae.config.scaling_factor)}


def vae_spec(vae, latent_size: int):
    from freedit.export.onnx_export import GraphSpec

    channels = vae.config.latent_channels
    scale = float(vae.config.scaling_factor)

    def inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)  # about the spread of the sampler's final latents
        return {"latent": torch.randn(batch, channels, latent_size, latent_size, generator=g) * scale * 5}

    meta = {CONTRACT_METADATA_KEY: "vae_decoder", DECODER_METADATA_KEY: json.dumps(decoder_metadata(vae, latent_size))}
    return GraphSpec("vae_decoder", VaeDecoderGraph(vae).eval(), inputs, ("image",), meta)


def save_vae(vae, folder: str | Path) -> None:
    """A diffusers folder (config.json + safetensors) for the torch backend; written beside and renamed."""
    folder = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        vae.save_pretrained(str(staging))
        if folder.exists():
            shutil.rmtree(folder)
        staging.replace(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
