"""The one answer to "which global tokens does CP rank q hold, and in which order".

A :class:`ShardSpec` is the token order of one CP group: a :class:`~ctxpar.sequence.layouts.Layout`,
the topology's shape ``(p2p, a2a)`` (a 1-D group of N ranks is ``(N, 1)``), the padded global
length, and optionally packed documents. Every consumer asks it: shard/unshard and
position ids, packing, the attention methods' tiles, the scan's element map and the TTT
plan.

**Hierarchical meshes.** On a ``("ring", "ulysses")`` mesh of shape ``(p2p, a2a)``
(:func:`ctxpar.cp_mesh`), the token order is the layout's split over the *ring* axis, then a
contiguous split within the Ulysses group: ring rank r's *share* (:meth:`ShardSpec.share`)
is the 1-D layout's shard of rank r on p2p ranks, in its local order, and Ulysses rank u
holds the u-th of a2a equal contiguous pieces of it (:meth:`ShardSpec.segments` of CP rank
``r * a2a + u``). After the Ulysses all-to-all (which concatenates the pieces in Ulysses-rank
order) every member of the group holds ring rank r's share, which is what the ring over
the ring axis expects. ``[1, N]`` is the 1-D layout on N ranks; ``[N, 1]`` gives contiguous
pieces whatever the layout.

**Packed documents** (``docs`` = the original boundaries ``[0, e1, ..., S]``, as
flash-attn's ``cu_seqlens``): a layout that :attr:`~Layout.balances_documents` (zigzag) pads
each document at its end to a multiple of its granularity times a2a and splits *each
document* over the ring ranks (TransformerEngine's THD scheme); the others keep documents
in place and pad the packed sequence at its end. Segments carry their document (numbered
from 1; padding is -1).

**Boundaries on the host.** Planning needs the document boundaries as Python ints. A
``cu_seqlens`` given as a list/tuple or a CPU tensor is read without touching a device;
a device tensor must be copied to the host once (a synchronisation on CUDA), so
:func:`parse_cu_seqlens` remembers the parse of the last few tensors (by identity and
version counter: an in-place edit is parsed again) and every layer of a model that
passes the same batch's tensor pays that copy once per batch, not once per layer. Passing
host boundaries (e.g. the ``cu_seqlens`` list ``ctxpar.shard_packed`` was given) avoids it.
Specs are interned (:meth:`ShardSpec.make` returns the same object for the same
arguments), so the plans keyed on them are found again without rebuilding anything.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import weakref

import torch

from ctxpar.sequence.layouts import Layout, Segment, get_layout, segment_positions

__all__ = ["ShardSpec", "cp_multiple", "parse_cu_seqlens", "padded_length"]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def cp_multiple(layout: str | Layout, p2p: int, a2a: int = 1) -> int:
    """A plain sequence's length must be a multiple of this on a ``(p2p, a2a)`` topology:
    the layout's granularity on the ring axis times the Ulysses degree."""
    return get_layout(layout).granularity(p2p) * a2a


# id(tensor) -> (weakref to it, its version counter, parsed boundaries); bounded LRU.
_PARSED: collections.OrderedDict = collections.OrderedDict()
_PARSED_MAX = 64


def parse_cu_seqlens(cu_seqlens) -> tuple[int, ...]:
    """Document boundaries as a tuple of ints, checked: integers, starting at 0, strictly
    increasing (no empty documents). A tensor's parse is remembered (see the module
    docstring): the device-to-host copy happens once per tensor, not once per call."""
    if not torch.is_tensor(cu_seqlens):
        return _parse(list(cu_seqlens))
    hit = _PARSED.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        _PARSED.move_to_end(id(cu_seqlens))
        return hit[2]
    cu = _parse(cu_seqlens.tolist())
    _PARSED[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, cu)
    while len(_PARSED) > _PARSED_MAX:
        _PARSED.popitem(last=False)
    return cu


def _parse(values: list) -> tuple[int, ...]:
    if any(isinstance(x, bool) or int(x) != x for x in values):
        raise ValueError(f"cu_seqlens must hold integer token boundaries; got {values[:16]}")
    cu = tuple(int(x) for x in values)
    if len(cu) < 2 or cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError(
            f"cu_seqlens must start at 0 and strictly increase (no empty documents); got {list(cu)[:16]}")
    return cu


