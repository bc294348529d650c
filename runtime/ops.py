"""Numpy sampling maths: CFG combination and the DDPM/DDIM transitions.

These are the CPU path and the oracle the CUDA kernels are tested against. Every function is
batched over rows with a per-row respaced step index, so ragged batches need nothing special.
"""
from __future__ import annotations

import numpy as np

from freedit.runtime.contract import CFG_MODES, DEFAULT_FIXED_VARIANCE
from freedit.runtime.schedule import Schedule


def guided_channels(mode: str, channels: int) -> int:
    """How many epsilon channels CFG guides: DiT's reference guides 3 (of 4 latent channels)."""
    if mode == "all":
        return channels
    if mode == "reference":
        return min(3, channels)
    raise ValueError(f"unknown CFG mode {mode!r}; choose one of {', '.join(CFG_MODES)}")


def cfg_combine(cond: np.ndarray, uncond: np.ndarray, scale: float, channels: int, mode: str = "all") -> np.ndarray:
    """eps_g = eps_u + s (eps_c - eps_u) on the guided channels; the rest (and v) from the conditional row.

    ``cond``/``uncond`` are model outputs [B, 2C, H, W] (learned sigma) or [B, C, H, W].
    """
    g = guided_channels(mode, channels)
    out = np.array(cond, dtype=np.float32, copy=True)
    out[:, :g] = uncond[:, :g] + np.float32(scale) * (cond[:, :g] - uncond[:, :g])
    return out


def split_model_output(eps_v: np.ndarray, channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(eps, v) from a model output; v is None for fixed-variance models."""
    if eps_v.shape[1] == 2 * channels:
        return eps_v[:, :channels], eps_v[:, channels:]
    return eps_v, None


def _per_row(values: np.ndarray, steps: np.ndarray, ndim: int) -> np.ndarray:
    return values[np.asarray(steps)].reshape((-1,) + (1,) * (ndim - 1))


def predict_x0(schedule: Schedule, x: np.ndarray, eps: np.ndarray, steps: np.ndarray) -> np.ndarray:
    return (_per_row(schedule.sqrt_recip_alphas_cumprod, steps, x.ndim) * x
            - _per_row(schedule.sqrt_recipm1_alphas_cumprod, steps, x.ndim) * eps)


def transition(schedule: Schedule, x: np.ndarray, eps_v: np.ndarray, steps: np.ndarray,
               fixed_variance: str = DEFAULT_FIXED_VARIANCE) -> tuple[np.ndarray, np.ndarray]:
    """Mean and log-variance of p(x_{i-1} | x_i) for rows at respaced steps ``steps``.

    Learned sigma: log var = f log beta + (1 - f) log beta_tilde (clipped), f = (v + 1) / 2.
    Fixed variance: ``"large"`` uses beta (DiT's default without learned sigma), ``"small"`` the clipped
    posterior variance; ModelInfo.fixed_variance says which a model was trained for.
    Returns float32 arrays shaped like ``x`` (the log-variance broadcast to it).
    """
    x64 = x.astype(np.float64)
    eps, v = split_model_output(eps_v.astype(np.float64), x.shape[1])
    x0 = predict_x0(schedule, x64, eps, steps)
    mean = (_per_row(schedule.posterior_mean_coef1, steps, x.ndim) * x0
            + _per_row(schedule.posterior_mean_coef2, steps, x.ndim) * x64)
    min_log = _per_row(schedule.posterior_log_variance_clipped, steps, x.ndim)
    max_log = _per_row(schedule.log_betas, steps, x.ndim)
    if v is not None:
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
    elif fixed_variance == "small":
        log_var = np.broadcast_to(min_log, x.shape)
    elif fixed_variance == "large":
        # DiT/ADM "fixed large" uses the posterior variance at step 0 and beta elsewhere.
        large = np.log(np.append(schedule.posterior_variance[1], schedule.betas[1:]))
        log_var = np.broadcast_to(_per_row(large, steps, x.ndim), x.shape)
    else:
        raise ValueError(f"unknown fixed variance {fixed_variance!r}; choose 'small' or 'large'")
    return mean.astype(np.float32), np.ascontiguousarray(log_var, dtype=np.float32)


def ddpm_step(mean: np.ndarray, log_var: np.ndarray, steps: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """x_{i-1} = mean + sigma * z, without noise on rows at the last step (i = 0)."""
    nonzero = (np.asarray(steps) != 0).reshape((-1,) + (1,) * (mean.ndim - 1))
    return (mean + nonzero * np.exp(0.5 * log_var) * noise).astype(np.float32)


def ddim_step(schedule: Schedule, x: np.ndarray, eps_v: np.ndarray, steps: np.ndarray,
              noise: np.ndarray | None = None, eta: float = 0.0) -> np.ndarray:
    """DDIM update (DiT's ddim_sample, no x0 clipping); eta = 0 is deterministic."""
    x64 = x.astype(np.float64)
    eps, _ = split_model_output(eps_v.astype(np.float64), x.shape[1])
    x0 = predict_x0(schedule, x64, eps, steps)
    # eps recomputed from x0 as DiT does (identical in exact arithmetic; kept for parity).
    eps = ((_per_row(schedule.sqrt_recip_alphas_cumprod, steps, x.ndim) * x64 - x0)
           / _per_row(schedule.sqrt_recipm1_alphas_cumprod, steps, x.ndim))
    abar = _per_row(schedule.alphas_cumprod, steps, x.ndim)
    abar_prev = _per_row(schedule.alphas_cumprod_prev, steps, x.ndim)
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
    out = x0 * np.sqrt(abar_prev) + np.sqrt(1 - abar_prev - sigma**2) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("DDIM with eta > 0 needs noise")
        nonzero = (np.asarray(steps) != 0).reshape((-1,) + (1,) * (x.ndim - 1))
        out = out + nonzero * sigma * noise
    return out.astype(np.float32)
