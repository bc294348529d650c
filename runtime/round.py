"""The FREE round, written once (DESIGN §3.2, §5), over a maths interface with two implementations.

Every sampler is this round: FREE drafts with the drafter engine, the frozen baseline reuses the
parent's real output, sequential DDPM (and DDIM) is the round with an empty window. Per round and
micro-batch, on slots of a workspace allocated once:

  draft lane   plan -> stage -> for k = 1..L: [drafter inputs -> drafter engine] -> draft step
  verify lane  (waits for the draft lane) target engine -> verify -> decide -> commit -> report

The maths between model calls goes through ``RoundMaths``: ``round_numpy.NumpyRoundMaths`` (numpy
on host arrays: the CPU path and the oracle) or ``round_device.DeviceRoundMaths`` (the CUDA kernels
library on device buffers, or its host emulation). The host reads back only a report row per slot
(new step, accepted drafts, residual proposals, flags) to schedule the next round.

Exactness does not depend on anything here being clever: every committed transition is drawn by
the exact coupling (runtime/coupling.py) from the DiT's own transition, with noise keyed by
(seed, sample, step, purpose), so results never depend on batching, slots or micro-batches.
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from freedit.errors import CapacityError, ModelOutputError
from freedit.runtime.contract import RELAX_SCORES, VERIFIERS, ModelInfo  # noqa: F401  (RELAX_SCORES: part of the round API)
from freedit.runtime.schedule import Schedule

#: Residual proposals: the attempt number goes in the high bits of the noise purpose.
ATTEMPT_SHIFT = 8
#: Report row of a slot: new step, accepted drafts, residual proposals, flags, and 2^30 minus the
#: first window position whose target output was not finite (0: none).
REPORT_COLUMNS = 5
FLAG_CAP_HIT, FLAG_NONFINITE = 1, 2
NONFINITE_BASE = 1 << 30
DRAFTERS = ("free", "frozen", None)


@dataclass(frozen=True)
class RoundSpec:
    """What a workspace is shaped by: the model, the slots, the longest window, the drafter."""

    info: ModelInfo
    slots: int
    max_window: int
    guided: bool
    drafter: str | None  # "free" (the drafter engine), "frozen", or None (window 0: sequential, DDIM)
    t_feat: bool = False  # the drafter engine takes t_feat (the timestep of the features it is given)
    # guided drafts take the last verified state's guidance gap; the drafter drafts the conditional row only
    parent_guidance: bool = False
    fixed_variance: str = "small"  # for models without learned sigma

    @property
    def rows_per_state(self) -> int:
        return 2 if self.guided else 1

    @property
    def draft_rows_per_state(self) -> int:
        return 1 if self.parent_guidance else self.rows_per_state

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (self.info.in_channels, self.info.input_size, self.info.input_size)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return (self.info.out_channels, self.info.input_size, self.info.input_size)

    @property
    def feat_shape(self) -> tuple[int, int]:
        return (self.info.num_tokens, self.info.hidden_size)

    @property
    def max_rows(self) -> int:
        """Verify states per round at most: L + 1 per slot."""
        return self.slots * (self.max_window + 1)

    @property
    def variance(self) -> str:
        return "learned" if self.info.learn_sigma else self.fixed_variance

    def engine_rows(self) -> dict[str, int]:
        """Rows each engine is called with at most (CFG doubles the states)."""
        rows = {"dit": self.rows_per_state * self.max_rows}
        if self.drafter == "free" and self.max_window > 0:
            rows["drafter"] = self.draft_rows_per_state * self.slots
        return rows


def layout(spec: RoundSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every buffer of a workspace: name -> (shape, dtype). One table for both maths."""
    S, L, R, G = spec.slots, spec.max_window, spec.max_rows, spec.rows_per_state
    C, H, W = spec.state_shape
    O, E = spec.info.out_channels, C * H * W
    T, D = spec.feat_shape
    buffers = {
        # slot state
        "x": ((S, C, H, W), "float32"), "step": ((S,), "int32"), "has_parent": ((S,), "int32"),
        "sample": ((S,), "uint32"), "label": ((S,), "int64"),
        "parent_feat": ((S, G, T, D), "float32"), "parent_eps": ((S, O, H, W), "float32"),
        # the plan
        "window_of": ((S,), "int32"), "first_row": ((S,), "int32"), "row_slot": ((R,), "int32"),
        "row_pos": ((R,), "int32"), "row_step": ((R,), "int32"),
        # the target's I/O (engine `dit`)
        "v_x": ((G * R, C, H, W), "float32"), "v_t": ((G * R,), "float32"), "v_y": ((G * R,), "int64"),
        "v_eps": ((G * R, O, H, W), "float32"), "v_feat": ((G * R, T, D), "float32"),
        # the target's transitions
        "mean_q": ((R, E), "float32"), "log_var_q": ((R, E), "float32"), "eps_q": ((R, O * H * W), "float32"),
        "report": ((S + 1, REPORT_COLUMNS), "int32"), "joins": ((S, 2), "int32"), "join_labels": ((S,), "int64"),
    }
    if L > 0:
        buffers.update({
            "draft_src": ((L, S), "int32"), "draft_prev": ((L, S), "int32"), "slot_rank": ((S,), "int32"),
            "mean_p": ((R, E), "float32"), "log_var_p": ((R, E), "float32"),
            "log_r": ((R,), "float64"), "uniform": ((R,), "float64"), "gamma": ((R,), "float64"),
        })
        if spec.drafter == "free":  # the drafter's I/O (engine `drafter`)
            buffers.update({
                "d_feat": ((G * S, T, D), "float32"), "d_x": ((G * S, C, H, W), "float32"),
                "d_t": ((G * S,), "float32"), "d_y": ((G * S,), "int64"),
                "d_feat_out": ((G * S, T, D), "float32"), "d_eps": ((G * S, O, H, W), "float32"),
            })
            if spec.t_feat:
                buffers["d_tfeat"] = ((G * S,), "float32")
    if spec.parent_guidance:  # cond - null output of each slot's parent: every commit writes it (L may be 0)
        buffers["parent_gap"] = ((S, O, H, W), "float32")
    return buffers


