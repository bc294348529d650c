"""Adaptive window: choose FREE's L per step from what the engine costs and how often drafts pass.

A round that starts at step s with window L commits 1 + (accepted prefix) transitions; with
per-step acceptance a(t) (probability that the draft of the transition at step t passes, given
the earlier ones did) its expectation is

    E(s, L) = 1 + sum_{k=1..L} prod_{j=1..k} a(s - j + 1)

and it costs L drafter calls plus one verification of L+1 states: T(L) = L t_draft + T_verify(L+1).
The policy picks, for every start step, the L in 0..min(L_max, s) that maximises E / T, the
expected steps per second of that round. Any L chosen from the step alone keeps FREE exact.
T_verify(n) is measured on the engine (the cost curve); a(t) comes from a pilot run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class CostCurve:
    batch: int  # samples per call
    verify_seconds: list[float]  # [n-1] -> one target call on batch * n states, n = 1..len
    draft_seconds: float  # one drafter call on batch states (0 without a drafter engine)

    def to_dict(self) -> dict:
        return {"batch": self.batch, "verify_seconds": self.verify_seconds, "draft_seconds": self.draft_seconds,
                "relative_verify_cost": [t / self.verify_seconds[0] for t in self.verify_seconds]}


def measure_cost_curve(backend, info, batch: int, max_states: int, guided: bool, repeats: int = 5,
                       seed: int = 0, draft_rows_per_state: int | None = None) -> CostCurve:
    """Median wall time of the target call for 1..max_states states per sample (and of one drafter
    call), on random inputs of the engine's shapes, after one warm-up call per shape.
    ``draft_rows_per_state``: drafter rows per state (default: as the target's; 1 for guided FREE
    drafting only the conditional row, RoundSpec.draft_rows_per_state)."""
    rng = np.random.default_rng(seed)
    rows_per_state = 2 if guided else 1

    def inputs(rows: int, engine: str) -> dict[str, np.ndarray]:
        x = {"x": rng.normal(size=(rows, info.in_channels, info.input_size, info.input_size)).astype(np.float32),
             "t": rng.integers(0, 1000, rows).astype(np.float32),
             "y": rng.integers(0, info.num_classes, rows).astype(np.int64)}
        if engine == "drafter":
            x["feat"] = rng.normal(size=(rows, info.num_tokens, info.hidden_size)).astype(np.float32)
        if "t_feat" in backend.inputs(engine):
            x["t_feat"] = np.minimum(x["t"] + 4, 999).astype(np.float32)
        return x

    def timed(engine: str, rows: int) -> float:
        feed = inputs(rows, engine)
        backend.run(engine, feed)  # warm-up: first call of a shape may compile or allocate
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            backend.run(engine, feed)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    verify = [timed("dit", batch * n * rows_per_state) for n in range(1, max_states + 1)]
    draft_rows = rows_per_state if draft_rows_per_state is None else draft_rows_per_state
    draft = timed("drafter", batch * draft_rows) if "drafter" in backend.engines() else 0.0
    return CostCurve(batch, verify, draft)


def acceptance_profile(acceptance_by_step: dict, num_steps: int, smooth: int = 5, prior: float = 0.5) -> np.ndarray:
    """Per-step acceptance a(t) for t = 0..num_steps-1 from a pilot run's ``acceptance_by_step``:
    a moving average over ``smooth`` steps; steps never decided take the nearest decided value
    (``prior`` if none was)."""
    known = {int(k): float(v) for k, v in acceptance_by_step.items() if 0 <= int(k) < num_steps}
    if not known:
        return np.full(num_steps, prior)
    steps = np.array(sorted(known))
    values = np.array([known[s] for s in steps])
    filled = values[np.abs(np.arange(num_steps)[:, None] - steps[None, :]).argmin(axis=1)]
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        padded = np.pad(filled, (smooth // 2, smooth - 1 - smooth // 2), mode="edge")
        filled = np.convolve(padded, kernel, mode="valid")
    return np.clip(filled, 0.0, 1.0)


def expected_commits(acc: np.ndarray, start: int, window: int) -> float:
    """E(s, L): one committed transition plus the expected accepted prefix."""
    total, survive = 1.0, 1.0
    for k in range(1, window + 1):
        survive *= acc[start - k + 1]
        total += survive
    return total


def choose_windows(acc: np.ndarray, cost: CostCurve, max_window: int) -> tuple[np.ndarray, np.ndarray]:
    """L per start step maximising expected steps per second, and that rate per step."""
    if max_window < 0 or max_window + 1 > len(cost.verify_seconds):
        raise ValueError(f"the cost curve covers {len(cost.verify_seconds)} states per sample; "
                         f"a window of {max_window} needs {max_window + 1}")
    n = len(acc)
    windows, rates = np.zeros(n, dtype=np.int64), np.zeros(n)
    for s in range(n):
        best, best_rate = 0, -1.0
        for L in range(0, min(max_window, s) + 1):
            rate = expected_commits(acc, s, L) / (L * cost.draft_seconds + cost.verify_seconds[L])
            if rate > best_rate + 1e-12:
                best, best_rate = L, rate
        windows[s], rates[s] = best, best_rate
    return windows, rates


def fixed_window_rate(acc: np.ndarray, cost: CostCurve, window: int) -> float:
    """Mean expected steps per second over start steps for a fixed L (capped at the step), for comparison."""
    return float(np.mean([expected_commits(acc, s, min(window, s))
                          / (min(window, s) * cost.draft_seconds + cost.verify_seconds[min(window, s)])
                          for s in range(len(acc))]))


def expected_chain_seconds(acc: np.ndarray, windows, cost: CostCurve, round_overhead: float = 0.0) -> float:
    """Expected wall time of one batch of chains through all ``len(acc)`` steps, when the round that
    starts at step s drafts ``windows[s]`` steps (capped at s) and draft acceptance at step t is
    ``acc[t]``, independently (the model ``expected_commits`` uses).

    A round costs L t_draft + T_verify(L+1) + ``round_overhead``; the first round of a chain has no
    parent and is one plain step. With E(-1) = 0 and P(k) the chance that exactly k drafts pass,
    E(s) = cost(L_s) + sum_k P(k) E(s - k - 1), solved from s = 0 upwards.
    """
    n = len(acc)
    windows = np.broadcast_to(np.asarray(windows), (n,))
    if windows.max(initial=0) + 1 > len(cost.verify_seconds):
        raise ValueError(f"the cost curve covers {len(cost.verify_seconds)} states per sample; "
                         f"a window of {int(windows.max())} needs {int(windows.max()) + 1}")
    after = np.zeros(n + 1)  # after[s + 1] = E(s): expected seconds from step s (with a parent) to the end
    for s in range(n):
        L = int(min(windows[s], s))
        expect, survive = 0.0, 1.0
        for k in range(L + 1):
            p = survive * (1.0 - acc[s - k]) if k < L else survive
            expect += p * after[s - k]  # E(s - k - 1)
            if k < L:
                survive *= acc[s - k]
        after[s + 1] = L * cost.draft_seconds + cost.verify_seconds[L] + round_overhead + expect
    return cost.verify_seconds[0] + round_overhead + (after[n - 1] if n > 1 else 0.0)


def projected_speedup(acc: np.ndarray, windows, cost: CostCurve, round_overhead: float = 0.0,
                      sequential_overhead: float = 0.0) -> float:
    """Sequential wall time (one plain step per step) over FREE's expected wall time with ``windows``."""
    sequential = len(acc) * (cost.verify_seconds[0] + sequential_overhead)
    return sequential / expected_chain_seconds(acc, windows, cost, round_overhead)
