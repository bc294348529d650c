"""FREE: speculative sampling of a DiT with a drafter (DESIGN §3.2-3.5), numpy ops, any backend.

One round per active sample, all samples batched (windows are ragged: each sample drafts
L_s = min(L, step) transitions, never the final noiseless one):
  1. draft x~_1..x~_L from x~_0 = x with the drafter (parent features carried forward);
  2. verify: ONE target call on all x~_0..x~_L of every sample (per-row timesteps);
  3. decide positions in order with the exact coupling; the first rejection commits a residual
     sample and ends the sample's round; if all L pass, one bonus step from q_{L+1}.
The first round of a chain has no parent features: its window is empty (a plain DiT step).
Every committed transition is distributed as the DiT's from the committed parent, whatever the
drafter: the output law equals the sequential sampler's (lossless). Relax (lambda > 0) tempers
the test with gamma = 1 / (1 + lambda * u); lambda = 0 is bit-identical to lossless FREE.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from freedit.runtime import noise, ops
from freedit.runtime.coupling import coupled_step
from freedit.runtime.ragged import SampleState
from freedit.runtime.target import GuidedModel, join_rows, split_rows

#: Purposes of a residual proposal's noise and uniform: the attempt number goes in the high bits.
_ATTEMPT_SHIFT = 8


@dataclass
class Round:
    """One round's arrays, handed from draft to verify to decide (possibly on other threads)."""

    ids: np.ndarray
    labels: np.ndarray
    start: np.ndarray
    windows: np.ndarray
    shape: tuple
    x_tilde: list
    mean_p: dict
    log_var_p: dict
    eps_q: np.ndarray | None = None
    feat_q: np.ndarray | None = None
    mean_q: np.ndarray | None = None
    log_var_q: np.ndarray | None = None
    first_row: np.ndarray | None = None


@dataclass
class Carry:
    """What a committed state brings into its next round: the real outputs of its parent."""

    feat: np.ndarray  # [rows, T, H] the parent's real top-block features (rows = 2 with CFG)
    eps_v: np.ndarray  # [out, H, W] the parent's real guided model output


def uncertainty(log_var_q: np.ndarray, schedule, steps: np.ndarray) -> np.ndarray:
    """Relax's score u >= 0 per row: where the DiT puts its variance inside the schedule's range.

    u = mean over elements of (log var_q - log beta_tilde) / (log beta - log beta_tilde), i.e. the
    learned interpolation f = (v + 1) / 2; 0 for fixed-variance models. Large when the DiT hedges
    towards the larger variance, which is where drafts are hardest to match.
    """
    lo = schedule.posterior_log_variance_clipped[steps].reshape(-1, 1)
    hi = schedule.log_betas[steps].reshape(-1, 1)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    frac = (log_var_q.reshape(len(steps), -1) - lo) / span
    return np.clip(frac.mean(axis=1), 0.0, None)


class FeatureDrafter:
    """Drafts with the trained drafter engine (FREE)."""

    name = "free"

    def __init__(self, model: GuidedModel):
        self.model = model

    def __call__(self, x, steps, labels, carry_feat, carry_eps_v):
        # The features carried in are always those of the state one respaced step earlier (the real
        # parent at the first position, the previous drafted position after it): step + 1.
        eps_v, feat = self.model(x, steps, labels, feat=join_rows(carry_feat), feat_steps=steps + 1)
        return eps_v, split_rows(feat, self.model.guided)


class FrozenDrafter:
    """Training-free baseline (De Bortoli et al.): reuse the latest real (eps, v) at every step."""

    name = "frozen"

    def __call__(self, x, steps, labels, carry_feat, carry_eps_v):
        return carry_eps_v, carry_feat