#: Engine tensor name -> workspace buffer (the contracts of runtime/contract.py).
ENGINE_IO = {
    "dit": ({"x": "v_x", "t": "v_t", "y": "v_y"}, {"eps_v": "v_eps", "feat": "v_feat"}),
    "drafter": ({"feat": "d_feat", "x": "d_x", "t": "d_t", "y": "d_y", "t_feat": "d_tfeat"},
                {"draft_feat": "d_feat_out", "eps_v": "d_eps"}),
}


@dataclass(frozen=True)
class RoundSettings:
    """What one generate call samples with."""

    schedule: Schedule
    seed: int
    cfg_scale: float
    window: int = 0
    window_schedule: np.ndarray | None = None  # L per respaced step (adaptive), instead of `window`
    relax: float = 0.0
    ddim: bool = False
    relax_score: str = "gap"  # one of RELAX_SCORES: what relax's u measures (DESIGN §3.4)
    verifier: str = "step"  # one of VERIFIERS (DESIGN §3.3, §3.3.1)

    @property
    def block(self) -> bool:
        return self.verifier == "block"

    def window_at(self, steps: np.ndarray) -> np.ndarray:
        return self.window_schedule[steps] if self.window_schedule is not None else np.full_like(steps, self.window)


class Workspace:
    """The buffers of one micro-batch (device buffers or numpy arrays, by name) and its engines."""

    def __init__(self, spec: RoundSpec, buffers: dict):
        self.spec, self.buffers = spec, buffers
        self.engines: dict = {}  # engine name -> bound engine (backends' bind)
        self.graphs: dict = {}  # (phase, shape key) -> captured graph, or None where capture failed
        self.seen: dict = {}  # (phase, shape key) -> plain runs so far (warm-up before capture)

    def __getitem__(self, name: str):
        return self.buffers[name]


