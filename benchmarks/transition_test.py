"""The transition test: FREE's invariant checked on every committed transition of real chains.

DESIGN §3.2's lossless guarantee is a statement about single transitions: whatever the drafter,
each committed state x' is distributed as the DiT's own transition q(. | x) = N(mu_q, sigma_q^2)
from the committed parent x. So z = (x' - mu_q(x)) / sigma_q(x) is N(0, I) given everything before
it, and the projections z . e of the transitions of a chain are independent N(0, 1) for any unit
vector e fixed by the past. That makes an exact test with no reference sample and no permutations:
the mean of n projections is N(0, 1 / n) under the null.

The direction is where a biased sampler errs: towards the draft. For every transition the test
recomputes, with its own ONNX Runtime sessions, the DiT at the parent (mu_q, sigma_q) and at the
grandparent (the features the drafter starts from, and with draft guidance "parent" the cond -
null gap the guided draft holds; one DiT call per chain state serves both), runs one drafter (the
run's, the same for every group) once (position 1 of a window) and takes
e = (mu_p - mu_q) / |mu_p - mu_q| in sigma_q units. The direction is the same function of the past for every sampler under test, whatever
drafter or rule that sampler used; the drafts of later window positions differ, but any past-
measurable e keeps the null exact. A second statistic, sum |z|^2 ~ chi^2 with n E degrees of
freedom, covers biases across e (e.g. a wrong variance).

``recording`` captures the committed chain of every sample from the numpy round maths
(NumpyRoundMaths.commit: the round's start state, each accepted draft state, the committed one);
nothing in the runtime changes. The final step (the DiT's mean, no noise) and the first (no parent
to draft from) are left out.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scipy import stats

from freedit.runtime import ops
from freedit.runtime.round_numpy import NumpyRoundMaths
from freedit.runtime.schedule import Schedule


class Chains:
    """Every committed state of every sample: ``states[sample][step]`` is the state before transition
    ``step`` (T - 1 is the starting noise), ``final[sample]`` the sample after transition 0."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self.states: dict[int, dict[int, np.ndarray]] = {}
        self.final: dict[int, np.ndarray] = {}

    def add(self, sample: int, start: int, chain: list[np.ndarray]) -> None:
        """``chain[m]`` is the state before transition ``start - m``; the last one is after the round."""
        own = self.states.setdefault(sample, {})
        for m, x in enumerate(chain):
            step = start - m
            if step >= 0:
                own[step] = x
            else:
                self.final[sample] = x

    def complete(self) -> list[int]:
        """Samples whose whole chain was seen (every step and the final sample)."""
        return sorted(s for s, own in self.states.items() if len(own) == self.num_steps and s in self.final)

    def array(self, samples: list[int]) -> np.ndarray:
        """[len(samples), T + 1, *state]: ``a[:, i]`` is the state before transition i (i < T), ``a[:, T]``
        the final sample; transition i >= 1 takes ``a[:, i]`` to ``a[:, i - 1]``."""
        rows = [np.stack([self.states[s][i] for i in range(self.num_steps)] + [self.final[s]]) for s in samples]
        return np.stack(rows).astype(np.float32)


@contextmanager
def recording(chains: Chains):
    """Record the committed chain of every numpy round run inside the block."""
    original = NumpyRoundMaths.commit

    def commit(self, ws, rows, lane):
        live = np.flatnonzero(ws["window_of"] >= 0)
        start = ws["step"][live].astype(np.int64).copy()
        first, w = ws["first_row"][live].copy(), ws["window_of"][live]
        before = ws["x"][live].copy()
        samples = ws["sample"][live].copy()
        original(self, ws, rows, lane)
        accepted = ws["report"][live, 1]
        for j in range(len(live)):
            a = int(accepted[j])
            drafts = [ws["v_x"][first[j] + m].copy() for m in range(1, min(a, int(w[j])) + 1)]
            chains.add(int(samples[j]), int(start[j]), [before[j], *drafts, ws["x"][live[j]].copy()])

    NumpyRoundMaths.commit = commit
    try:
        yield chains
    finally:
        NumpyRoundMaths.commit = original


