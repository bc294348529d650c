"""Lanes: where a round's phases run, in order, and how one lane waits for another (DESIGN §5).

A round has two phases, drafting and verification (+ decision). Each runs on its lane; a lane
runs what it is given in order, and ``wait(mark)`` orders it after a point recorded on another
lane. No locks: ordering is by marks alone, as CUDA streams are ordered by events.

* ``DeviceLane``: a CUDA stream. A phase is called at once on the host thread and only enqueues
  kernels, engine calls and copies; marks are CUDA events.
* ``HostLane``: a host thread running a FIFO of phases (the numpy path with micro-batches, where
  engine calls release the GIL so two lanes overlap on a CPU); marks are threading events.
* ``InlineLane``: runs each phase at once (the numpy path with one micro-batch).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from freedit.runtime.device import Device, Stream


class Mark:
    """A point in a lane's order; ``wait()`` blocks the host until the lane has passed it."""

    def __init__(self, event=None):
        self._event = event
        self.time = None  # host perf_counter when reached (host lanes), for timelines

    def wait(self) -> None:
        if self._event is not None:
            self._event.wait() if isinstance(self._event, threading.Event) else self._event.synchronize()


class InlineLane:
    name = "inline"
    stream = None

    def submit(self, phase: Callable[[], None]) -> None:
        phase()

    def mark(self) -> Mark:
        m = Mark()
        m.time = time.perf_counter()
        return m

    def wait(self, mark: Mark) -> None:
        """Phases already ran in order on the caller's thread: nothing to wait for."""

    def close(self) -> None:
        pass


class HostLane:
    """One worker thread; a phase that raises poisons the lane and the error reaches the host at
    the next ``Mark.wait()`` on it."""

    def __init__(self, name: str):
        self.name = name
        self.stream = None
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=f"freedit-lane-{name}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            if self.error is None or isinstance(task, _Signal):
                try:
                    task()
                except BaseException as exc:  # re-raised on the host by Mark.wait
                    self.error = exc

    def submit(self, phase: Callable[[], None]) -> None:
        self._tasks.put(phase)

    def mark(self) -> Mark:
        event = threading.Event()
        m = _HostMark(event, self)
        self._tasks.put(_Signal(event, m))
        return m

    def wait(self, mark: Mark) -> None:
        self._tasks.put(mark.wait)

    def close(self) -> None:
        self._tasks.put(None)
        self._thread.join()


class _Signal:
    def __init__(self, event: threading.Event, mark: Mark):
        self.event, self.mark_ = event, mark

    def __call__(self) -> None:
        self.mark_.time = time.perf_counter()
        self.event.set()


class _HostMark(Mark):
    def __init__(self, event: threading.Event, lane: HostLane):
        super().__init__(event)
        self.lane = lane

    def wait(self) -> None:
        self._event.wait()
        if self.lane.error is not None:
            raise self.lane.error


class DeviceLane:
    """A CUDA stream of ``device``; marks are events (timing ones when ``timing``)."""

    def __init__(self, device: Device, name: str, timing: bool = False):
        self.device, self.name, self.timing = device, name, timing
        self.stream: Stream = device.stream()
        self._free: list = []  # events whose marks the host has passed, reused

    def submit(self, phase: Callable[[], None]) -> None:
        phase()

    def mark(self) -> Mark:
        event = self._free.pop() if self._free else self.device.event(timing=self.timing)
        self.stream.record(event)
        return _DeviceMark(event, self)

    def wait(self, mark: Mark) -> None:
        self.stream.wait(mark._event)

    def close(self) -> None:
        self.stream.synchronize()


class _DeviceMark(Mark):
    def __init__(self, event, lane: DeviceLane):
        super().__init__(event)
        self.lane = lane

    def wait(self) -> None:
        self._event.synchronize()
        self.lane.device.raise_host_errors()
        self.time = time.perf_counter()

    def release(self) -> None:
        """The event may be recorded again (after the host has waited on it)."""
        self.lane._free.append(self._event)