class RoundMaths(ABC):
    """The maths of a round between model calls. Implementations: numpy (host) and device (kernels).

    Every method works on a workspace's buffers by the layout above; ``lane`` is where it runs.
    The semantics of each op are the kernels' (runtime/csrc/freedit_kernels.h, freedit_round).
    """

    kind: str

    @abstractmethod
    def workspace(self, spec: RoundSpec) -> Workspace: ...

    @abstractmethod
    def configure(self, ws: Workspace, settings: RoundSettings) -> None:
        """Schedule tables and the call's scalars (seed, CFG scale, window, relax)."""

    @abstractmethod
    def lanes(self, overlap: bool, timing: bool) -> tuple:
        """(draft lane, verify lane)."""

    @abstractmethod
    def join(self, ws, joins: np.ndarray, labels: np.ndarray, lane) -> None:
        """New samples into free slots: joins [n, 2] (slot, sample index), labels [n]."""

    @abstractmethod
    def plan(self, ws, lane) -> None: ...

    @abstractmethod
    def stage(self, ws, rows: int, lane) -> None: ...

    @abstractmethod
    def draft_inputs(self, ws, k: int, n: int, n_prev: int, lane) -> None: ...

    @abstractmethod
    def draft_step(self, ws, k: int, n: int, rows: int, frozen: bool, lane) -> None: ...

    @abstractmethod
    def verify(self, ws, rows: int, lane) -> None: ...

    @abstractmethod
    def decide(self, ws, rows: int, lane) -> None: ...

    @abstractmethod
    def commit(self, ws, rows: int, lane) -> None: ...

    @abstractmethod
    def fetch_report(self, ws, lane) -> None:
        """Start bringing the report to the host (pinned memory on a device)."""

    @abstractmethod
    def report(self, ws) -> np.ndarray:
        """The report [S + 1, 4] int32 on the host; valid once the verify lane's mark is passed."""

    @abstractmethod
    def results(self, ws, n: int) -> np.ndarray:
        """The finished samples [n, C, H, W] (row = sample index)."""

    def reserve_results(self, ws, n: int) -> None:
        """Room for n finished samples (grown, never shrunk)."""

    def capture(self, ws, lane, key, phase: Callable[[], None]) -> bool:
        """Run ``phase`` on ``lane`` from a captured graph where the implementation can; False when
        it ran plainly instead. The numpy maths has no graphs."""
        return False

    def close(self) -> None:
        pass


@dataclass
class _Log:
    """What the host keeps per round for the statistics (built once at the end)."""

    samples: list = field(default_factory=list)
    starts: list = field(default_factory=list)
    windows: list = field(default_factory=list)
    accepted: list = field(default_factory=list)
    proposals: list = field(default_factory=list)
    caps: list = field(default_factory=list)


class MicroBatch:
    """One workspace's slots, host mirror of their steps, queue and log."""

    def __init__(self, index: int, ws: Workspace, queue: list[tuple[int, int]]):
        self.index, self.ws = index, ws
        S = ws.spec.slots
        self.queue = deque(queue)  # (sample index, label) waiting for a slot
        self.step = np.full(S, -1, dtype=np.int64)  # host mirror: -1 = free slot
        self.has_parent = np.zeros(S, dtype=bool)
        self.sample = np.full(S, -1, dtype=np.int64)
        self.started = np.zeros(S)
        self.log = _Log()
        self.finished: dict[int, float] = {}  # sample -> seconds
        self.pending = None  # (round marks, windows) of the round in flight

    @property
    def active(self) -> bool:
        return bool(self.queue) or bool((self.step >= 0).any())


