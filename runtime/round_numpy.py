"""The round's maths in numpy: the CPU path, and the oracle the fused kernels are checked against.

Each method is one entry point of the kernels' round (runtime/csrc/round.cu, freedit_round_*),
with the same buffers and the same semantics, built from the project's numpy maths: ops.py
(transitions, CFG), noise.py (keyed Philox), coupling.py (the exact accept test and residual).
"""
from __future__ import annotations

import numpy as np

from freedit.runtime import coupling, noise, ops
from freedit.runtime.round import (ATTEMPT_SHIFT, FLAG_CAP_HIT, FLAG_NONFINITE, NONFINITE_BASE, RoundMaths, RoundSettings, RoundSpec,
                                   Workspace, layout)
from freedit.runtime.streams import HostLane, InlineLane


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


def draft_gap(mean_p: np.ndarray, mean_q: np.ndarray, log_var_q: np.ndarray) -> np.ndarray:
    """Relax's "gap" score per row: |mu_p - mu_q| in the DiT's standard deviations (float64 sums).

    The exact test's acceptance is a function of it for equal variances (1 - TV = 2 Phi(-gap / 2)),
    so it tracks rejection draft by draft, which the variance score does not (correlations per
    timestep: benchmarks/results/relax_score.md).
    """
    d = mean_p.astype(np.float64) - mean_q.astype(np.float64)
    return np.sqrt((d * d * np.exp(-log_var_q.astype(np.float64))).sum(axis=1))


def relax_gamma(settings: RoundSettings, mean_p, log_var_p, mean_q, log_var_q, steps) -> np.ndarray | float:
    """gamma = 1 / (1 + lambda u) of each draft row; exactly 1 when lambda = 0 (lossless)."""
    if settings.relax <= 0:
        return 1.0
    if settings.relax_score == "variance":
        u = uncertainty(log_var_q, settings.schedule, steps)
    else:
        u = draft_gap(mean_p, mean_q, log_var_q)
    return 1.0 / (1.0 + settings.relax * u)


