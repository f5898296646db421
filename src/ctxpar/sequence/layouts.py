"""Sequence layouts: which global tokens each rank of a 1-D CP group holds, in what order.

Tensor layout convention for the whole library (documented once, here):
``[batch, seq, heads, head_dim]`` for q/k/v/out, ``[batch, heads, seq]`` for the LSE.

For a CP group of N ranks and a global length S:

- ``"contiguous"``: rank r holds tokens ``[r*S/N, (r+1)*S/N)``. Simple, but under causal
  masking rank N-1 does N times the attention work of rank 0.
- ``"zigzag"`` (head-tail): the sequence is cut into 2N equal chunks of c = S/(2N) tokens
  and rank r holds chunk r followed by chunk 2N-1-r. Every rank then does the same causal
  work (each pairs an early chunk with a late one).
- ``"striped"``: rank r holds tokens r, r+N, r+2N, ... Balanced at token granularity.

A rank's tokens are :class:`Segment` runs ``(start, length, stride)`` of global positions,
in local order: contiguous is one segment of stride 1, zigzag two, striped one of stride N.
Attention masks between two segments of equal stride depend only on ``i - j`` (see
:mod:`ctxpar.attn.tiles`), which is what lets one ring loop serve every layout.

Each layout is one class; everything else (hierarchical meshes, packed documents, padding:
:mod:`ctxpar.sequence.spec`) is built on :meth:`Layout.segments`,
:meth:`Layout.granularity` and :attr:`Layout.balances_documents`. Nothing outside this
module branches on a layout's name: a new layout is one new class here.
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["Segment", "Layout", "Contiguous", "Zigzag", "Striped", "LAYOUTS", "get_layout",
           "segment_positions"]


@dataclasses.dataclass(frozen=True)
class Segment:
    """Global positions ``start + i*stride`` for ``i in range(length)``, all in document
    ``doc``: 0 for a plain (unpacked) sequence, 1, 2, ... for packed documents, -1 for
    padding."""

    start: int
    length: int
    stride: int = 1
    doc: int = 0

    @property
    def last(self) -> int:
        return self.start + (self.length - 1) * self.stride


class Layout:
    """How a sequence of ``seq_len`` tokens is split over ``world`` ranks."""

    name: str = ""
    #: With packed documents, split *each document* this way (per-document balance,
    #: TransformerEngine's THD scheme), rather than the packed sequence as a whole.
    balances_documents: bool = False
    #: Every segment has stride 1: a rank holds runs of consecutive tokens (whole chunks
    #: of In-Place TTT, elements of :mod:`ctxpar.scan`).
    consecutive_runs: bool = True
    #: Segments a rank holds on a 1-D group (the scan's elements per rank).
    segments_per_rank: int = 1

    def granularity(self, world: int) -> int:
        """The global length must be a multiple of this."""
        return world

    def segments(self, rank: int, world: int, seq_len: int) -> list[Segment]:
        """The global positions of rank ``rank``'s tokens, as segments in local order."""
        raise NotImplementedError

    def check_divisible(self, seq_len: int, world: int, *, what: str = "sequence length") -> None:
        mult = self.granularity(world)
        if seq_len % mult:
            raise ValueError(
                f"{what} {seq_len} is not divisible by {mult}, which layout={self.name!r} needs "
                f"on a CP group of {world} ranks; pad it first with ctxpar.pad_for_cp(...) or "
                f"choose a length that is a multiple of {mult}")

    def positions(self, rank: int, world: int, seq_len: int, device=None) -> torch.Tensor:
        """Global positions of rank ``rank``'s tokens, int64 ``[seq_len // world]``."""
        self.check_divisible(seq_len, world)
        return segment_positions(self.segments(rank, world, seq_len), device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Contiguous(Layout):
    name = "contiguous"

    def segments(self, rank, world, seq_len):
        n = seq_len // world
        return [Segment(rank * n, n)]


class Zigzag(Layout):
    name = "zigzag"
    balances_documents = True
    segments_per_rank = 2

    def granularity(self, world):
        return 2 * world

    def segments(self, rank, world, seq_len):
        c = seq_len // (2 * world)
        return [Segment(rank * c, c), Segment((2 * world - 1 - rank) * c, c)]


class Striped(Layout):
    name = "striped"
    consecutive_runs = False

    def segments(self, rank, world, seq_len):
        return [Segment(rank, seq_len // world, world)]


LAYOUTS = ("contiguous", "zigzag", "striped")
_BY_NAME = {cls.name: cls() for cls in (Contiguous, Zigzag, Striped)}


def get_layout(layout: str | Layout) -> Layout:
    """The :class:`Layout` named ``layout`` (a Layout passes through)."""
    if isinstance(layout, Layout):
        return layout
    try:
        return _BY_NAME[layout]
    except (KeyError, TypeError):
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}") from None


def segment_positions(segments, device=None) -> torch.Tensor:
    """The global positions that ``segments`` cover, in order, int64."""
    parts = [torch.arange(s.start, s.start + s.length * s.stride, s.stride, device=device)
             for s in segments]
    if not parts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