class Reference:
    """The DiT's transitions and a drafter's position-1 proposal, computed afresh with
    ONNX Runtime (no round code): what the test holds every committed transition against."""

    def __init__(self, model_dir: Path, drafter: Path, info, cfg_scale: float, threads: int | None = None,
                 chunk: int = 256, parent_guidance: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.dit = ort.InferenceSession(str(model_dir / "dit.onnx"), options, providers=["CPUExecutionProvider"])
        self.drafter = ort.InferenceSession(str(drafter), options, providers=["CPUExecutionProvider"])
        self.drafter_inputs = {i.name for i in self.drafter.get_inputs()}
        self.info, self.cfg_scale, self.chunk = info, float(cfg_scale), chunk
        # draft_guidance "parent" (guided only): the conditional row drafted, the parent's cond - null gap
        self.parent_guidance = bool(parent_guidance) and self.cfg_scale != 1.0

    def _rows(self, labels: np.ndarray) -> np.ndarray:
        guided = self.cfg_scale != 1.0
        return np.concatenate([labels, np.full(len(labels), self.info.null_label)]) if guided else labels

    def _guided(self, eps_v: np.ndarray, n: int) -> np.ndarray:
        if self.cfg_scale == 1.0:
            return eps_v
        return ops.cfg_combine(eps_v[:n], eps_v[n:], self.cfg_scale, self.info.in_channels, self.info.cfg_mode)

    def _dit(self, x, t, labels):
        """(guided eps_v [n, ...], features [rows per state, n, tokens, hidden], raw eps_v [rows per state, n, ...])
        of states x."""
        y, n = self._rows(labels).astype(np.int64), len(x)
        reps = len(y) // n
        eps_v, feat = self.dit.run(["eps_v", "feat"], {"x": np.tile(x, (reps, 1, 1, 1)), "t": np.tile(t, reps), "y": y})
        return self._guided(eps_v, n), feat.reshape(reps, n, *feat.shape[1:]), eps_v.reshape(reps, n, *eps_v.shape[1:])

    def directions(self, schedule: Schedule, chains: np.ndarray, labels: np.ndarray):
        """(mu_q, log var_q, e) of transitions 1 .. T - 2 of ``chains`` [S, T + 1, ...] (``chains[:, i]``
        the state before transition i), rows chain by chain and step by step; e is the unit direction
        towards the drafter's proposal, in sigma_q units. The DiT runs once per state: a state's
        features are its child transition's drafter input."""
        fv, T = self.info.fixed_variance, schedule.num_steps
        per_chain = max(1, self.chunk // (T - 1))
        inner = np.arange(T - 2)  # index of transition i = 1 .. T - 2 among the states 1 .. T - 1
        out = []
        for lo in range(0, len(chains), per_chain):
            block = chains[lo:lo + per_chain, 1:T]  # the states before transitions 1 .. T - 1
            b = len(block)
            steps_all = np.tile(np.arange(1, T), b)
            t_all = schedule.timesteps[steps_all].astype(np.float32)
            y_all = np.repeat(labels[lo:lo + per_chain], T - 1)
            eps_all, feat_all, raw_all = self._dit(block.reshape(b * (T - 1), *block.shape[2:]), t_all, y_all)
            sel = (np.arange(b)[:, None] * (T - 1) + inner).ravel()
            x, st, y = block.reshape(b * (T - 1), *block.shape[2:])[sel], steps_all[sel], y_all[sel]
            reps = 1 if self.parent_guidance else len(self._rows(y)) // len(x)
            rows = self._rows(y).astype(np.int64)[:reps * len(x)]
            feeds = {"feat": feat_all[:reps, sel + 1].reshape(reps * len(x), *feat_all.shape[2:]),
                     "x": np.tile(x, (reps, 1, 1, 1)), "t": np.tile(t_all[sel], reps), "y": rows}
            if "t_feat" in self.drafter_inputs:
                feeds["t_feat"] = np.tile(t_all[sel + 1], reps)
            (eps_p,) = self.drafter.run(["eps_v"], feeds)
            if self.parent_guidance:  # the null row the parent's gap implies, as the round drafts it
                gap = raw_all[0, sel + 1] - raw_all[1, sel + 1]
                eps_p = np.concatenate([eps_p, eps_p - gap])
            mq, lvq = ops.transition(schedule, x, eps_all[sel], st, fv)
            mp, _ = ops.transition(schedule, x, self._guided(eps_p, len(x)), st, fv)
            d = ((mp - mq) * np.exp(-0.5 * lvq)).reshape(len(x), -1)
            e = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-30)
            out.append((mq.reshape(len(x), -1), lvq.reshape(len(x), -1), e))
        return tuple(np.concatenate(parts) for parts in zip(*out))


def standardized(reference: Reference, schedule: Schedule, chains: Chains, labels: np.ndarray) -> dict:
    """z and e of every testable transition (1 <= step <= T - 2) of the complete chains, row by row
    with its sample and step."""
    samples = chains.complete()
    if not samples:
        raise ValueError("no complete chain was recorded (was the numpy round maths used?)")
    a = chains.array(samples)
    steps = np.arange(1, chains.num_steps - 1)
    S, K = len(samples), len(steps)
    nxt = a[:, steps - 1].reshape(S * K, -1)
    mq, lvq, e = reference.directions(schedule, a, labels[samples])
    z = (nxt.astype(np.float64) - mq) * np.exp(-0.5 * lvq.astype(np.float64))
    return {"sample": np.repeat(samples, K), "step": np.tile(steps, S), "z": z, "e": e}


def test_chains(reference: Reference, schedule: Schedule, chains: Chains, labels: np.ndarray) -> dict:
    """The two statistics over every testable transition of the complete chains."""
    got = standardized(reference, schedule, chains, labels)
    z, st = got["z"], got["step"]
    proj = (z * got["e"]).sum(axis=1)
    sq = (z * z).sum(axis=1)
    n, E = len(proj), z.shape[1]
    mean = float(proj.mean())
    z_score = mean * np.sqrt(n)
    chi_p = float(min(1.0, 2 * min(stats.chi2.cdf(sq.sum(), n * E), stats.chi2.sf(sq.sum(), n * E))))
    by_step = {int(s): round(float(proj[st == s].mean()), 4) for s in np.unique(st)}
    return {"transitions": n, "samples": len(np.unique(got["sample"])), "elements": E,
            "direction": {"mean": mean, "z": float(z_score), "p_value": float(2 * stats.norm.sf(abs(z_score)))},
            "norm": {"mean_excess": float(sq.mean() - E), "p_value": chi_p},
            "mean_projection_by_step": by_step}
