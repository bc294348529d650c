"""Micro-batches in flight: the timeline of their phases (DESIGN §5, streams).

The round (runtime/round.py) keeps ``micro_batches`` workspaces in flight: while one is verified
on the verify lane, the next is drafted on the draft lane (CUDA streams on a GPU, host threads on
the numpy path), ordered by marks, never by locks. Results are identical to one batch, since
noise is keyed by (seed, sample, step, purpose). This module records when each phase ran.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Event:
    lane: str  # "draft" or "verify" (verification and the decision)
    micro_batch: int
    start: float  # seconds since the run started
    end: float
    rows: int  # samples in the micro-batch this round


class Timeline:
    """Phase spans from lane marks: host clocks (host lanes) or CUDA event times (device lanes)."""

    def __init__(self, reference=None):
        self.events: list[Event] = []
        self._reference = reference  # a device mark every device time is measured from
        self._t0 = None

    def _seconds(self, mark) -> float:
        if mark.time is not None and self._reference is None:
            if self._t0 is None:
                self._t0 = mark.time
            return mark.time - self._t0
        return mark._event.elapsed_ms(self._reference._event) / 1e3

    def add(self, micro_batch: int, d0, drafted, v0, done, rows: int) -> None:
        for lane, a, b in (("draft", d0, drafted), ("verify", v0, done)):
            self.events.append(Event(lane, micro_batch, self._seconds(a), self._seconds(b), rows))

    def busy(self, lane: str) -> float:
        return sum(e.end - e.start for e in self.events if e.lane == lane)

    def overlap(self, a: str = "draft", b: str = "verify") -> float:
        """Seconds during which lanes ``a`` and ``b`` both ran (for different micro-batches)."""
        spans = [(e.start, e.end) for e in self.events if e.lane == a]
        other = [(e.start, e.end) for e in self.events if e.lane == b]
        return sum(max(0.0, min(e1, f1) - max(s1, f0)) for s1, e1 in spans for f0, f1 in other)

    def to_dict(self) -> list[dict]:
        return [asdict(e) for e in sorted(self.events, key=lambda e: e.start)]
