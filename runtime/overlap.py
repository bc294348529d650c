"""Micro-batches in flight: one is drafted while another is verified (DESIGN §5, streams).

The samples are dealt into ``micro_batches`` independent ragged batches, each run by its own
host thread through the sampler's three phases (draft -> verify -> decide). Two locks stand for
the two streams: at most one micro-batch drafts and one verifies at any time, and the two can
overlap. Engine calls release the GIL (ONNX Runtime, torch, cuda-python stream syncs), so on a
GPU the TensorRT backend's per-engine streams run the drafter and the verifier concurrently.
Results are identical to a single batch, since noise is keyed by (seed, sample, step, purpose).
Every phase is recorded (lane, micro-batch, start, end) for the timeline plot.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

from freedit.runtime.ragged import SampleState, run_ragged


@dataclass
class Event:
    lane: str  # "draft", "verify" or "decide"
    micro_batch: int
    start: float  # seconds since the run started
    end: float
    rows: int  # samples in the micro-batch this round


class Timeline:
    def __init__(self):
        self.events: list[Event] = []
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()

    @contextmanager
    def record(self, lane: str, micro_batch: int, rows: int):
        start = time.perf_counter() - self._t0
        yield
        event = Event(lane, micro_batch, start, time.perf_counter() - self._t0, rows)
        with self._lock:
            self.events.append(event)

    def busy(self, lane: str) -> float:
        return sum(e.end - e.start for e in self.events if e.lane == lane)

    def overlap(self, a: str = "draft", b: str = "verify") -> float:
        """Seconds during which lanes ``a`` and ``b`` both ran (for different micro-batches)."""
        spans = [(e.start, e.end) for e in self.events if e.lane == a]
        other = [(e.start, e.end) for e in self.events if e.lane == b]
        return sum(max(0.0, min(e1, f1) - max(s1, f0)) for s1, e1 in spans for f0, f1 in other)

    def to_dict(self) -> list[dict]:
        return [asdict(e) for e in sorted(self.events, key=lambda e: e.start)]


def run_overlapped(states: list[SampleState], batch_size: int, sampler, micro_batches: int,
                   on_progress: Callable[[int], None] | None = None) -> tuple[list[SampleState], Timeline]:
    """Run ``sampler`` (draft/verify/decide phases) over ``micro_batches`` batches of ``batch_size`` slots."""
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro batches must be an integer >= 1, got {micro_batches!r}")
    timeline = Timeline()
    draft_stream, verify_stream = threading.Lock(), threading.Lock()
    groups = [states[g::micro_batches] for g in range(micro_batches)]
    results: list[list[SampleState]] = [[] for _ in groups]
    errors: list[BaseException] = []

    def advance(group: int, active: list[SampleState]) -> None:
        with draft_stream, timeline.record("draft", group, len(active)):
            r = sampler.draft(active)
        with verify_stream, timeline.record("verify", group, len(active)):
            r = sampler.verify(r)
        with timeline.record("decide", group, len(active)):
            sampler.decide(active, r)

    def work(group: int) -> None:
        try:
            results[group] = run_ragged(groups[group], batch_size, lambda active: advance(group, active), on_progress)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(g,), name=f"freedit-microbatch-{g}") for g in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sorted((s for group in results for s in group), key=lambda s: s.index), timeline
