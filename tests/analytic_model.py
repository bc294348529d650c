"""A numpy Backend whose sampling law is known in closed form: class-conditional Gaussian data.

Data: x0 | y ~ N(m_y, s^2 I) for classes y < num_classes; the null label (= num_classes) uses
m_null (the average of the class means). The ``dit`` engine returns the Bayes-optimal epsilon

    eps*(x_t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) m_y) / (abar_t s^2 + 1 - abar_t)

at the ORIGINAL timestep t of the 1000-step linear schedule (the runtime passes t as float), plus
a learned-range variance channel v(t) (so eps_v has 2C channels). Every transition is then
linear-Gaussian in x, and with CFG on all channels, eps_g = eps_null + s (eps_cond - eps_null) is
the optimal eps of Gaussian data with mean m_g = m_null + s (m_y - m_null). So the whole DDPM chain
x_{i-1} = a_i x_i + b_i + sigma_i z is linear-Gaussian with scalars per element, and the law of
the final sample is Gaussian, isotropic: ``exact_final_law`` propagates mean and variance.

The ``drafter`` engine is deliberately POOR: its eps is the optimal eps for the WRONG class means
(m + drafter_bias), shifted by ``drafter_eps_bias`` (an error in eps space, which keeps TV(p, q)
away from 0 even at the noisiest steps, where the mean error's effect c_t sqrt(abar_t) bias
vanishes; the two have the same sign so they never cancel: a step with TV ~ 1e-3 would make the
residual sampler run into its attempt cap), and its v differs from the target's by
``drafter_v_offset`` (so draft and target covariances differ: the residual rejection path), unless
the offset is 0 (equal covariances: the reflection path).
"""
from __future__ import annotations

import numpy as np

from freedit.runtime.backends.base import Backend
from freedit.runtime.contract import ModelInfo
from freedit.runtime.schedule import Schedule, linear_betas

INFO = ModelInfo(input_size=4, in_channels=1, patch_size=2, hidden_size=4, num_classes=3, learn_sigma=True,
                 cfg_mode="all")


def target_v(t: np.ndarray) -> np.ndarray:
    """The target's variance channel: a fixed function of the original timestep, inside (-1, 1)."""
    return 0.6 * np.tanh(np.asarray(t, dtype=np.float64) / 500.0 - 1.0) + 0.1


