"""The Diffusion Transformer, state-dict compatible with facebookresearch/DiT.

Parameter names follow the official checkpoints so ``DiT-XL-2-256x256.pt`` loads without
renaming. ``forward`` returns both the model output (eps and, with learned sigma, the variance
interpolation v) and the top-block features h that FREE's drafter autoregresses.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from freedit.runtime.contract import CFG_MODES, DEFAULT_FIXED_VARIANCE, FIXED_VARIANCES, INFO_BOUNDS


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    cfg_mode: str = "reference"  # which eps channels CFG guides: "reference" (first 3) or "all"
    # Two details in which diffusers' DiTTransformer2DModel differs from DiT's models.py; checkpoints read
    # from a diffusers folder keep diffusers' values so freedit computes what diffusers computes there.
    timestep_freq_shift: int = 0  # sinusoid frequencies exp(-ln(1e4) i / (128 - shift)); diffusers: 1
    mlp_norm_eps: float = 1e-6  # eps of the LayerNorm before each block's MLP; diffusers: its norm_eps, 1e-5
    # Without learned sigma: which fixed variance the sampler uses (runtime/contract.py FIXED_VARIANCES);
    # "large" (log beta) is DiT's create_diffusion(learn_sigma=False) default.
    fixed_variance: str = DEFAULT_FIXED_VARIANCE

    def __post_init__(self):
        """Types and ranges first, so nothing is ever sized from a nonsensical config (metadata included)."""
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            value = getattr(self, name)
            lo, hi = INFO_BOUNDS.get(name, (1, 4096))
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"DiT config: {name} must be an integer in [{lo}, {hi}], got {value!r}")
        for name, lo, hi in (("mlp_ratio", 0.0, 64.0), ("class_dropout_prob", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"DiT config: {name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"DiT config: learn_sigma must be true or false, got {self.learn_sigma!r}")
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"DiT config: cfg_mode must be one of {', '.join(CFG_MODES)}, got {self.cfg_mode!r}")
        if self.fixed_variance not in FIXED_VARIANCES:
            raise ValueError(f"DiT config: fixed_variance must be one of {', '.join(FIXED_VARIANCES)}, "
                             f"got {self.fixed_variance!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.input_size % self.patch_size:
            raise ValueError(f"input size {self.input_size} is not divisible by patch size {self.patch_size}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        if not isinstance(data, dict):
            raise ValueError(f"DiT config must be a JSON object, got {type(data).__name__}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
#: The 12 official configs (depth, hidden, heads per size; patch 2/4/8), as in DiT's models.py.
OFFICIAL_CONFIGS = {
    f"DiT-{size}/{patch}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=patch)
    for size, (d, h, n) in _SIZES.items()
    for patch in (2, 4, 8)
}


def official_config(name: str, image_size: int = 256, **overrides) -> DiTConfig:
    """An official ImageNet config (latent = image/8, 4 channels, 1000 classes, learned sigma)."""
    if name not in OFFICIAL_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; known: {', '.join(OFFICIAL_CONFIGS)}")
    if image_size % 8:
        raise ValueError(f"image size {image_size} is not a multiple of 8 (the VAE's factor)")
    return DiTConfig(input_size=image_size // 8, **{**OFFICIAL_CONFIGS[name], **overrides})


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> torch.Tensor:
    """DiT's timestep sinusoid: cos first, then sin; always computed in fp32. ``freq_shift`` 1 is
    diffusers' ``downscale_freq_shift`` (frequencies over half - 1 instead of half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (MAE/DiT layout: w-grid first)."""
    coords_w, coords_h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(dim // 2, coords_w), one_axis(dim // 2, coords_h)], axis=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_size, self.freq_shift = frequency_size, freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_sinusoid(t, self.frequency_size, freq_shift=self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row (index num_classes) for the null label of CFG."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)

    def forward(self, y: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, hidden * 3, bias=True)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: shift/scale/gate for attention and MLP from the conditioning c."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig, initialize: bool = True):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, h)
        self.t_embedder = TimestepEmbedder(h, freq_shift=config.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, h, config.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, h), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(h, config.num_heads, config.mlp_ratio, config.mlp_norm_eps)
                                    for _ in range(config.depth))
        self.final_layer = FinalLayer(h, config.patch_size, config.out_channels)
        if initialize:  # not on the meta device, where only the shapes are wanted
            self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, zeroed adaLN and output (so every block starts as identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = int(self.config.num_patches**0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.config.hidden_size, grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for param in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(param)

    # The pieces below are public so that the drafter can reuse the frozen embedders and head.
    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_embedder(x) + self.pos_embed.to(x.dtype)

    def conditioning(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t) + self.y_embedder(y, self.training)

    def head(self, feat: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer + unpatchify: top-block features -> model output [B, out_channels, H, W]."""
        return self.unpatchify(self.final_layer(feat, c))

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        p, ch = self.config.patch_size, self.config.out_channels
        g = self.config.input_size // p
        x = tokens.reshape(tokens.shape[0], g, g, p, p, ch)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], ch, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,C,H,W], t [B] original timesteps, y [B] labels -> (eps_v [B,out,H,W], feat [B,T,hidden])."""
        c = self.conditioning(t, y)
        h = self.embed_input(x)
        for block in self.blocks:
            h = block(h, c)
        return self.head(h, c), h

    def guided_channels(self) -> int:
        """eps channels CFG guides: all in "all" mode, the first 3 (of 4 latent ones) in DiT's reference."""
        return self.config.in_channels if self.config.cfg_mode == "all" else min(3, self.config.in_channels)

    def cfg_combine(self, cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Guided output: eps_u + s (eps_c - eps_u) on the guided channels, the rest from the conditional row."""
        g = self.guided_channels()
        return torch.cat([uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:]], dim=1)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """DiT's guided call: batch = [cond half; null half] sharing x; returns the guided output for both halves."""
        half = len(x) // 2
        out, _ = self.forward(torch.cat([x[:half], x[:half]]), t, y)
        g = self.guided_channels()
        guided = self.cfg_combine(out[:half], out[half:], cfg_scale)[:, :g]
        # Like DiT, both halves carry the guided eps; the remaining channels stay per row.
        return torch.cat([torch.cat([guided, guided]), out[:, g:]], dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
