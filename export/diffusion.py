"""Diffusion maths in torch for training: forward noising, the transition and DiT's hybrid loss.

Coefficients come from ``freedit.runtime.schedule`` (float64, one place); this module only
gathers them per row. The loss is DiT's: MSE on eps plus the variational bound term that
teaches the learned variance (with the mean's gradient stopped), in bits per dimension.
"""
from __future__ import annotations

import math

import torch

from freedit.runtime.schedule import Schedule


class TorchSchedule:
    """Per-row gathers of a Schedule's coefficients as float32 tensors."""

    def __init__(self, schedule: Schedule, device: torch.device | str = "cpu"):
        self.schedule = schedule
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        self.table = as_t(schedule.transition_table())  # [N, 6]
        self.sqrt_abar = as_t(schedule.alphas_cumprod**0.5)
        self.sqrt_one_minus_abar = as_t((1.0 - schedule.alphas_cumprod) ** 0.5)
        self.timesteps = torch.as_tensor(schedule.timesteps, dtype=torch.float32, device=device)

    def gather(self, values: torch.Tensor, steps: torch.Tensor, ndim: int) -> torch.Tensor:
        return values[steps].reshape((-1,) + (1,) * (ndim - 1))

    def q_sample(self, x0: torch.Tensor, steps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.gather(self.sqrt_abar, steps, x0.ndim) * x0 + self.gather(self.sqrt_one_minus_abar, steps, x0.ndim) * noise

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        col = lambda j: self.gather(self.table[:, j], steps, xt.ndim)  # noqa: E731
        return col(2) * x0 + col(3) * xt, col(4).expand_as(xt)

    def transition(self, xt: torch.Tensor, eps_v: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model transition (mean, log-variance) from eps and v; learned-range variance."""
        c = xt.shape[1]
        eps, v = eps_v[:, :c], eps_v[:, c:]
        col = lambda j: self.gather(self.table[:, j], steps, xt.ndim)  # noqa: E731
        x0 = col(0) * xt - col(1) * eps
        frac = (v + 1.0) / 2.0
        return col(2) * x0 + col(3) * xt, frac * col(5) + (1.0 - frac) * col(4)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (ADM's decoder term)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def hybrid_loss(model, sched: TorchSchedule, x0: torch.Tensor, y: torch.Tensor, generator=None) -> dict:
    """DiT's training loss for a learned-sigma model: mse(eps) + vb (per-sample means)."""
    steps = torch.randint(0, sched.schedule.num_steps, (x0.shape[0],), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    xt = sched.q_sample(x0, steps, noise)
    eps_v, _ = model(xt, sched.timesteps[steps], y)
    c = x0.shape[1]
    mse = ((noise - eps_v[:, :c]) ** 2).flatten(1).mean(1)
    # The vb term trains only the variance: the mean's gradient is stopped, as in DiT.
    frozen = torch.cat([eps_v[:, :c].detach(), eps_v[:, c:]], dim=1)
    mean, log_var = sched.transition(xt, frozen, steps)
    true_mean, true_log_var = sched.posterior(x0, xt, steps)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
    vb = torch.where(steps == 0, nll, kl)
    return {"loss": (mse + vb).mean(), "mse": mse.mean(), "vb": vb.mean()}