class AnalyticBackend(Backend):
    name = "analytic"

    def __init__(self, data_std: float = 0.5, seed: int = 0, drafter_bias: float = 0.35,
                 drafter_eps_bias: float = -0.08, drafter_v_offset: float = 0.25, info: ModelInfo = INFO,
                 with_drafter: bool = True):
        self.info_ = info
        self.s = float(data_std)
        shape = (info.in_channels, info.input_size, info.input_size)
        rng = np.random.default_rng(seed)
        means = rng.normal(0.0, 1.0, size=(info.num_classes, *shape))
        self.means = np.concatenate([means, means.mean(axis=0, keepdims=True)])  # row num_classes: m_null
        self.drafter_bias = float(drafter_bias)
        self.drafter_eps_bias = float(drafter_eps_bias)
        self.drafter_v_offset = float(drafter_v_offset)
        self.with_drafter = with_drafter
        self.alphas_cumprod = np.cumprod(1.0 - linear_betas())  # the ORIGINAL 1000-step schedule
        self.calls = {"dit": 0, "drafter": 0}

    # -- the Backend interface ---------------------------------------------------------------------
    def engines(self) -> tuple[str, ...]:
        return ("dit", "drafter") if self.with_drafter else ("dit",)

    def info(self, engine: str) -> ModelInfo:
        if engine not in self.engines():
            raise KeyError(engine)
        return self.info_

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, t, y = inputs["x"], inputs["t"], inputs["y"]
        n = len(x)
        assert x.dtype == np.float32 and x.shape[1:] == (self.info_.in_channels, self.info_.input_size,
                                                         self.info_.input_size), x.shape
        assert t.dtype == np.float32 and t.shape == (n,) and y.dtype == np.int64 and y.shape == (n,)
        assert np.all((0 <= y) & (y <= self.info_.num_classes))
        self.calls[engine] += 1
        if engine == "dit":
            assert set(inputs) == {"x", "t", "y"}
            eps = self.optimal_eps(x, t, y, bias=0.0)
            v = target_v(t)
            return {"eps_v": self._eps_v(eps, v), "feat": self.features(x, t)}
        if engine == "drafter":
            feat = inputs["feat"]
            assert feat.dtype == np.float32 and feat.shape == (n, self.info_.num_tokens, self.info_.hidden_size)
            eps = self.optimal_eps(x, t, y, bias=self.drafter_bias) + self.drafter_eps_bias
            v = target_v(t) + self.drafter_v_offset
            draft_feat = (0.5 * feat + self.features(x, t)).astype(np.float32)
            return {"draft_feat": draft_feat, "eps_v": self._eps_v(eps, v)}
        raise KeyError(engine)

    # -- the model ---------------------------------------------------------------------------------
    def _abar(self, t: np.ndarray) -> np.ndarray:
        ti = np.rint(np.asarray(t, dtype=np.float64)).astype(np.int64)
        assert np.all(np.abs(ti - t) == 0), "the runtime must pass integral original timesteps"
        return self.alphas_cumprod[ti]

    def optimal_eps(self, x, t, y, bias: float = 0.0) -> np.ndarray:
        abar = self._abar(t).reshape(-1, 1, 1, 1)
        m = self.means[np.asarray(y)] + bias
        return np.sqrt(1.0 - abar) * (x.astype(np.float64) - np.sqrt(abar) * m) / (abar * self.s**2 + 1.0 - abar)

    def _eps_v(self, eps: np.ndarray, v: np.ndarray) -> np.ndarray:
        v = np.broadcast_to(np.asarray(v, dtype=np.float64).reshape(-1, 1, 1, 1), eps.shape)
        return np.concatenate([eps, v], axis=1).astype(np.float32)

    def features(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """[B, T, hidden]: the patches of x (patch p: hidden = C p^2), shifted by t/1000."""
        b, c, h, w = x.shape
        p = self.info_.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return (patches + np.asarray(t, dtype=np.float32).reshape(-1, 1, 1) / 1000.0).astype(np.float32)

    def guided_mean(self, label: int, cfg_scale: float) -> np.ndarray:
        m_null = self.means[self.info_.num_classes]
        return m_null + cfg_scale * (self.means[label] - m_null)

    # -- the oracle --------------------------------------------------------------------------------
    def exact_final_law(self, schedule: Schedule, label: int, cfg_scale: float) -> tuple[np.ndarray, float]:
        """(mean [C,H,W], variance per element) of x_0 from the sequential guided DDPM chain.

        x_T ~ N(0, I); step i (N-1 .. 0): x_{i-1} = coef1 x0hat + coef2 x + sigma_i z with
        x0hat = sqrt(1/abar) x - sqrt(1/abar - 1) eps_g(x), eps_g = c (x - sqrt(abar) m_g),
        c = sqrt(1 - abar) / (abar s^2 + 1 - abar); log sigma_i^2 = f log beta + (1 - f) log
        beta_tilde_clipped, f = (v + 1) / 2; no noise at i = 0.
        """
        mean, var = np.zeros(self.means.shape[1:]), 1.0
        for i in reversed(range(schedule.num_steps)):
            a, b, log_var = self.step_law(schedule, i, label, cfg_scale)
            mean = a * mean + b
            var = a * a * var + (np.exp(log_var) if i > 0 else 0.0)
        return mean, float(var)

    def step_law(self, schedule: Schedule, i: int, label: int, cfg_scale: float) -> tuple[float, np.ndarray, float]:
        """(a, b [C,H,W], log sigma^2) of the guided target transition at respaced step i:
        mean(x) = a x + b elementwise, variance sigma^2 per element (independent of x)."""
        m_g = self.guided_mean(label, cfg_scale)
        t = schedule.timesteps[i]
        abar = self.alphas_cumprod[t]
        assert np.isclose(abar, schedule.alphas_cumprod[i], rtol=1e-12, atol=0)
        c = np.sqrt(1.0 - abar) / (abar * self.s**2 + 1.0 - abar)
        r1, rm1 = schedule.sqrt_recip_alphas_cumprod[i], schedule.sqrt_recipm1_alphas_cumprod[i]
        c1, c2 = schedule.posterior_mean_coef1[i], schedule.posterior_mean_coef2[i]
        a = c1 * (r1 - rm1 * c) + c2
        b = c1 * rm1 * c * np.sqrt(abar) * m_g
        f = (target_v(t) + 1.0) / 2.0
        log_var = f * schedule.log_betas[i] + (1.0 - f) * schedule.posterior_log_variance_clipped[i]
        return float(a), b, float(log_var)

