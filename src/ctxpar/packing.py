"""Packed documents and padding: where each rank's tokens sit when a batch packs several
documents (``cu_seqlens``) or when the length is not a multiple of the layout's granularity.

``cu_seqlens`` is the global int32 tensor of document boundaries ``[0, e1, ..., S]`` as in
flash-attn varlen, describing the *original* (unpadded) documents. From it, the layout and
the CP world, every rank derives the same padded token order:

- ``zigzag``: each document is padded at its end to a multiple of 2N and cut into 2N chunks;
  rank r holds chunks r and 2N-1-r *of every document*, document by document (the
  load-balanced THD scheme of TransformerEngine). Every rank does the same work per document.
- ``contiguous`` / ``striped``: documents keep their places in the packed sequence, which is
  padded at its end to a multiple of N and then split as usual.

A rank's tokens are :class:`DocSegment` runs of global positions (in the padded sequence)
tagged with their document; padding has ``doc = -1``. Attention never crosses documents
and never sees padding: pairs of segments from different documents are skipped, pad rows
get ``out = 0`` and ``lse = -inf`` (and zero gradients), so they are finite, never NaN.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from .comms import resolve_group
from .layouts import check_divisible, check_layout, granularity, local_segments, segment_positions
from .mesh import CPTopology, resolve_topology

__all__ = ["DocSegment", "ShardSpec", "PackedShard", "shard_packed", "unshard_packed", "pad_for_cp",
           "cp_runs"]


@dataclasses.dataclass(frozen=True)
class DocSegment:
    """Global positions ``start + i*stride``, ``i < length``, all in document ``doc``
    (``-1`` for padding)."""

    start: int
    length: int
    stride: int = 1
    doc: int = 0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _cu_tuple(cu_seqlens) -> tuple[int, ...]:
    cu = tuple(int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens))
    if len(cu) < 2 or cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError(
            f"cu_seqlens must start at 0 and strictly increase (no empty documents); got {list(cu)[:16]}")
    return cu


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """The token order of one CP group: layout, world, and optionally packed documents.

    ``docs`` is the original ``cu_seqlens`` as a tuple (None: one unpadded sequence of
    ``seq_len`` tokens). ``seq_len`` is the padded global length. ``unit`` is the Ulysses
    degree on a hierarchical mesh (1 otherwise): padding then also makes every ring rank's
    share split evenly within its Ulysses group."""

    layout: str
    world: int
    seq_len: int
    docs: tuple[int, ...] | None = None
    unit: int = 1

    def __post_init__(self) -> None:
        check_layout(self.layout)
        if self.docs is None:
            check_divisible(self.seq_len, self.layout, self.world)
        elif self.seq_len != padded_length(self.docs, self.layout, self.world, self.unit):
            raise ValueError(
                f"cu_seqlens ending at {self.docs[-1]} pads to "
                f"{padded_length(self.docs, self.layout, self.world, self.unit)} tokens under "
                f"layout={self.layout!r} on {self.world * self.unit} ranks, but the shards hold "
                f"{self.seq_len} tokens in all; shard with ctxpar.shard_packed(...)")

    @classmethod
    def make(cls, layout: str, world: int, local_len: int, cu_seqlens=None,
             unit: int = 1) -> "ShardSpec":
        docs = None if cu_seqlens is None else _cu_tuple(cu_seqlens)
        return cls(layout, world, local_len * world, docs, unit)

    @functools.lru_cache(maxsize=64)
    def segments(self, rank: int) -> tuple:
        """This rank's tokens as segments in local order."""
        if self.docs is None:
            return tuple(local_segments(self.layout, rank, self.world, self.seq_len))
        return tuple(_packed_segments(self.docs, self.layout, self.world, rank, self.seq_len,
                                      self.unit))

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global positions (in the padded sequence) of the rank's tokens, int64."""
        return segment_positions(self.segments(rank), device)

    def doc_ids(self, rank: int, device=None) -> torch.Tensor:
        return torch.cat([torch.full((s.length,), getattr(s, "doc", 0), dtype=torch.int64, device=device)
                          for s in self.segments(rank)])


