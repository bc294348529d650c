"""The target DiT as the samplers see it: guided model outputs for rows at their own timesteps."""
from __future__ import annotations

import numpy as np

from freedit.runtime.backends.base import Backend
from freedit.runtime.ops import cfg_combine
from freedit.runtime.schedule import Schedule


class Target:
    """One call = one batched DiT evaluation; with CFG, a conditional and a null row per state."""

    def __init__(self, backend: Backend, schedule: Schedule, cfg_scale: float, engine: str = "dit"):
        self.backend, self.schedule, self.cfg_scale, self.engine = backend, schedule, float(cfg_scale), engine
        self.info = backend.info(engine)
        self.calls = 0  # serial target calls made so far

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def __call__(self, x: np.ndarray, steps: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x [B,C,H,W] at respaced steps [B] -> (guided eps_v [B,out,H,W], conditional features [B,T,hidden])."""
        t = self.schedule.timesteps[np.asarray(steps)].astype(np.float32)
        y = np.asarray(labels, dtype=np.int64)
        if self.guided:
            null = np.full_like(y, self.info.null_label)
            out = self.backend.run(self.engine, {"x": np.concatenate([x, x]), "t": np.concatenate([t, t]),
                                                 "y": np.concatenate([y, null])})
            n = len(x)
            eps_v = cfg_combine(out["eps_v"][:n], out["eps_v"][n:], self.cfg_scale, self.info.in_channels,
                                self.info.cfg_mode)
            feat = out["feat"][:n]
        else:
            out = self.backend.run(self.engine, {"x": np.ascontiguousarray(x, dtype=np.float32), "t": t, "y": y})
            eps_v, feat = out["eps_v"], out["feat"]
        self.calls += 1
        return eps_v, feat
