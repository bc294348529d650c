"""Models as the samplers see them: guided outputs for rows at their own timesteps.

``GuidedModel`` wraps one engine (the target ``dit`` or the ``drafter``). With CFG every state
becomes a conditional and a null-label row; the guided eps comes from both, the rest (v) from the
conditional row. Features are returned for all rows ([cond; null]) since the drafter needs both.
"""
from __future__ import annotations

import time

import numpy as np

from freedit.runtime.backends.base import Backend
from freedit.runtime.ops import cfg_combine
from freedit.runtime.schedule import Schedule


class GuidedModel:
    def __init__(self, backend: Backend, schedule: Schedule, cfg_scale: float, engine: str = "dit"):
        self.backend, self.schedule, self.cfg_scale, self.engine = backend, schedule, float(cfg_scale), engine
        self.info = backend.info(engine)
        # A drafter exported with the parent's timestep (contract input `t_feat`) gets it; older ones do not.
        self.takes_parent_time = "t_feat" in backend.inputs(engine)
        self.calls = 0  # batched calls made so far
        self.rows = 0  # states evaluated so far (each is 2 rows with CFG)
        self.seconds = 0.0  # wall time inside the backend (the drafter vs verifier split)

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def __call__(self, x: np.ndarray, steps: np.ndarray, labels: np.ndarray, feat: np.ndarray | None = None,
                 feat_steps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """x [B,C,H,W] at respaced steps [B] (and, for a drafter, parent features and the respaced
        steps they were computed at) -> (guided eps_v [B,out,H,W], features [B or 2B, T, hidden]:
        conditional rows first)."""
        t = self.schedule.timesteps[np.asarray(steps)].astype(np.float32)
        y = np.asarray(labels, dtype=np.int64)
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows = 2 if self.guided else 1
        if self.guided:
            x, t, y = np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([y, np.full_like(y, self.info.null_label)])
        inputs = {"x": x, "t": t, "y": y}
        if feat is not None:
            inputs["feat"] = np.ascontiguousarray(feat, dtype=np.float32)
        if self.takes_parent_time:
            if feat_steps is None:
                raise ValueError(f"the {self.engine} engine takes the parent's timestep: pass feat_steps")
            inputs["t_feat"] = np.tile(self.schedule.timesteps[np.asarray(feat_steps)].astype(np.float32), rows)
        t0 = time.perf_counter()
        out = self.backend.run(self.engine, inputs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.rows += len(steps)
        eps_v = out["eps_v"]
        if self.guided:
            n = len(steps)
            eps_v = cfg_combine(eps_v[:n], eps_v[n:], self.cfg_scale, self.info.in_channels, self.info.cfg_mode)
        return eps_v, out["draft_feat" if feat is not None else "feat"]


def split_rows(feat: np.ndarray, guided: bool) -> np.ndarray:
    """[2B or B, T, H] -> per-state [B, rows, T, H] (rows = 2 with CFG: cond, null)."""
    if not guided:
        return feat[:, None]
    n = len(feat) // 2
    return np.stack([feat[:n], feat[n:]], axis=1)


def join_rows(per_state: np.ndarray) -> np.ndarray:
    """Inverse of split_rows: [B, rows, T, H] -> [rows*B, T, H] with all cond rows first."""
    return np.concatenate([per_state[:, r] for r in range(per_state.shape[1])], axis=0)