def padded_length(docs: tuple[int, ...], layout: str, world: int, unit: int = 1) -> int:
    if layout == "zigzag":
        return sum(_round_up(b - a, 2 * world * unit) for a, b in zip(docs, docs[1:]))
    return _round_up(docs[-1], world * unit)


def _doc_starts(docs: tuple[int, ...], layout: str, world: int, unit: int = 1) -> list[int]:
    """Start of every document in the padded sequence."""
    if layout != "zigzag":
        return list(docs[:-1])
    starts, pos = [], 0
    for a, b in zip(docs, docs[1:]):
        starts.append(pos)
        pos += _round_up(b - a, 2 * world * unit)
    return starts


def _split(seg_start: int, seg_len: int, stride: int, bounds: list[tuple[int, int, int]]):
    """Cut a strided run of positions at document bounds ``(start, end, doc)``; positions
    outside every document are padding."""
    out, i = [], 0
    while i < seg_len:
        pos = seg_start + i * stride
        doc, end = -1, None
        for a, b, d in bounds:
            if a <= pos < b:
                doc, end = d, b
                break
        if doc < 0:
            nxt = min((a for a, _, _ in bounds if a > pos), default=None)
            end = nxt
        n = seg_len - i if end is None else min(seg_len - i, -(-(end - pos) // stride))
        out.append(DocSegment(pos, n, stride, doc))
        i += n
    return out


def _packed_segments(docs, layout, world, rank, seq_len, unit=1):
    starts = _doc_starts(docs, layout, world, unit)
    bounds = [(s, s + (b - a), d + 1) for d, (s, a, b) in enumerate(zip(starts, docs, docs[1:]))]
    # Documents are numbered from 1 so that 0 (plain, unpacked) and -1 (padding) stay distinct.
    if layout != "zigzag":
        segs = []
        for s in local_segments(layout, rank, world, seq_len):
            segs += _split(s.start, s.length, s.stride, bounds)
        return segs
    segs = []
    for (start, a, b), bound in zip(zip(starts, docs, docs[1:]), bounds):
        c = _round_up(b - a, 2 * world * unit) // (2 * world)
        for chunk in (rank, 2 * world - 1 - rank):
            segs += _split(start + chunk * c, c, 1, [bound])
    return segs


# ----------------------------------------------------------------------------- public API


@dataclasses.dataclass(frozen=True)
class PackedShard:
    """What :func:`shard_packed` returns for one rank.

    tokens: the local shard of ``x`` (sequence at ``dim``; pad positions hold ``value``).
    position_ids: int64 ``[S_local]``, positions *within each document* (for RoPE).
    pad_mask: bool ``[S_local]``, True at padding (ignore in the loss).
    local_cu_seqlens: int32 boundaries of the local runs of each document, in local order,
        for a user's own varlen kernel (padding runs included as their own entries).
    cu_seqlens: the original global boundaries: pass them to ``ctxpar.attention``.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    pad_mask: torch.Tensor
    local_cu_seqlens: torch.Tensor
    cu_seqlens: torch.Tensor


def _rank_tokens(spec: ShardSpec, docs, starts, ring_rank: int, pieces: int, piece: int):
    """For CP rank (ring_rank, piece): the original index of every local token (-1 for
    padding), its position within its document, and the lengths of its runs."""
    src, within, runs = [], [], []
    for s in spec.segments(ring_rank):
        pos = torch.arange(s.start, s.start + s.length * s.stride, s.stride)
        if s.doc < 0:
            src.append(torch.full_like(pos, -1))
            within.append(pos)
        else:
            src.append(pos - starts[s.doc - 1] + docs[s.doc - 1])
            within.append(pos - starts[s.doc - 1])
        runs.append(s.length)
    src, within = torch.cat(src), torch.cat(within)
    if pieces > 1:  # the ring rank's share, split contiguously within its Ulysses group
        m = src.numel() // pieces
        lo, hi = piece * m, (piece + 1) * m
        bounds = torch.tensor([0] + runs).cumsum(0)
        runs = [int(min(b, hi) - max(a, lo)) for a, b in zip(bounds[:-1], bounds[1:])
                if min(b, hi) > max(a, lo)]
        src, within = src[lo:hi], within[lo:hi]
    return src, within, runs


def _packed_spec(docs, layout: str, topo: CPTopology) -> tuple[ShardSpec, list[int]]:
    p2p, a2a = topo.ring.size, topo.ulysses.size
    spec = ShardSpec(layout, p2p, padded_length(docs, layout, p2p, a2a), docs, a2a)
    return spec, _doc_starts(docs, layout, p2p, a2a)


def shard_packed(x: torch.Tensor, cu_seqlens, *, group=None, layout: str = "zigzag", dim: int = 1,
                 value=0) -> PackedShard:
    """Shard a packed batch ``x`` (``[..., S, ...]``, documents given by ``cu_seqlens``,
    identical on every rank) with per-document load balancing; see the module docstring.
    ``group`` may be a hierarchical mesh (``ctxpar.cp_mesh``): the packed order is then that
    of the ring axis (documents padded so that it splits evenly), cut contiguously within
    each Ulysses group."""
    topo = resolve_topology(group)
    check_layout(layout)
    dim = dim % x.dim()
    docs = _cu_tuple(cu_seqlens)
    if docs[-1] != x.shape[dim]:
        raise ValueError(f"cu_seqlens ends at {docs[-1]} but x has {x.shape[dim]} tokens at dim {dim}")
    spec, starts = _packed_spec(docs, layout, topo)
    src, within, runs = _rank_tokens(spec, docs, starts, topo.ring.rank, topo.ulysses.size,
                                     topo.ulysses.rank)
    src = src.to(x.device)
    pad = src < 0
    # Pads read an extra row filled with `value`.
    fill = torch.full_like(x.narrow(dim, 0, 1), value)
    tokens = torch.cat([x, fill], dim).index_select(dim, torch.where(pad, x.shape[dim], src))
    local_cu = torch.tensor([0] + runs).cumsum(0).to(torch.int32)
    return PackedShard(tokens, within.to(x.device), pad, local_cu.to(x.device),
                       torch.tensor(docs, dtype=torch.int32, device=x.device))


def unshard_packed(x_local: torch.Tensor, cu_seqlens, *, group=None, layout: str = "zigzag",
                   dim: int = 1) -> torch.Tensor:
    """Invert :func:`shard_packed`: gather every rank's shard and return the original packed
    order with padding dropped, ``[..., cu_seqlens[-1], ...]`` on every rank."""
    from .layouts import unshard  # the differentiable gather

    topo = resolve_topology(group)
    dim = dim % x_local.dim()
    docs = _cu_tuple(cu_seqlens)
    spec, starts = _packed_spec(docs, layout, topo)
    if spec.seq_len != x_local.shape[dim] * topo.size:
        raise ValueError(f"{x_local.shape[dim]} local tokens x {topo.size} ranks do not match "
                         f"the {spec.seq_len} padded tokens of these cu_seqlens")
    # Contiguous unsharding concatenates the shards in CP rank order (ring-major).
    gathered = unshard(x_local, group=group, layout="contiguous", dim=dim) if topo.size > 1 else x_local
    src = torch.cat([_rank_tokens(spec, docs, starts, r, topo.ulysses.size, u)[0]
                     for r in range(topo.ring.size) for u in range(topo.ulysses.size)])
    keep = torch.nonzero(src >= 0).squeeze(1)
    idx = keep[torch.argsort(src[keep])]
    return gathered.index_select(dim, idx.to(x_local.device))


def cp_runs(layout: str, topo: CPTopology, local_len: int, cu_seqlens=None):
    """Where every CP rank's tokens sit, as runs of consecutive positions of the (padded)
    global sequence: ``(runs, seq_len, doc_starts)``.

    ``runs[q]`` lists ``(start, length)`` in CP rank q's local order (q = ring_rank * a2a +
    ulysses_rank); ``seq_len`` is the padded global length and ``doc_starts`` the documents'
    starts in it (``[0]`` without ``cu_seqlens``). With ``cu_seqlens`` the tokens are those of
    :func:`shard_packed` (the library's convention for packed batches), else of
    :func:`ctxpar.shard`. Stride-1 layouts only (contiguous, zigzag)."""
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"cp_runs takes layout 'contiguous' or 'zigzag' (runs of consecutive "
                         f"tokens); got {layout!r}")
    docs = None if cu_seqlens is None else _cu_tuple(cu_seqlens)
    return _cp_runs(layout, topo.ring.size, topo.ulysses.size, local_len, docs)


@functools.lru_cache(maxsize=64)
def _cp_runs(layout, p2p, a2a, local_len, docs):
    size = p2p * a2a
    if docs is None:
        spec = ShardSpec(layout, p2p, local_len * size, None, a2a)
    else:
        spec = ShardSpec(layout, p2p, padded_length(docs, layout, p2p, a2a), docs, a2a)
    if docs is not None and spec.seq_len != local_len * size:
        raise ValueError(
            f"cu_seqlens ending at {docs[-1]} pads to {spec.seq_len} tokens under layout={layout!r} "
            f"on {size} rank(s), but the shards hold {local_len} x {size} = {local_len * size}; "
            f"shard packed batches with ctxpar.shard_packed(...)")
    runs = []
    for r in range(p2p):
        pos = spec.positions(r)
        m = pos.numel() // a2a
        for u in range(a2a):
            piece = pos[u * m:(u + 1) * m]  # the Ulysses split, as in shard_packed / cp_segments
            # Maximal runs: pieces that touch (zigzag blocks N-1 and N, an odd Ulysses split,
            # consecutive documents' pieces) are one run.
            cut = (torch.nonzero(piece[1:] - piece[:-1] != 1).flatten() + 1).tolist()
            bounds = [0] + cut + [piece.numel()]
            runs.append(tuple((int(piece[a]), b - a) for a, b in zip(bounds, bounds[1:])))
    starts = (0,) if docs is None else tuple(_doc_starts(docs, layout, p2p, a2a))
    return tuple(runs), spec.seq_len, starts


@dataclasses.dataclass(frozen=True)
class PadInfo:
    """What :func:`pad_for_cp` returns besides the padded tensor.

    cu_seqlens: ``[0, S]``: pass to ``ctxpar.attention(..., cu_seqlens=)`` so no query ever
        sees a pad key (needed without causal masking; harmless with it).
    pad_mask: bool ``[S_padded]``, True at padding: drop these from the loss.
    length: the original length S."""

    cu_seqlens: torch.Tensor
    pad_mask: torch.Tensor
    length: int


def pad_for_cp(x: torch.Tensor, *, group=None, layout: str = "zigzag", dim: int = 1,
               value=0) -> tuple[torch.Tensor, PadInfo]:
    """Pad the full tensor ``x`` at the end of ``dim`` to the layout's multiple (2N for
    zigzag, N otherwise); shard the result with ``ctxpar.shard`` as usual."""
    grp = resolve_group(group)
    dim = dim % x.dim()
    n = x.shape[dim]
    total = _round_up(n, granularity(layout, grp.size))
    if total > n:
        shape = list(x.shape)
        shape[dim] = total - n
        x = torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim)
    mask = torch.arange(total, device=x.device) >= n
    return x, PadInfo(torch.tensor([0, n], dtype=torch.int32, device=x.device), mask, n)
