"""The DiT's own sequential samplers (DDPM and DDIM): one target call per step for every row."""
from __future__ import annotations

import numpy as np

from freedit.runtime import noise, ops
from freedit.runtime.ragged import SampleState
from freedit.runtime.target import GuidedModel


class SequentialSampler:
    """DDPM ancestral sampling (DiT's p_sample_loop) or DDIM (eta = 0) when ``ddim`` is set."""

    name = "sequential"

    def __init__(self, target: GuidedModel, seed: int, ddim: bool = False):
        self.target, self.seed, self.ddim = target, seed, ddim

    def advance(self, states: list[SampleState]) -> None:
        x = np.stack([s.x for s in states])
        steps = np.array([s.step for s in states])
        labels = np.array([s.label for s in states])
        eps_v, _ = self.target(x, steps, labels)
        schedule = self.target.schedule
        if self.ddim:
            x_next = ops.ddim_step(schedule, x, eps_v, steps)
        else:
            mean, log_var = ops.transition(schedule, x, eps_v, steps, self.target.info.fixed_variance)
            z = noise.normal(self.seed, [s.index for s in states], steps, noise.Purpose.STEP, x.shape[1:])
            x_next = ops.ddpm_step(mean, log_var, steps, z)
        for state, new in zip(states, x_next):
            state.x = new
            state.step -= 1
            state.stats["target_calls"] = state.stats.get("target_calls", 0) + 1
