"""Diffusion schedule coefficients: the one place they are computed (float64).

Matches facebookresearch/DiT's ``gaussian_diffusion.py`` and ``respace.py``: a linear beta
schedule over 1000 steps, respaced to N steps by DiT's rules; the torch code (export/), the
numpy samplers (runtime/) and the CUDA kernels all read their coefficients from here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DiT/ADM linear schedule: 1e-4 .. 0.02 over 1000 steps, scaled by 1000/T."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, spacing: str | int) -> list[int]:
    """Original timesteps kept by DiT's respacing rule, sorted ascending.

    ``spacing`` is ``"250"`` (or ``250``), a comma list of per-section counts (``"10,15,20"``) or
    ``"ddimN"`` (a constant integer stride giving exactly N steps).
    """
    text = str(spacing).strip()
    if text.startswith("ddim"):
        desired = _positive_int(text[len("ddim"):], text)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot make exactly {desired} steps from {num_timesteps} with an integer stride")
    counts = [_positive_int(part, text) for part in text.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate, then round, as DiT does: round(stride * j) breaks .5 ties differently.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def _positive_int(text: str, whole: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"step spacing {whole!r} is not a step count, a comma list of counts or 'ddimN'") from None
    if value < 1:
        raise ValueError(f"step spacing {whole!r}: step counts must be at least 1")
    return value


@dataclass(frozen=True)
class Schedule:
    """Per-step coefficients of a (possibly respaced) DDPM chain; index i = respaced step.

    ``timesteps[i]`` is the original timestep (0..999) the network is called with.
    """

    betas: np.ndarray
    timesteps: np.ndarray

    @classmethod
    def create(cls, spacing: str | int | None = None, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "Schedule":
        base = linear_betas(num_train_timesteps)
        if spacing is None or str(spacing) == "":
            return cls(betas=base, timesteps=np.arange(num_train_timesteps))
        kept = space_timesteps(num_train_timesteps, spacing)
        alphas_cumprod = np.cumprod(1.0 - base)
        # Respaced betas: 1 - abar(s_i) / abar(s_{i-1}); DiT's SpacedDiffusion.
        previous = np.concatenate([[1.0], alphas_cumprod[kept][:-1]])
        betas = 1.0 - alphas_cumprod[kept] / previous
        return cls(betas=betas, timesteps=np.asarray(kept, dtype=np.int64))

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    # The quantities below follow GaussianDiffusion.__init__ one for one.
    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def sqrt_recip_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 / self.alphas_cumprod)

    @property
    def sqrt_recipm1_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 / self.alphas_cumprod - 1.0)

    @property
    def posterior_variance(self) -> np.ndarray:
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        # The posterior variance is 0 at step 0; DiT clips by reusing step 1's value there.
        var = self.posterior_variance
        return np.log(np.append(var[1], var[1:])) if len(var) > 1 else np.array([np.log(self.betas[0])])

    @property
    def posterior_mean_coef1(self) -> np.ndarray:
        return self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> np.ndarray:
        return (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.alphas_cumprod)

    @property
    def log_betas(self) -> np.ndarray:
        return np.log(self.betas)

    def transition_table(self) -> np.ndarray:
        """[num_steps, 6] float64: the per-step constants every transition kernel needs.

        Columns: sqrt(1/abar), sqrt(1/abar - 1), posterior coef1, coef2, min log-var (clipped
        posterior), max log-var (log beta). One table, shared by numpy, torch and CUDA code.
        """
        return np.stack(
            [
                self.sqrt_recip_alphas_cumprod,
                self.sqrt_recipm1_alphas_cumprod,
                self.posterior_mean_coef1,
                self.posterior_mean_coef2,
                self.posterior_log_variance_clipped,
                self.log_betas,
            ],
            axis=1,
        )
