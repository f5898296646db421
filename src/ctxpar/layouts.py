"""Sequence layouts: which global tokens each rank of a CP group holds, and in what order.

Tensor layout convention for the whole library (documented once, here):
``[batch, seq, heads, head_dim]`` for q/k/v/out, ``[batch, heads, seq]`` for the LSE.

For a 1-D CP group of N ranks and a global length S:

- ``"contiguous"``: rank r holds tokens ``[r*S/N, (r+1)*S/N)``. Simple, but under causal
  masking rank N-1 does N times the attention work of rank 0.
- ``"zigzag"`` (head-tail): the sequence is cut into 2N equal chunks of c = S/(2N) tokens
  and rank r holds chunk r followed by chunk 2N-1-r. Every rank then does the same causal
  work (each pairs an early chunk with a late one).
- ``"striped"``: rank r holds tokens r, r+N, r+2N, ... Balanced at token granularity.

A rank's tokens are described by *segments* ``(start, length, stride)`` of global positions,
in local order: contiguous is one segment of stride 1, zigzag two, striped one of stride N.
Attention masks between two segments of equal stride depend only on ``i - j`` (see
``ctxpar.masks``), which is what lets one ring loop serve every layout.
"""
from __future__ import annotations

import dataclasses

import torch

from .comms import CPGroup, all_gather, resolve_group

__all__ = ["LAYOUTS", "Segment", "shard", "unshard", "position_ids", "local_segments"]

LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclasses.dataclass(frozen=True)
class Segment:
    """Global positions ``start + i*stride`` for ``i in range(length)``."""

    start: int
    length: int
    stride: int = 1

    @property
    def last(self) -> int:
        return self.start + (self.length - 1) * self.stride


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def granularity(layout: str, world: int) -> int:
    """The global length must be a multiple of this (2N for zigzag, N otherwise)."""
    check_layout(layout)
    return 2 * world if layout == "zigzag" else world


def check_divisible(seq_len: int, layout: str, world: int, *, what: str = "sequence length") -> None:
    mult = granularity(layout, world)
    if seq_len % mult:
        raise ValueError(
            f"{what} {seq_len} is not divisible by {mult}, which layout={layout!r} needs on a "
            f"CP group of {world} ranks; pad it first with ctxpar.pad_for_cp(...) or choose a "
            f"length that is a multiple of {mult}"
        )


def local_segments(layout: str, rank: int, world: int, seq_len: int) -> list[Segment]:
    """The global positions of rank ``rank``'s tokens, as segments in local order."""
    check_divisible(seq_len, layout, world)
    if layout == "contiguous":
        n = seq_len // world
        return [Segment(rank * n, n)]
    if layout == "zigzag":
        c = seq_len // (2 * world)
        return [Segment(rank * c, c), Segment((2 * world - 1 - rank) * c, c)]
    return [Segment(rank, seq_len // world, world)]


def local_positions(layout: str, rank: int, world: int, seq_len: int, device=None) -> torch.Tensor:
    """Global positions of the local tokens, int64 ``[seq_len // world]``."""
    parts = [
        torch.arange(s.start, s.start + s.length * s.stride, s.stride, device=device)
        for s in local_segments(layout, rank, world, seq_len)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _take(x: torch.Tensor, segments: list[Segment], dim: int) -> torch.Tensor:
    parts = []
    for s in segments:
        if s.stride == 1:
            parts.append(x.narrow(dim, s.start, s.length))
        else:
            idx = [slice(None)] * x.dim()
            idx[dim] = slice(s.start, s.start + s.length * s.stride, s.stride)
            parts.append(x[tuple(idx)])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def shard(x: torch.Tensor, *, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Take this rank's shard of a full tensor that is identical on every rank.

    ``x``: ``[..., S, ...]`` with the sequence at ``dim``; returns ``[..., S/N, ...]`` in the
    layout's local order. Differentiable (the backward scatters into zeros)."""
    grp = resolve_group(group)
    dim = dim % x.dim()
    check_divisible(x.shape[dim], layout, grp.size)
    return _take(x, local_segments(layout, grp.rank, grp.size, x.shape[dim]), dim)


def global_order(layout: str, world: int, seq_len: int, device=None) -> torch.Tensor:
    """Index ``g`` such that ``gathered[g]`` is in global order, where ``gathered`` is the
    concatenation of every rank's local tokens, rank 0 first."""
    local = torch.cat([local_positions(layout, r, world, seq_len, device) for r in range(world)])
    return torch.argsort(local)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, grp: CPGroup, layout: str, dim: int):
        ctx.grp, ctx.layout, ctx.dim = grp, layout, dim
        n_local = x_local.shape[dim]
        seq_len = n_local * grp.size
        ctx.seq_len = seq_len
        gathered = all_gather(grp, x_local.movedim(dim, 0))  # [N, S/N, ...]
        gathered = gathered.flatten(0, 1)
        order = global_order(layout, grp.size, seq_len, device=x_local.device)
        return gathered.index_select(0, order).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        # Downstream of an unshard the computation is replicated on every rank (e.g. a
        # loss on the gathered output), so this rank's gradient is simply its own slice.
        segs = local_segments(ctx.layout, ctx.grp.rank, ctx.grp.size, ctx.seq_len)
        return _take(grad, segs, ctx.dim), None, None, None


def unshard(x_local: torch.Tensor, *, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """All-gather local shards back into the global order: ``[..., S/N, ...]`` ->
    ``[..., S, ...]`` on every rank. Differentiable: the computation downstream is taken
    to be replicated on every rank, so the backward returns this rank's slice of the
    gradient (not a sum over ranks)."""
    grp = resolve_group(group)
    check_layout(layout)
    dim = dim % x_local.dim()
    if grp.size == 1:
        return x_local
    return _Unshard.apply(x_local, grp, layout, dim)


def position_ids(seq_len: int, *, group=None, layout: str = "zigzag", device=None) -> torch.Tensor:
    """Global positions (int64 ``[seq_len // N]``) of this rank's tokens, e.g. for RoPE."""
    grp = resolve_group(group)
    return local_positions(layout, grp.rank, grp.size, seq_len, device)
