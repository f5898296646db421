"""Per-step timing of the ring loop, for timelines and compute-vs-wait accounting.

``with ctxpar.observe.trace.ring_trace() as events:`` records, for every ring step of every call in
the block, how long the rank spent computing its tiles and how long it then waited for the
next K/V (or dK/dV) transfer. Recording is off (one context-variable read per step) unless
a trace is active; on CUDA it synchronises the device around each interval so the times
are real, which perturbs overlap: use it to look, not to benchmark.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import time
from typing import Iterator

import torch

__all__ = ["StepEvent", "ring_trace"]


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """One interval of one ring step: ``kind`` is "compute" or "wait", ``phase`` "fwd" or
    "bwd"; ``t0``/``t1`` are ``time.perf_counter()`` seconds."""

    phase: str
    step: int
    kind: str
    t0: float
    t1: float


_EVENTS: contextvars.ContextVar[list | None] = contextvars.ContextVar("ctxpar_ring_trace", default=None)


@contextlib.contextmanager
def ring_trace() -> Iterator[list[StepEvent]]:
    """Collect :class:`StepEvent`s of every ring call made inside the block."""
    events: list[StepEvent] = []
    token = _EVENTS.set(events)
    try:
        yield events
    finally:
        _EVENTS.reset(token)


class StepTimer:
    """Used by the ring loop: ``mark(kind)`` closes the interval that started at the
    previous mark. A no-op when no trace is active."""

    def __init__(self, phase: str, device: torch.device) -> None:
        self.events = _EVENTS.get()
        self.phase = phase
        self.cuda = device.type == "cuda"
        self.t = self._now() if self.events is not None else 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self, step: int, kind: str) -> None:
        if self.events is None:
            return
        now = self._now()
        self.events.append(StepEvent(self.phase, step, kind, self.t, now))
        self.t = now
