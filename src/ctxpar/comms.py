"""Process groups, point-to-point and collective communication, and byte counters.

Every function here takes the CP group explicitly. ``group=None`` means the default
(WORLD) group when torch.distributed is initialised, and a world of one otherwise, so
the same user code runs on a single device.

All traffic goes through the wrappers below so that :func:`comm_counters` can count it.
The counters are scoped to a ``with`` block through a ``contextvars.ContextVar``: nothing
persists after the block, and no process-wide configuration is kept.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections import Counter
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = ["CPGroup", "resolve_group", "CommCounters", "comm_counters"]


@dataclasses.dataclass(frozen=True)
class CPGroup:
    """A resolved 1-D communication group: the torch ProcessGroup (None for a world of
    one without torch.distributed), this process's rank in it and the group size."""

    pg: object | None
    rank: int
    size: int

    def global_rank(self, group_rank: int) -> int:
        """Global rank of ``group_rank`` (taken modulo the group size)."""
        group_rank %= self.size
        if self.pg is None:
            return group_rank
        return dist.get_global_rank(self.pg, group_rank)


def resolve_group(group=None) -> CPGroup:
    """Turn ``None``, a ``ProcessGroup``, a 1-D ``DeviceMesh`` or a :class:`CPGroup`
    into a :class:`CPGroup`."""
    if isinstance(group, CPGroup):
        return group
    if group is not None and hasattr(group, "get_group") and hasattr(group, "ndim"):
        if group.ndim != 1:
            raise ValueError(
                f"group= takes a 1-D DeviceMesh; got a {group.ndim}-D mesh with axes "
                f"{getattr(group, 'mesh_dim_names', None)}. Slice one axis, e.g. mesh['ring']."
            )
        group = group.get_group()
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return CPGroup(None, 0, 1)
        group = dist.group.WORLD
    return CPGroup(group, dist.get_rank(group), dist.get_world_size(group))


# ----------------------------------------------------------------------------- counters


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


def _record(op: str, sent: int, recv: int) -> None:
    for c in _ACTIVE.get():
        c.record(op, sent, recv)


def _record_compute(kind: str, score_elements: int) -> None:
    """Count one local kernel call (``compute_ops[kind]``) and its query-key pairs."""
    for c in _ACTIVE.get():
        c.compute_ops[kind] += 1
        c.score_elements[kind] += score_elements


# torch 2.13 renamed the tensor collectives (*_single); older releases have only the old names.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------ point to point


class PendingExchange:
    """Handles of posted isend/irecv operations; ``wait()`` blocks until all are done."""

    def __init__(self, works: list) -> None:
        self._works = works

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []


def exchange(
    grp: CPGroup,
    sends: Sequence[tuple[torch.Tensor, int]],
    recvs: Sequence[tuple[torch.Tensor, int]],
    tag: int = 0,
) -> PendingExchange:
    """Post non-blocking sends ``(tensor, dst_group_rank)`` and receives
    ``(buffer, src_group_rank)`` in one batch and return at once. Streams that may be in
    flight between the same pair of ranks at once use distinct ``tag``s.

    Posting the next transfer before the current compute is what makes the ring overlap
    communication with computation; ``wait()`` is called only when the data is needed."""
    ops = []
    for t, dst in sends:
        ops.append(dist.P2POp(dist.isend, t, grp.global_rank(dst), group=grp.pg, tag=tag))
        _record("send", _nbytes(t), 0)
    for t, src in recvs:
        ops.append(dist.P2POp(dist.irecv, t, grp.global_rank(src), group=grp.pg, tag=tag))
        _record("recv", 0, _nbytes(t))
    if not ops:
        return PendingExchange([])
    return PendingExchange(dist.batch_isend_irecv(ops))


# ---------------------------------------------------------------------------- collectives


def all_to_all(grp: CPGroup, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Send ``chunks[j]`` to rank j and return the list received, ``out[j]`` from rank j.
    All chunks must have one shape and dtype on every rank."""
    if grp.size == 1:
        return [chunks[0]]
    inp = torch.stack([c.contiguous() for c in chunks])
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp, group=grp.pg)
    per = _nbytes(chunks[0])
    _record("all_to_all", per * (grp.size - 1), per * (grp.size - 1))
    return list(out.unbind(0))


def all_gather(grp: CPGroup, t: torch.Tensor, async_op: bool = False):
    """Stack ``t`` from every rank along a new leading dim: ``[size, *t.shape]``.
    With ``async_op=True`` returns ``(out, work)``; ``out`` is valid after ``work.wait()``."""
    flat = torch.empty(grp.size * t.numel(), dtype=t.dtype, device=t.device)
    out = flat.view(grp.size, *t.shape)
    if grp.size == 1:
        out[0].copy_(t)
        return (out, PendingExchange([])) if async_op else out
    # Gathered flat (gloo wants the output as a concatenation along dim 0).
    work = _ALL_GATHER(flat, t.reshape(-1), group=grp.pg, async_op=async_op)
    _record("all_gather", _nbytes(t) * (grp.size - 1), _nbytes(t) * (grp.size - 1))
    if async_op:
        return out, PendingExchange([work])
    return out


def reduce_scatter(grp: CPGroup, t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` (leading dim = group size) over ranks and return this rank's slice."""
    if grp.size == 1:
        return t[0].clone()
    out = torch.empty(t.shape[1:], dtype=t.dtype, device=t.device)
    if t.device.type == "cpu":
        # gloo has no reduce_scatter_tensor: an all-reduce then a slice moves more bytes
        # than needed on CPU, but the counters record the logical volume.
        full = t.contiguous().clone()
        dist.all_reduce(full, group=grp.pg)
        out.copy_(full[grp.rank])
    else:
        _REDUCE_SCATTER(out, t.contiguous(), group=grp.pg)
    per = _nbytes(out)
    _record("reduce_scatter", per * (grp.size - 1), per * (grp.size - 1))
    return out


def all_reduce(grp: CPGroup, t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); returns ``t``."""
    if grp.size == 1:
        return t
    dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM, group=grp.pg)
    # A ring all-reduce moves 2(N-1)/N of the tensor each way.
    vol = 2 * _nbytes(t) * (grp.size - 1) // grp.size
    _record("all_reduce", vol, vol)
    return t


def all_to_all_single(grp: CPGroup, t: torch.Tensor) -> torch.Tensor:
    """All-to-all on one buffer whose leading dim is the group size: ``t[j]`` goes to rank
    j and ``out[j]`` comes from rank j (``out`` has ``t``'s shape). Unlike
    :func:`all_to_all` the caller lays the send buffer out itself, so the one copy that
    builds it can also do any transposition it needs (no extra stack copy)."""
    if t.shape[0] != grp.size:
        raise ValueError(f"all_to_all_single needs a leading dim of {grp.size}; got {tuple(t.shape)}")
    if grp.size == 1:
        return t
    t = t.contiguous()
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t, group=grp.pg)
    per = _nbytes(t[0])
    _record("all_to_all", per * (grp.size - 1), per * (grp.size - 1))
    return out