class RoundRunner:
    """Runs every sample through rounds on ``maths`` with the bound engines of each workspace."""

    def __init__(self, maths: RoundMaths, workspaces: list[Workspace], settings: RoundSettings,
                 lanes: tuple, capture: bool = False, on_progress: Callable[[int], None] | None = None,
                 timeline=None):
        self.maths, self.workspaces, self.settings = maths, workspaces, settings
        self.draft_lane, self.verify_lane = lanes
        self.capture, self.on_progress, self.timeline = capture, on_progress, timeline
        spec = workspaces[0].spec
        self.spec, self.G, self.G_draft = spec, spec.rows_per_state, spec.draft_rows_per_state
        self.frozen = spec.drafter == "frozen"
        n = settings.schedule.num_steps
        if spec.drafter is None and (settings.window or settings.window_schedule is not None):
            raise ValueError("a sampler without a drafter has an empty window")
        if settings.verifier not in VERIFIERS:
            raise ValueError(f"unknown verifier {settings.verifier!r}; choose one of {', '.join(VERIFIERS)}")
        if settings.block and settings.relax > 0:
            raise ValueError("block verification is exact-only: it does not combine with relax (lambda > 0)")
        longest = settings.window if settings.window_schedule is None else int(np.max(settings.window_schedule))
        if longest > spec.max_window:
            raise CapacityError(f"window {longest} exceeds the workspace's {spec.max_window}")
        self.num_steps = n

    # -- host-side plan: the same rule as the plan kernel ------------------------------------------------
    def windows(self, mb: MicroBatch) -> np.ndarray:
        step = mb.step
        active = step >= 0
        L = self.settings.window_at(np.where(active, step, 0))
        w = np.where(mb.has_parent, np.minimum(L, step), 0)
        return np.where(active, w, -1)

    def run(self, labels: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        """Sample ``labels`` (sample i has label labels[i]); returns (samples [N, C, H, W], stats)."""
        mbs = self.begin(labels)
        in_flight: deque[MicroBatch] = deque()
        for mb in mbs:  # every micro-batch in flight: while one is verified, the next is drafted
            if mb.active:
                self.fill(mb)
                self.enqueue(mb)
                in_flight.append(mb)
        while in_flight:
            mb = in_flight.popleft()
            self.complete(mb)
            if mb.active:
                self.fill(mb)
                self.enqueue(mb)
                in_flight.append(mb)
        return self.finish(mbs, labels)

    def begin(self, labels: np.ndarray) -> list[MicroBatch]:
        """Deal the samples into the micro-batches (sample i into micro-batch i mod M)."""
        n_total, M = len(labels), len(self.workspaces)
        for ws in self.workspaces:
            self.maths.reserve_results(ws, n_total)
        return [MicroBatch(g, ws, [(i, int(labels[i])) for i in range(g, n_total, M)])
                for g, ws in enumerate(self.workspaces)]

    def finish(self, mbs: list[MicroBatch], labels: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        n_total, M = len(labels), len(mbs)
        samples = np.empty((n_total, *self.spec.state_shape), dtype=np.float32)
        for g, mb in enumerate(mbs):
            samples[g::M] = self.maths.results(mb.ws, n_total)[g::M]
        return samples, self._stats(mbs, labels)

    # -- one round ---------------------------------------------------------------------------------
    def fill(self, mb: MicroBatch) -> None:
        """Queued samples into the free slots (the starting noise is drawn where the maths runs)."""
        free = np.flatnonzero(mb.step < 0)
        n = min(len(free), len(mb.queue))
        if n == 0:
            return
        joins = np.empty((n, 2), dtype=np.int32)
        labels = np.empty(n, dtype=np.int64)
        now = time.perf_counter()
        for j in range(n):
            sample, label = mb.queue.popleft()
            slot = free[j]
            joins[j] = slot, sample
            labels[j] = label
            mb.step[slot], mb.has_parent[slot], mb.sample[slot], mb.started[slot] = self.num_steps - 1, False, sample, now
        self.maths.join(mb.ws, joins, labels, self.draft_lane)

    def enqueue(self, mb: MicroBatch) -> None:
        """Enqueue one round of ``mb``: its draft phase, then (after it) its verify phase."""
        windows = self.windows(mb)
        live = windows[windows >= 0]
        rows = int(live.sum() + len(live))
        longest = int(live.max(initial=0))
        counts = tuple(int((live >= k).sum()) for k in range(1, longest + 1))
        key = (rows, counts)
        ws, maths, G = mb.ws, self.maths, self.G

        def draft_phase():
            maths.plan(ws, self.draft_lane)
            maths.stage(ws, rows, self.draft_lane)
            n_prev = 0
            for k, n in enumerate(counts, start=1):
                if not self.frozen:
                    maths.draft_inputs(ws, k, n, n_prev, self.draft_lane)
                    ws.engines["drafter"].run(self.G_draft * n)
                maths.draft_step(ws, k, n, rows, self.frozen, self.draft_lane)
                n_prev = n

        def verify_phase():
            ws.engines["dit"].run(G * rows)
            maths.verify(ws, rows, self.verify_lane)
            if counts:
                maths.decide(ws, rows, self.verify_lane)
            maths.commit(ws, rows, self.verify_lane)
            maths.fetch_report(ws, self.verify_lane)

        timed = self.timeline is not None
        d0 = self.draft_lane.mark() if timed else None
        self._run_phase(ws, self.draft_lane, ("draft", key), draft_phase)
        drafted = self.draft_lane.mark()
        self.verify_lane.wait(drafted)
        v0 = self.verify_lane.mark() if timed else None
        self._run_phase(ws, self.verify_lane, ("verify", key), verify_phase)
        done = self.verify_lane.mark()
        mb.pending = ((d0, drafted, v0, done), windows, rows)

    def _run_phase(self, ws: Workspace, lane, key, phase: Callable[[], None]) -> None:
        if self.capture and self.maths.capture(ws, lane, key, phase):
            return
        lane.submit(phase)

    def complete(self, mb: MicroBatch) -> None:
        """Wait for ``mb``'s round, read its report and update the host's schedule and log."""
        marks, windows, rows = mb.pending
        marks[-1].wait()
        report = self.maths.report(mb.ws)
        if self.timeline is not None:
            self.timeline.add(mb.index, *marks, rows=int((windows >= 0).sum()))
        for m in marks:
            if m is not None and hasattr(m, "release"):
                m.release()
        live = np.flatnonzero(windows >= 0)
        if int(report[-1, 0]) != rows:
            raise RuntimeError(f"the round's plan has {int(report[-1, 0])} rows, the host planned {rows}: "
                               "host and device schedules disagree (a bug)")
        rep = report[live]
        start = mb.step[live]
        flags = rep[:, 3]
        if (flags & FLAG_NONFINITE).any():
            j = int(np.flatnonzero(flags & FLAG_NONFINITE)[0])
            step = int(start[j]) - (NONFINITE_BASE - int(rep[j, 4]))
            raise ModelOutputError(f"the DiT returned non-finite values (NaN or infinity) at respaced step {step} "
                                   f"(timestep {int(self.settings.schedule.timesteps[step])}) for sample "
                                   f"{int(mb.sample[live[j]])}; generation stopped (check the model file and its "
                                   f"precision)")
        accepted = rep[:, 1].astype(np.int64)
        new_step = rep[:, 0].astype(np.int64)
        if not np.array_equal(new_step, start - accepted - 1):
            raise RuntimeError("a round committed a step count the host did not plan (a bug)")
        log = mb.log
        log.samples.append(mb.sample[live].copy())
        log.starts.append(start)
        log.windows.append(windows[live])
        log.accepted.append(accepted)
        log.proposals.append(rep[:, 2].astype(np.int64))
        log.caps.append((flags & FLAG_CAP_HIT) != 0)
        mb.step[live] = new_step
        mb.has_parent[live] = True
        finished = live[new_step < 0]
        now = time.perf_counter()
        for slot in finished:
            mb.finished[int(mb.sample[slot])] = now - mb.started[slot]
            mb.sample[slot] = -1
        if self.on_progress:
            self.on_progress(int((accepted + 1).sum()))

    # -- statistics --------------------------------------------------------------------------------
    def _stats(self, mbs: list[MicroBatch], labels: np.ndarray) -> list[dict]:
        n_total = len(labels)
        stats = [{"sample": i, "label": int(labels[i]), "target_calls": 0, "drafted": [], "accepted": [],
                  "decisions": [], "residual_proposals": 0, "residual_cap_hits": 0} for i in range(n_total)]
        speculative = self.spec.drafter is not None
        for mb in mbs:
            log = mb.log
            for samples, starts, windows, accepted, proposals, caps in zip(
                    log.samples, log.starts, log.windows, log.accepted, log.proposals, log.caps):
                for i, start, w, a, p, c in zip(samples.tolist(), starts.tolist(), windows.tolist(), accepted.tolist(),
                                                proposals.tolist(), caps.tolist()):
                    st = stats[i]
                    st["target_calls"] += 1
                    if speculative:
                        st["drafted"].append(w)
                        st["accepted"].append(a)
                        # positions 1..min(a + 1, w) were decided: the first a accepted
                        st["decisions"].extend((start - k + 1, k <= a) for k in range(1, min(a + 1, w) + 1))
                        st["residual_proposals"] += p
                        st["residual_cap_hits"] += int(c)
            for i, seconds in mb.finished.items():
                stats[i]["seconds"] = seconds
        if not speculative:
            for st in stats:
                for key in ("drafted", "accepted", "decisions", "residual_proposals", "residual_cap_hits"):
                    st.pop(key)
        return stats


def check_capacity(backend_rows: dict[str, int | None], spec: RoundSpec, source: str) -> None:
    """Refuse, before sampling, a request whose rows an engine cannot hold (e.g. a plan's profile)."""
    for engine, need in spec.engine_rows().items():
        have = backend_rows.get(engine)
        if have is not None and need > have:
            per_state = "x2 for CFG " if spec.guided else ""
            raise CapacityError(
                f"{source}: engine '{engine}' holds at most {have} rows, but batch {spec.slots} with window "
                f"{spec.max_window} needs {need} ({'(L + 1) states per sample ' if engine == 'dit' else ''}"
                f"{per_state}); lower --batch-size or --window, or rebuild the plans with larger "
                f"--batch-sizes/--window")


def workspace_bytes(spec: RoundSpec) -> int:
    """Bytes a workspace allocates (for memory estimates before sampling)."""
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in layout(spec).values())