def padded_length(docs: tuple[int, ...], layout: str | Layout, p2p: int, a2a: int = 1) -> int:
    """The global length of packed documents ``docs`` once padded for ``layout``."""
    layout = get_layout(layout)
    mult = cp_multiple(layout, p2p, a2a)
    if layout.balances_documents:
        return sum(_round_up(b - a, mult) for a, b in zip(docs, docs[1:]))
    return _round_up(docs[-1], mult)


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """The token order of one CP group (see the module docstring); validated on creation.

    ``seq_len`` is the padded global length; ``docs`` the original ``cu_seqlens`` as a tuple
    (None: one plain sequence). CP rank ``q = ring_rank * a2a + ulysses_rank``."""

    layout: Layout
    p2p: int
    a2a: int
    seq_len: int
    docs: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", get_layout(self.layout))
        if self.docs is None:
            mult = cp_multiple(self.layout, self.p2p, self.a2a)
            if self.seq_len % mult:
                self.layout.check_divisible(self.seq_len, self.p2p)  # names the 1-D multiple
                raise ValueError(
                    f"global sequence length {self.seq_len} gives ring shares of "
                    f"{self.seq_len // self.p2p} tokens ({self.p2p} ring ranks), which do not "
                    f"split evenly over the Ulysses degree {self.a2a}; choose a length that "
                    f"is a multiple of {mult}")
        elif self.seq_len != padded_length(self.docs, self.layout, self.p2p, self.a2a):
            raise ValueError(
                f"cu_seqlens ending at {self.docs[-1]} pads to "
                f"{padded_length(self.docs, self.layout, self.p2p, self.a2a)} tokens under "
                f"layout={self.layout.name!r} on {self.size} rank(s), but the shards hold "
                f"{self.seq_len} tokens in all; shard packed batches with ctxpar.shard_packed(...)")

    @classmethod
    def make(cls, layout, topo, local_len: int, cu_seqlens=None) -> "ShardSpec":
        """The spec of shards of ``local_len`` tokens on ``topo`` (a
        :class:`~ctxpar.dist.topology.CPTopology`)."""
        docs = None if cu_seqlens is None else parse_cu_seqlens(cu_seqlens)
        return _interned(cls, get_layout(layout), topo.ring.size, topo.ulysses.size,
                         local_len * topo.size, docs)

    @classmethod
    def packed(cls, layout, topo, cu_seqlens) -> "ShardSpec":
        """The spec of packed documents ``cu_seqlens`` on ``topo``, padded as needed."""
        docs = parse_cu_seqlens(cu_seqlens)
        p2p, a2a = topo.ring.size, topo.ulysses.size
        return cls(layout, p2p, a2a, padded_length(docs, layout, p2p, a2a), docs)

    @property
    def size(self) -> int:
        return self.p2p * self.a2a

    @property
    def local_len(self) -> int:
        return self.seq_len // self.size

    @functools.cached_property
    def doc_starts(self) -> tuple[int, ...]:
        """Start of every document in the padded sequence (``(0,)`` for a plain one)."""
        if self.docs is None:
            return (0,)
        if not self.layout.balances_documents:
            return self.docs[:-1]
        mult, starts, pos = cp_multiple(self.layout, self.p2p, self.a2a), [], 0
        for a, b in zip(self.docs, self.docs[1:]):
            starts.append(pos)
            pos += _round_up(b - a, mult)
        return tuple(starts)

    @functools.lru_cache(maxsize=256)
    def share(self, ring_rank: int) -> tuple[Segment, ...]:
        """Ring rank ``ring_rank``'s tokens (its whole Ulysses group's), in local order."""
        lay, world = self.layout, self.p2p
        if self.docs is None:
            return tuple(lay.segments(ring_rank, world, self.seq_len))
        lengths = [b - a for a, b in zip(self.docs, self.docs[1:])]
        bounds = [(s, s + n, d + 1) for d, (s, n) in enumerate(zip(self.doc_starts, lengths))]
        if not lay.balances_documents:
            return tuple(piece for s in lay.segments(ring_rank, world, self.seq_len)
                         for piece in _split(s, bounds))
        mult = cp_multiple(lay, self.p2p, self.a2a)
        return tuple(piece for (start, end, d), n in zip(bounds, lengths)
                     for s in lay.segments(ring_rank, world, _round_up(n, mult))
                     for piece in _split(Segment(start + s.start, s.length, s.stride),
                                         [(start, end, d)]))

    @functools.lru_cache(maxsize=256)
    def segments(self, cp_rank: int) -> tuple[Segment, ...]:
        """CP rank ``cp_rank``'s tokens in local order: its ring rank's share, cut to its
        Ulysses piece."""
        share = self.share(cp_rank // self.a2a)
        if self.a2a == 1:
            return share
        n = self.local_len
        lo, hi = (cp_rank % self.a2a) * n, (cp_rank % self.a2a + 1) * n
        out, off = [], 0
        for s in share:
            a, b = max(lo, off), min(hi, off + s.length)
            if a < b:
                out.append(dataclasses.replace(s, start=s.start + (a - off) * s.stride, length=b - a))
            off += s.length
        return tuple(out)

    def positions(self, cp_rank: int, device=None) -> torch.Tensor:
        """Global positions (in the padded sequence) of the rank's tokens, int64."""
        return segment_positions(self.segments(cp_rank), device)

    def share_positions(self, ring_rank: int, device=None) -> torch.Tensor:
        return segment_positions(self.share(ring_rank), device)

    def share_doc_ids(self, ring_rank: int) -> torch.Tensor:
        """The document of every token of a ring rank's share (0 plain, -1 padding)."""
        return torch.cat([torch.full((s.length,), s.doc, dtype=torch.int64) for s in self.share(ring_rank)])

    @functools.lru_cache(maxsize=256)
    def runs(self, cp_rank: int) -> tuple[tuple[int, int], ...]:
        """Maximal runs ``(start, length)`` of consecutive positions of the rank's tokens, in
        local order (pieces that touch, e.g. zigzag chunks N-1 and N or consecutive
        documents' pieces, are one run). Layouts with consecutive runs only."""
        if not self.layout.consecutive_runs:
            raise ValueError(f"layout={self.layout.name!r} holds no runs of consecutive tokens")
        runs: list[list[int]] = []
        for s in self.segments(cp_rank):
            if runs and runs[-1][0] + runs[-1][1] == s.start:
                runs[-1][1] += s.length
            else:
                runs.append([s.start, s.length])
        return tuple((a, n) for a, n in runs)

    def sources(self, cp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For every local token of the rank: its index in the original (unpadded) sequence,
        -1 for padding, and its position within its document (int64 each)."""
        src, within = [], []
        for s in self.segments(cp_rank):
            pos = segment_positions([s])
            if s.doc < 0:
                src.append(torch.full_like(pos, -1))
                within.append(pos)
            elif s.doc == 0:
                src.append(pos)
                within.append(pos)
            else:
                start = self.doc_starts[s.doc - 1]
                src.append(pos - start + self.docs[s.doc - 1])
                within.append(pos - start)
        return torch.cat(src), torch.cat(within)


@functools.lru_cache(maxsize=256)
def _interned(cls, layout: Layout, p2p: int, a2a: int, seq_len: int, docs) -> ShardSpec:
    # One object per distinct spec: the per-call caches keyed on a spec (its shares, the
    # methods' plans) then hash and compare it by identity first. An invalid spec raises
    # and is not cached.
    return cls(layout, p2p, a2a, seq_len, docs)


def _split(seg: Segment, bounds: list[tuple[int, int, int]]) -> list[Segment]:
    """Cut a (strided) segment at document bounds ``(start, end, doc)``; positions outside
    every document are padding (doc -1)."""
    out, i = [], 0
    while i < seg.length:
        pos = seg.start + i * seg.stride
        doc, end = -1, None
        for a, b, d in bounds:
            if a <= pos < b:
                doc, end = d, b
                break
        if doc < 0:
            end = min((a for a, _, _ in bounds if a > pos), default=None)
        n = seg.length - i if end is None else min(seg.length - i, -(-(end - pos) // seg.stride))
        out.append(Segment(pos, n, seg.stride, doc))
        i += n
    return out