class NumpyRoundMaths(RoundMaths):
    kind = "numpy"

    def workspace(self, spec: RoundSpec) -> Workspace:
        ws = Workspace(spec, {name: np.zeros(shape, dtype) for name, (shape, dtype) in layout(spec).items()})
        ws.buffers["step"][:] = -1
        ws.buffers["results"] = np.zeros((0, *spec.state_shape), np.float32)
        return ws

    def configure(self, ws: Workspace, settings: RoundSettings) -> None:
        ws.settings = settings

    def lanes(self, overlap: bool, timing: bool) -> tuple:
        return (HostLane("draft"), HostLane("verify")) if overlap else (InlineLane(), InlineLane())

    def reserve_results(self, ws: Workspace, n: int) -> None:
        if len(ws["results"]) < n:
            ws.buffers["results"] = np.zeros((n, *ws.spec.state_shape), np.float32)

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _shape(ws):
        return ws.spec.state_shape

    @staticmethod
    def _stream(ws, slots: np.ndarray) -> np.ndarray | int:
        """Block verification keys a round's draws by its start step too: a failed block's drafts and
        residual proposals depend on the decision made, so a later round must not reuse them."""
        return ws["step"][slots].astype(np.int64) + 1 if ws.settings.block else 0

    def _guided(self, ws, eps_v: np.ndarray, n: int) -> np.ndarray:
        """Guided model output of n states from rows [cond n; null n] (ops.cfg_combine)."""
        if not ws.spec.guided:
            return eps_v[:n]
        return self._combine(ws, eps_v[:n], eps_v[n:2 * n])

    @staticmethod
    def _combine(ws, cond: np.ndarray, null: np.ndarray) -> np.ndarray:
        info = ws.spec.info
        return ops.cfg_combine(cond, null, ws.settings.cfg_scale, info.in_channels, info.cfg_mode)

    # -- the round's ops ----------------------------------------------------------------------------
    def join(self, ws, joins, labels, lane) -> None:
        slots, samples = joins[:, 0], joins[:, 1]
        s = ws.settings
        ws["x"][slots] = noise.normal(s.seed, samples, s.schedule.num_steps, noise.Purpose.INIT, self._shape(ws))
        ws["step"][slots] = s.schedule.num_steps - 1
        ws["has_parent"][slots] = 0
        ws["sample"][slots] = samples
        ws["label"][slots] = labels

    def plan(self, ws, lane) -> None:
        spec, s = ws.spec, ws.settings
        step, S = ws["step"].astype(np.int64), spec.slots
        active = step >= 0
        L = np.minimum(s.window_at(np.where(active, step, 0)), spec.max_window)
        w = np.where(active, np.where(ws["has_parent"] != 0, np.minimum(L, step), 0), -1)
        sizes = np.where(w >= 0, w + 1, 0)
        first = np.cumsum(sizes) - sizes
        ws["window_of"][:] = w
        ws["first_row"][:] = np.where(w >= 0, first, -1)
        R = int(sizes.sum())
        slots = np.repeat(np.arange(S), sizes)
        pos = np.arange(R) - np.repeat(first, sizes)
        ws["row_slot"][:R], ws["row_pos"][:R], ws["row_step"][:R] = slots, pos, step[slots] - pos
        rank = np.zeros(S, dtype=np.int64)
        for k in range(1, int(w.max(initial=0)) + 1):
            idx = np.flatnonzero(w >= k)
            ws["draft_src"][k - 1, :len(idx)] = first[idx] + k - 1
            ws["draft_prev"][k - 1, :len(idx)] = rank[idx] if k >= 2 else -1
            rank[idx] = np.arange(len(idx))
        ws["report"][:S, 3:] = 0
        ws["report"][S, 0] = R

    def stage(self, ws, rows, lane) -> None:
        spec, sched = ws.spec, ws.settings.schedule
        slots, pos, st = ws["row_slot"][:rows], ws["row_pos"][:rows], ws["row_step"][:rows]
        t = sched.timesteps[st].astype(np.float32)
        first = np.flatnonzero(pos == 0)
        for half, label in ((0, ws["label"][slots]), (1, spec.info.null_label))[:spec.rows_per_state]:
            ws["v_t"][half * rows:(half + 1) * rows] = t
            ws["v_y"][half * rows:(half + 1) * rows] = label
            ws["v_x"][half * rows + first] = ws["x"][slots[first]]

    def draft_inputs(self, ws, k, n, n_prev, lane) -> None:
        spec, sched = ws.spec, ws.settings.schedule
        src = ws["draft_src"][k - 1, :n]
        slots, st = ws["row_slot"][src], ws["row_step"][src]
        prev = ws["draft_prev"][k - 1, :n]
        for g, label in ((0, ws["label"][slots]), (1, spec.info.null_label))[:spec.draft_rows_per_state]:
            rows = slice(g * n, (g + 1) * n)
            ws["d_x"][rows] = ws["v_x"][src]
            ws["d_t"][rows] = sched.timesteps[st]
            ws["d_y"][rows] = label
            if "d_tfeat" in ws.buffers:
                # the features given are those of step st + 1 (the last step repeated past the end, as on device)
                ws["d_tfeat"][rows] = np.append(sched.timesteps, sched.timesteps[-1])[st + 1]
            ws["d_feat"][rows] = ws["parent_feat"][slots, g] if k == 1 else ws["d_feat_out"][g * n_prev + prev]

    def draft_step(self, ws, k, n, rows, frozen, lane) -> None:
        spec, s = ws.spec, ws.settings
        src = ws["draft_src"][k - 1, :n]
        slots, st, dst = ws["row_slot"][src], ws["row_step"][src], src + 1
        if frozen:
            eps_v = ws["parent_eps"][slots]
        elif spec.parent_guidance:  # the null row the parent's gap implies: eps_c + (s - 1) gap on guided channels
            cond = ws["d_eps"][:n]
            eps_v = self._combine(ws, cond, cond - ws["parent_gap"][slots])
        else:
            eps_v = self._guided(ws, ws["d_eps"], n)
        mp, lvp = ops.transition(s.schedule, ws["v_x"][src], eps_v, st, spec.fixed_variance)
        z = noise.normal(s.seed, ws["sample"][slots], st, noise.Purpose.DRAFT, self._shape(ws), self._stream(ws, slots))
        x = (mp + np.exp(0.5 * lvp) * z).astype(np.float32)
        ws["mean_p"][dst], ws["log_var_p"][dst] = mp.reshape(n, -1), lvp.reshape(n, -1)
        for half in range(spec.rows_per_state):
            ws["v_x"][half * rows + dst] = x

    def verify(self, ws, rows, lane) -> None:
        spec, s = ws.spec, ws.settings
        G = spec.rows_per_state
        raw = ws["v_eps"][:G * rows]
        bad = ~np.isfinite(raw.reshape(G, rows, -1)).all(axis=2).all(axis=0)
        bad_slots = ws["row_slot"][:rows][bad]
        ws["report"][bad_slots, 3] |= FLAG_NONFINITE
        np.maximum.at(ws["report"][:, 4], bad_slots, NONFINITE_BASE - ws["row_pos"][:rows][bad])
        eps_v = self._guided(ws, raw, rows)
        ws["eps_q"][:rows] = eps_v.reshape(rows, -1)
        mean, log_var = ops.transition(s.schedule, ws["v_x"][:rows], eps_v, ws["row_step"][:rows], spec.fixed_variance)
        ws["mean_q"][:rows], ws["log_var_q"][:rows] = mean.reshape(rows, -1), log_var.reshape(rows, -1)

    def decide(self, ws, rows, lane) -> None:
        s = ws.settings
        draft = np.flatnonzero(ws["row_pos"][:rows] >= 1)
        q, slots = draft - 1, ws["row_slot"][draft]
        st = ws["row_step"][q]
        x = ws["v_x"][draft].reshape(len(draft), -1)
        ws["log_r"][draft] = coupling.log_ratio(x, ws["mean_p"][draft], ws["log_var_p"][draft], ws["mean_q"][q],
                                                ws["log_var_q"][q])
        if s.block:  # block verification draws its own uniforms, per level (commit)
            return
        ws["uniform"][draft] = noise.uniform(s.seed, ws["sample"][slots], st, noise.Purpose.ACCEPT, 1)[:, 0]
        ws["gamma"][draft] = relax_gamma(s, ws["mean_p"][draft], ws["log_var_p"][draft], ws["mean_q"][q],
                                         ws["log_var_q"][q], st)

    def commit(self, ws, rows, lane) -> None:
        spec, s = ws.spec, ws.settings
        shape, G = self._shape(ws), spec.rows_per_state
        live = np.flatnonzero(ws["window_of"] >= 0)
        w, first, start = ws["window_of"][live], ws["first_row"][live], ws["step"][live].astype(np.int64)
        samples = ws["sample"][live]
        x_new = np.empty((len(live), *shape), dtype=np.float32)
        verify = self._verify_block if s.block else self._verify_steps
        accepted, proposals, caps = verify(ws, rows, live, x_new)
        bonus = np.flatnonzero(accepted == w)
        if len(bonus):  # the whole window passed: one exact step from q at x~_w
            b = first[bonus] + w[bonus]
            st = ws["row_step"][b]
            if s.ddim:
                x_new[bonus] = ops.ddim_step(s.schedule, ws["v_x"][b], ws["eps_q"][b].reshape(len(b), *spec.out_shape),
                                             st)
            else:
                z = noise.normal(s.seed, samples[bonus], st, noise.Purpose.STEP, shape)
                x_new[bonus] = ops.ddpm_step(ws["mean_q"][b].reshape(-1, *shape), ws["log_var_q"][b].reshape(-1, *shape),
                                             st, z)
        # the commit: the new state's parent is x~ at the start of the last committed transition
        parent = first + accepted
        new_step = start - accepted - 1
        ws["x"][live] = x_new
        for g in range(G):
            ws["parent_feat"][live, g] = ws["v_feat"][g * rows + parent]
        ws["parent_eps"][live] = ws["eps_q"][parent].reshape(len(live), *spec.out_shape)
        if spec.parent_guidance:
            ws["parent_gap"][live] = ws["v_eps"][parent] - ws["v_eps"][rows + parent]
        ws["step"][live], ws["has_parent"][live] = new_step, 1
        report = ws["report"]
        report[live, 0], report[live, 1], report[live, 2] = new_step, accepted, proposals
        report[live, 3] |= np.where(caps, FLAG_CAP_HIT, 0).astype(np.int32)
        done = new_step < 0
        ws["results"][samples[done]] = x_new[done]

    def _verify_steps(self, ws, rows, live, x_new):
        """Per-step verification (DESIGN §3.2): each slot's first rejected draft is replaced by a
        residual sample into ``x_new``; returns (accepted drafts, residual proposals, cap hits)."""
        s, shape = ws.settings, self._shape(ws)
        w, first, samples = ws["window_of"][live], ws["first_row"][live], ws["sample"][live]
        accepted = np.zeros(len(live), dtype=np.int64)
        if w.max(initial=0) > 0:  # accept test of every draft row (coupling.accept), then each slot's first rejection
            draft = np.flatnonzero(ws["row_pos"][:rows] >= 1)
            ok = np.zeros(rows, dtype=bool)
            ok[draft] = coupling.accept(ws["log_r"][draft], ws["uniform"][draft], ws["gamma"][draft])
            for j in range(len(live)):
                run = ok[first[j] + 1:first[j] + 1 + w[j]]
                accepted[j] = len(run) if run.all() else int(np.argmin(run))
        proposals = np.zeros(len(live), dtype=np.int64)
        caps = np.zeros(len(live), dtype=bool)
        rejected = np.flatnonzero(accepted < w)
        if len(rejected):  # the residual (q - p)^+ of the rejected transition
            d = first[rejected] + accepted[rejected] + 1
            q = d - 1
            st = ws["row_step"][q]
            mp, lvp, mq, lvq = ws["mean_p"][d], ws["log_var_p"][d], ws["mean_q"][q], ws["log_var_q"][q]
            same = coupling.equal_variance(lvp, lvq)
            if same.any():
                x_new[rejected[same]] = coupling.reflect(ws["v_x"][d[same]], mp[same].reshape(-1, *shape),
                                                         mq[same].reshape(-1, *shape), lvq[same].reshape(-1, *shape))
            other = np.flatnonzero(~same)
            if len(other):
                draw = self._residual_draw(s, samples[rejected[other]], st[other], 0, mq.shape[1:])
                out, props, cap = coupling.sample_residual(mp[other], lvp[other], mq[other], lvq[other], draw)
                x_new[rejected[other]] = out.reshape(-1, *shape)
                proposals[rejected[other]], caps[rejected[other]] = props, cap
        return accepted, proposals, caps

    def _verify_block(self, ws, rows, live, x_new):
        """Block verification (DESIGN §3.3.1, coupling.block_verify), same returns as
        ``_verify_steps``: all drafts stand with probability w_L, else levels L-1 .. 0 in turn end
        the round with a sample of the residual of w_i q - p or pass on with probability 1 - w_i."""
        s = ws.settings
        w, first, samples = ws["window_of"][live].astype(np.int64), ws["first_row"][live], ws["sample"][live]
        stream = ws["step"][live].astype(np.int64) + 1
        K = int(w.max(initial=0))
        pos = np.arange(1, K + 1)
        log_r = ws["log_r"][np.minimum(first[:, None] + pos, rows - 1)] if K else np.zeros((len(live), 0))
        u = noise.uniform(s.seed, samples, ws["row_step"][first + w], noise.Purpose.ACCEPT, 1, stream)[:, 0]

        def level(todo, i, log_w):
            d = first[todo] + i + 1
            q = d - 1
            mq = ws["mean_q"][q]
            draw = self._residual_draw(s, samples[todo], ws["row_step"][q], stream[todo], mq.shape[1:])
            return coupling.sample_residual(ws["mean_p"][d], ws["log_var_p"][d], mq, ws["log_var_q"][q], draw,
                                            log_weight=log_w)

        return coupling.block_verify(np.where(pos <= w[:, None], log_r, 0.0), w, u, level,
                                     x_new.reshape(len(live), -1))

    @staticmethod
    def _residual_draw(s, keys, key_steps, stream, shape):
        """Residual proposals' noise (z, u) of attempt ``attempts[j]`` of row ``r[j]``, keyed."""
        stream = np.broadcast_to(np.asarray(stream, dtype=np.int64), np.shape(keys))

        def draw(r, attempts):
            purpose = attempts.astype(np.int64) << ATTEMPT_SHIFT
            return (noise.normal(s.seed, keys[r], key_steps[r], noise.Purpose.RESIDUAL + purpose, shape, stream[r]),
                    noise.uniform(s.seed, keys[r], key_steps[r], noise.Purpose.RESIDUAL_ACCEPT + purpose, 1,
                                  stream[r])[:, 0])

        return draw

    def fetch_report(self, ws, lane) -> None:
        """Host memory already."""

    def report(self, ws) -> np.ndarray:
        return ws["report"].copy()

    def results(self, ws, n: int) -> np.ndarray:
        return ws["results"][:n]
