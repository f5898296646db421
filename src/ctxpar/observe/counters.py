"""Communication and compute counters, scoped to a ``with`` block.

The counters live in a ``contextvars.ContextVar``: nothing persists after the block and no
process-wide configuration is kept. :mod:`ctxpar.dist.collectives` records every message
(:func:`record_comm`) and the attention methods every kernel call (:func:`record_compute`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections import Counter
from typing import Iterator

__all__ = ["CommCounters", "comm_counters", "record_comm", "record_compute"]



@dataclasses.dataclass
class CommCounters:
    """Bytes and operation counts seen by this process inside a ``comm_counters`` block.

    ``ops`` counts calls by kind ("send", "recv", "all_to_all", "all_gather",
    "all_reduce", "reduce_scatter", "broadcast"); ``bytes_sent``/``bytes_recv`` count
    payload bytes leaving/arriving at this rank (a collective's own share excluded)."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    ops: Counter = dataclasses.field(default_factory=Counter)
    bytes_by_op: Counter = dataclasses.field(default_factory=Counter)
    compute_ops: Counter = dataclasses.field(default_factory=Counter)
    score_elements: Counter = dataclasses.field(default_factory=Counter)

    def record(self, op: str, sent: int, recv: int) -> None:
        self.ops[op] += 1
        self.bytes_sent += sent
        self.bytes_recv += recv
        self.bytes_by_op[op] += recv


_ACTIVE: contextvars.ContextVar[tuple[CommCounters, ...]] = contextvars.ContextVar(
    "ctxpar_comm_counters", default=()
)


@contextlib.contextmanager
def comm_counters() -> Iterator[CommCounters]:
    """Count the communication of every ctxpar call made inside the block.

    >>> with ctxpar.comm_counters() as c:
    ...     out = ctxpar.attention(q, k, v, causal=True)
    ...     out.sum().backward()
    >>> c.bytes_recv, c.ops["recv"]
    """
    counters = CommCounters()
    token = _ACTIVE.set(_ACTIVE.get() + (counters,))
    try:
        yield counters
    finally:
        _ACTIVE.reset(token)


def record_comm(op: str, sent: int, recv: int) -> None:
    """Count one message or collective of ``op`` (bytes leaving / arriving at this rank)."""
    for c in _ACTIVE.get():
        c.record(op, sent, recv)


def record_compute(kind: str, score_elements: int) -> None:
    """Count one local kernel call (``compute_ops[kind]``) and its query-key pairs."""
    for c in _ACTIVE.get():
        c.compute_ops[kind] += 1
        c.score_elements[kind] += score_elements