class SpeculativeSampler:
    def __init__(self, target: GuidedModel, drafter, seed: int, window: int = 6, relax: float = 0.0,
                 window_schedule: np.ndarray | None = None):
        if not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window length L must be an integer >= 1, got {window!r}")
        if window_schedule is not None:  # L per respaced step (adaptive window); 0 = a plain step
            window_schedule = np.asarray(window_schedule)
            if (window_schedule.ndim != 1 or len(window_schedule) != target.schedule.num_steps
                    or window_schedule.dtype.kind not in "iu" or window_schedule.min() < 0):
                raise ValueError(f"a window schedule needs one integer L >= 0 per step ({target.schedule.num_steps})")
        self.window_schedule = window_schedule
        if not np.isfinite(relax) or relax < 0:
            raise ValueError(f"relax lambda must be >= 0, got {relax}")
        self.target, self.drafter, self.seed = target, drafter, seed
        self.window, self.relax = int(window), float(relax)
        self.schedule = target.schedule
        self.name = drafter.name if relax == 0 else f"{drafter.name}-relax"

    # -- noise, keyed by (seed, sample, transition index, purpose) --------------------------------
    def _normal(self, ids, steps, purpose, shape):
        return noise.normal(self.seed, ids, steps, purpose, shape)

    def _uniform(self, ids, steps, purpose):
        return noise.uniform(self.seed, ids, steps, purpose, 1)[:, 0]

    def _window_at(self, step: int) -> int:
        # Any L chosen from the current step alone keeps the sampler exact: each committed
        # transition is distributed as the DiT's whatever was drafted.
        return self.window if self.window_schedule is None else int(self.window_schedule[step])

    def advance(self, states: list[SampleState]) -> None:
        """One round for every state: draft, verify (one target call), decide and commit."""
        self.decide(states, self.verify(self.draft(states)))

    def draft(self, states: list[SampleState]) -> "Round":
        """Step 1 (drafter only): x~_1..x~_L per sample and the draft transitions p_k."""
        sched = self.schedule
        ids = np.array([s.index for s in states])
        labels = np.array([s.label for s in states])
        start = np.array([s.step for s in states])
        windows = np.array([0 if s.stats.get("carry") is None else min(self._window_at(s.step), s.step) for s in states])
        shape = states[0].x.shape
        # 1. Draft. drafts[k] holds x~_k for all samples (only rows with windows >= k are meaningful).
        x_tilde = [np.stack([s.x for s in states])]
        mean_p, log_var_p = {}, {}
        carries = [s.stats.get("carry") for s in states]
        for k in range(1, int(windows.max(initial=0)) + 1):
            rows = np.flatnonzero(windows >= k)
            steps = start[rows] - k + 1
            if k == 1:
                feat = np.stack([carries[i].feat for i in rows])
                eps_carry = np.stack([carries[i].eps_v for i in rows])
            else:  # carry the drafted features of the previous position (rows only shrink)
                keep = np.searchsorted(prev_rows, rows)
                feat, eps_carry = feat[keep], eps_carry[keep]
            eps_v, feat = self.drafter(x_tilde[k - 1][rows], steps, labels[rows], feat, eps_carry)
            mp, lvp = ops.transition(sched, x_tilde[k - 1][rows], eps_v, steps)
            z = self._normal(ids[rows], steps, noise.Purpose.DRAFT, shape)
            nxt = x_tilde[k - 1].copy()
            nxt[rows] = (mp + np.exp(0.5 * lvp) * z).astype(np.float32)
            x_tilde.append(nxt)
            mean_p[k], log_var_p[k] = np.zeros_like(nxt), np.zeros_like(nxt)  # rows outside the window stay unused
            mean_p[k][rows], log_var_p[k][rows] = mp, lvp
            prev_rows = rows
        return Round(ids, labels, start, windows, shape, x_tilde, mean_p, log_var_p)

    def verify(self, r: "Round") -> "Round":
        """Step 2 (target only): one batched call on every sample's x~_0..x~_L -> q_1..q_{L+1}."""
        sched, labels, start, windows, x_tilde = self.schedule, r.labels, r.start, r.windows, r.x_tilde
        n_states = len(r.ids)
        # 2. Verify: one target call on every sample's x~_0..x~_L (sample-major, ragged).
        owner = np.repeat(np.arange(n_states), windows + 1)
        position = np.concatenate([np.arange(w + 1) for w in windows])
        v_steps = start[owner] - position
        v_x = np.stack([x_tilde[k][i] for i, k in zip(owner, position)])
        eps_q, feat_q = self.target(v_x, v_steps, labels[owner])
        mean_q, log_var_q = ops.transition(sched, v_x, eps_q, v_steps)
        feat_q = split_rows(feat_q, self.target.guided)
        first_row = np.concatenate([[0], np.cumsum(windows + 1)[:-1]])
        r.eps_q, r.feat_q, r.mean_q, r.log_var_q, r.first_row = eps_q, feat_q, mean_q, log_var_q, first_row
        return r

    def decide(self, states: list[SampleState], r: "Round") -> None:
        """Step 3 (host maths, no model): accept test, residual or bonus step, commit."""
        sched, n_states, shape = self.schedule, len(states), r.shape
        ids, start, windows, x_tilde, mean_p, log_var_p = r.ids, r.start, r.windows, r.x_tilde, r.mean_p, r.log_var_p
        eps_q, feat_q, mean_q, log_var_q, first_row = r.eps_q, r.feat_q, r.mean_q, r.log_var_q, r.first_row
        # 3. Decide, position by position, for the samples still alive.
        alive = np.ones(n_states, dtype=bool)
        committed = [None] * n_states
        accepted = np.zeros(n_states, dtype=np.int64)
        decisions = [[] for _ in range(n_states)]
        proposals = np.zeros(n_states, dtype=np.int64)
        caps = np.zeros(n_states, dtype=np.int64)
        for k in range(1, int(windows.max(initial=0)) + 1):
            idx = np.flatnonzero(alive & (windows >= k))
            if len(idx) == 0:
                break
            q_rows = first_row[idx] + k - 1  # q_k is the target's transition from x~_{k-1}
            steps = start[idx] - k + 1
            mp, lvp = mean_p[k][idx], log_var_p[k][idx]
            gamma = 1.0
            if self.relax > 0:
                gamma = 1.0 / (1.0 + self.relax * uncertainty(log_var_q[q_rows], sched, steps))
            u = self._uniform(ids[idx], steps, noise.Purpose.ACCEPT)

            def residual_draw(rows, attempts, ids_k=ids[idx], steps_k=steps):
                purpose = attempts.astype(np.int64) << _ATTEMPT_SHIFT
                return (self._normal(ids_k[rows], steps_k[rows], noise.Purpose.RESIDUAL + purpose, shape),
                        self._uniform(ids_k[rows], steps_k[rows], noise.Purpose.RESIDUAL_ACCEPT + purpose))

            out, ok, props, cap = coupled_step(x_tilde[k][idx], mp, lvp, mean_q[q_rows], log_var_q[q_rows], u, gamma,
                                               residual_draw)
            for j, i in enumerate(idx):
                decisions[i].append((int(steps[j]), bool(ok[j])))
                if ok[j]:
                    accepted[i] += 1
                else:
                    committed[i] = out[j]
                    alive[i] = False
            proposals[idx] += props
            caps[idx] += cap
        # Bonus step for samples that accepted their whole window: x ~ q_{L+1} from x~_L.
        bonus = np.flatnonzero(alive)
        if len(bonus):
            rows = first_row[bonus] + windows[bonus]
            steps = start[bonus] - windows[bonus]
            z = self._normal(ids[bonus], steps, noise.Purpose.STEP, shape)
            x_new = ops.ddpm_step(mean_q[rows], log_var_q[rows], steps, z)
            for j, i in enumerate(bonus):
                committed[i] = x_new[j]
        # Commit: the new state's parent is x~ at the last committed transition's start.
        for i, s in enumerate(states):
            n_commit = accepted[i] + 1
            parent_row = first_row[i] + n_commit - 1
            s.x = committed[i]
            s.step = int(start[i] - n_commit)
            s.stats["carry"] = Carry(feat_q[parent_row], eps_q[parent_row])
            st = s.stats
            st["target_calls"] = st.get("target_calls", 0) + 1
            st.setdefault("drafted", []).append(int(windows[i]))
            st.setdefault("accepted", []).append(int(accepted[i]))
            st.setdefault("decisions", []).extend(decisions[i])
            st["residual_proposals"] = st.get("residual_proposals", 0) + int(proposals[i])
            st["residual_cap_hits"] = st.get("residual_cap_hits", 0) + int(caps[i])
            if s.done:
                st.pop("carry")
