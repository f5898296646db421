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

On a hierarchical CP mesh ``("ring", "ulysses")`` of shape ``(p2p, a2a)`` (see
``ctxpar.cp_mesh``) the token order is: **the layout's chunking over the ring axis, then a
contiguous split within the Ulysses group.** Ring rank r's share is the 1-D layout's
shard of rank r on a group of p2p ranks, in its local order; Ulysses rank u of that ring
group holds the u-th of a2a equal contiguous pieces of it. So rank (r, u) holds

    local_positions(layout, r, p2p, S)[u * S/(p2p*a2a) : (u+1) * S/(p2p*a2a)]

and after the Ulysses all-to-all (which concatenates the pieces in Ulysses-rank order)
every member of the group holds ring rank r's full share in the ring layout's local order,
which is what the ring over the ring axis expects. A ``[1, N]`` mesh gives the 1-D
layout on N ranks; an ``[N, 1]`` mesh gives contiguous pieces whatever the layout (the
Ulysses group sees the whole sequence, so the layout cannot unbalance it). The global
length must be a multiple of the layout's granularity on p2p ranks, and ``S / p2p`` of
a2a.
"""
from __future__ import annotations

import dataclasses

import torch

from .comms import CPGroup, all_gather
from .mesh import CPTopology, resolve_topology

__all__ = ["LAYOUTS", "Segment", "shard", "unshard", "position_ids", "local_segments",
           "cp_segments", "check_cp_divisible"]

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
    return segment_positions(local_segments(layout, rank, world, seq_len), device)


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


def check_cp_divisible(seq_len: int, layout: str, topo: CPTopology, *,
                       what: str = "sequence length") -> None:
    """``check_divisible`` for a CP topology: the layout's granularity on the ring axis,
    then an even split of each ring share over the Ulysses group."""
    check_divisible(seq_len, layout, topo.ring.size, what=what)
    share, a2a = seq_len // topo.ring.size, topo.ulysses.size
    if share % a2a:
        raise ValueError(
            f"{what} {seq_len} gives ring shares of {share} tokens ({topo.ring.size} ring "
            f"ranks), which do not split evenly over the Ulysses degree {a2a}; choose a "
            f"length that is a multiple of {granularity(layout, topo.ring.size) * a2a}")


def cp_segments(layout: str, topo: CPTopology, seq_len: int, rank: tuple[int, int] | None = None
                ) -> list[Segment]:
    """Segments of CP rank ``rank = (ring_rank, ulysses_rank)`` (default: this process)
    in local order: the ring rank's layout segments, cut to the Ulysses rank's piece."""
    check_cp_divisible(seq_len, layout, topo)
    r, u = (topo.ring.rank, topo.ulysses.rank) if rank is None else rank
    segs = local_segments(layout, r, topo.ring.size, seq_len)
    if topo.ulysses.size == 1:
        return segs
    n = seq_len // topo.size
    lo, hi = u * n, (u + 1) * n
    out, off = [], 0
    for s in segs:
        a, b = max(lo, off), min(hi, off + s.length)
        if a < b:
            out.append(Segment(s.start + (a - off) * s.stride, b - a, s.stride))
        off += s.length
    return out


def segment_positions(segments, device=None) -> torch.Tensor:
    """The global positions that ``segments`` cover, in order, int64."""
    parts = [torch.arange(s.start, s.start + s.length * s.stride, s.stride, device=device)
             for s in segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def shard(x: torch.Tensor, *, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Take this rank's shard of a full tensor that is identical on every rank.

    ``x``: ``[..., S, ...]`` with the sequence at ``dim``; returns ``[..., S/N, ...]`` in the
    layout's local order. ``group`` may also be a hierarchical CP mesh (see the module
    docstring for its token order). Differentiable (the backward scatters into zeros)."""
    topo = resolve_topology(group)
    check_layout(layout)
    dim = dim % x.dim()
    return _take(x, cp_segments(layout, topo, x.shape[dim]), dim)


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
    gradient (not a sum over ranks).

    On a hierarchical CP mesh the pieces are first gathered within the Ulysses group
    (giving the ring rank's share in local order), then over the ring axis."""
    topo = resolve_topology(group)
    check_layout(layout)
    dim = dim % x_local.dim()
    if topo.ulysses.size > 1:
        # The Ulysses pieces are contiguous cuts of the ring share: a "contiguous" gather.
        x_local = _Unshard.apply(x_local, topo.ulysses, "contiguous", dim)
    if topo.ring.size == 1:
        return x_local
    return _Unshard.apply(x_local, topo.ring, layout, dim)


def position_ids(seq_len: int, *, group=None, layout: str = "zigzag", device=None) -> torch.Tensor:
    """Global positions (int64 ``[seq_len // N]``) of this rank's tokens, e.g. for RoPE.
    ``group`` may be a hierarchical CP mesh."""
    topo = resolve_topology(group)
    check_layout(layout)
    return segment_positions(cp_segments(layout, topo, seq_len), device)
