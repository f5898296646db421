"""Point-to-point and collective communication over a resolved 1-D group, counted.

Every function here takes a :class:`~ctxpar.dist.topology.CPGroup` (resolve ``group=``
with :func:`ctxpar.dist.topology.resolve` first). All traffic goes through these wrappers,
so that :func:`ctxpar.comm_counters` (:mod:`ctxpar.observe.counters`) can count it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ctxpar.dist.topology import CPGroup
from ctxpar.observe.counters import record_comm

__all__ = ["PendingExchange", "exchange", "all_to_all", "all_gather", "reduce_scatter",
           "all_reduce", "all_to_all_single", "broadcast"]


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
        record_comm("send", _nbytes(t), 0)
    for t, src in recvs:
        ops.append(dist.P2POp(dist.irecv, t, grp.global_rank(src), group=grp.pg, tag=tag))
        record_comm("recv", 0, _nbytes(t))
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
    record_comm("all_to_all", per * (grp.size - 1), per * (grp.size - 1))
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
    record_comm("all_gather", _nbytes(t) * (grp.size - 1), _nbytes(t) * (grp.size - 1))
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
    record_comm("reduce_scatter", per * (grp.size - 1), per * (grp.size - 1))
    return out


def all_reduce(grp: CPGroup, t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); returns ``t``."""
    if grp.size == 1:
        return t
    dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM, group=grp.pg)
    # A ring all-reduce moves 2(N-1)/N of the tensor each way.
    vol = 2 * _nbytes(t) * (grp.size - 1) // grp.size
    record_comm("all_reduce", vol, vol)
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
    record_comm("all_to_all", per * (grp.size - 1), per * (grp.size - 1))
    return out


def broadcast(grp: CPGroup, t: torch.Tensor, src: int) -> torch.Tensor:
    """In-place broadcast of ``t`` from group rank ``src`` to every rank; returns ``t``."""
    if grp.size == 1:
        return t
    dist.broadcast(t, grp.global_rank(src), group=grp.pg)
    n = _nbytes(t)
    record_comm("broadcast", n * (grp.size - 1) if grp.rank == src else 0,
                0 if grp.rank == src else n)
    return t
