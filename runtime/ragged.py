"""Ragged batching: samples occupy slots, each at its own step; finished ones leave, queued ones join.

A sampler supplies ``advance(states)``, which moves every active state forward by one round
(one step for the sequential sampler, up to L+1 for FREE) with one batched target call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np


@dataclass
class SampleState:
    index: int  # the sample's number in the request: keys its noise, so batches never change results
    label: int
    x: np.ndarray  # the committed state, input of the transition at respaced step `step`
    step: int  # next respaced step to apply (N-1 .. 0); done when < 0
    stats: dict = field(default_factory=dict)
    started: float = 0.0

    @property
    def done(self) -> bool:
        return self.step < 0


def run_ragged(states: Iterable[SampleState], batch_size: int, advance: Callable[[list[SampleState]], None],
               on_progress: Callable[[int], None] | None = None) -> list[SampleState]:
    """Advance all states to completion in slots of ``batch_size``; returns them in input order."""
    queue = list(states)
    queue.reverse()
    active: list[SampleState] = []
    finished: list[SampleState] = []
    while queue or active:
        while queue and len(active) < batch_size:
            state = queue.pop()
            state.started = time.perf_counter()
            active.append(state)
        before = sum(s.step for s in active)
        advance(active)
        if on_progress:
            on_progress(before - sum(max(s.step, -1) for s in active))
        now = time.perf_counter()
        for state in [s for s in active if s.done]:
            state.stats["seconds"] = now - state.started
            finished.append(state)
        active = [s for s in active if not s.done]
    return sorted(finished, key=lambda s: s.index)
