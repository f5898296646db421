"""Block planning: which (query rows, key rows) tiles of a local block pair need computing,
and with which mask.

Between a query segment ``(qa, Lq, st)`` and a key segment ``(ka, Lk, st)`` of equal stride
(see ``ctxpar.sequence.layouts``), the global offset between query i and key j is
``q_pos - k_pos = (qa - ka) + (i - j) * st``. Causal masking and a sliding window both bound
this offset, so the visible set is a *band* in ``m = i - j``:

    lo <= i - j <= hi

(``None`` for an unbounded side). Every layout's mask is such a band: the causal diagonal is
``lo = 0``, striped's "strictly earlier" block is ``lo = 1``, a fully visible block has no
bound that binds, and an empty block has ``lo > hi`` (it is skipped: no compute, no merge).

**Sub-tiles.** A band bounded on both sides (a sliding window) touches only a diagonal
strip of its tile, so :func:`split_band` cuts it: query rows in blocks of ``sub`` rows,
each against only the keys its rows can see, those keys cut again into a left edge (an
upper triangle, masked), a middle every row sees whole (no mask: the fast kernel) and a
right edge (a lower triangle: the kernels' causal flag under a plain causal window).
Nothing outside the band is evaluated, so a window of W costs about
``rows · (W + sub)`` pairs instead of ``rows · keys``. This is the one way windows are
cut, for every method: :func:`plan_segments` plans the ring's, all-gather's and hybrid's
blocks and Ulysses' whole-sequence pass alike.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ctxpar.sequence.layouts import Segment, get_layout

__all__ = ["Band", "Tile", "plan_tiles", "plan_segments", "segment_band", "split_band",
           "ring_steps", "spec_ring_steps"]


@dataclasses.dataclass(frozen=True)
class Band:
    """Key j is visible from query i iff ``lo <= i - j <= hi`` (None: unbounded)."""

    lo: int | None = None
    hi: int | None = None

    @property
    def is_full(self) -> bool:
        return self.lo is None and self.hi is None

    def dense(self, lq: int, lk: int, device=None) -> torch.Tensor:
        """Boolean ``[lq, lk]`` visibility mask."""
        m = torch.arange(lq, device=device)[:, None] - torch.arange(lk, device=device)[None, :]
        vis = torch.ones(lq, lk, dtype=torch.bool, device=device)
        if self.lo is not None:
            vis &= m >= self.lo
        if self.hi is not None:
            vis &= m <= self.hi
        return vis

    def within(self, delta: int, lq: int, lk: int) -> "Band | None":
        """This band as seen from an ``[lq, lk]`` sub-tile whose query origin lies ``delta``
        rows further than its key origin (``delta = q0 - k0`` in the parent's indices);
        None when no pair of the sub-tile is visible."""
        lo = None if self.lo is None else self.lo - delta
        hi = None if self.hi is None else self.hi - delta
        return _clamped(lo, hi, lq, lk)


def _clamped(lo: int | None, hi: int | None, lq: int, lk: int) -> Band | None:
    """The band ``lo <= i - j <= hi`` of an ``[lq, lk]`` tile, bounds that do not bind on
    it dropped (so a fully visible tile is ``FULL``); None when nothing is visible."""
    m_min, m_max = -(lk - 1), lq - 1
    if (lo is not None and lo > m_max) or (hi is not None and hi < m_min) or (
        lo is not None and hi is not None and lo > hi
    ):
        return None
    if lo is not None and lo <= m_min:
        lo = None
    if hi is not None and hi >= m_max:
        hi = None
    return Band(lo, hi)


FULL = Band()
CAUSAL = Band(0, None)


@dataclasses.dataclass(frozen=True)
class Tile:
    """Local query rows ``q0:q1`` against key rows ``k0:k1`` under ``band``."""

    q0: int
    q1: int
    k0: int
    k1: int
    band: Band

    @property
    def score_elements(self) -> int:
        """Number of (query, key) pairs the kernel evaluates for this tile."""
        return (self.q1 - self.q0) * (self.k1 - self.k0)


def _ceildiv(a: int, b: int) -> int:
    return -((-a) // b)


def segment_band(qs: Segment, ks: Segment, causal: bool, window: tuple[int, int]) -> Band | None:
    """The band of ``qs`` against ``ks``; ``None`` when no pair is visible."""
    if qs.stride != ks.stride:
        raise ValueError(f"segments of different strides {qs.stride} and {ks.stride}")
    st = qs.stride
    left, right = window
    # Bounds on the global offset d = q_pos - k_pos.
    d_lo = None
    if causal:
        d_lo = 0
    if right >= 0:
        d_lo = -right if d_lo is None else max(d_lo, -right)
    d_hi = left if left >= 0 else None
    base = qs.start - ks.start
    lo = None if d_lo is None else _ceildiv(d_lo - base, st)
    hi = None if d_hi is None else (d_hi - base) // st
    return _clamped(lo, hi, qs.length, ks.length)


def split_band(tile: Tile, sub: int) -> list[Tile]:
    """``tile`` cut into sub-tiles that cover exactly its visible pairs' rows and keys (see
    the module docstring). Query rows go in blocks of ``sub``; block ``[a, b)`` sees keys
    ``[a - hi, b - lo)`` (an open side of the band: the tile's edge). When the band is at
    least as wide as the block (``hi - lo >= b - a``) those keys split into
    ``[a - hi, b - hi)`` (upper triangle), ``[b - hi, a - lo)`` (every row sees every key)
    and ``[a - lo, b - lo)`` (lower triangle); a narrower band stays one masked sub-tile
    of ``b - a`` by ``hi - lo + b - a`` keys. Meant for bands a window bounds on both
    sides (:func:`plan_segments` splits only those): a plain causal tile stays whole, the
    kernels skip its upper part themselves."""
    lq, lk = tile.q1 - tile.q0, tile.k1 - tile.k0
    band = tile.band
    lo = -(lk - 1) if band.lo is None else band.lo
    hi = lq - 1 if band.hi is None else band.hi
    tiles = []
    for a in range(0, lq, sub):
        b = min(lq, a + sub)
        cuts = (a - hi, b - hi, a - lo, b - lo) if hi - lo >= b - a else (a - hi, b - lo)
        for k0, k1 in zip(cuts, cuts[1:]):
            k0, k1 = max(0, k0), min(lk, k1)
            sub_band = band.within(a - k0, b - a, k1 - k0) if k0 < k1 else None
            if sub_band is not None:
                tiles.append(Tile(tile.q0 + a, tile.q0 + b, tile.k0 + k0, tile.k0 + k1, sub_band))
    return tiles


def plan_tiles(layout: str, world: int, seq_len: int, q_rank: int, kv_rank: int, *,
               causal: bool, window: tuple[int, int] = (-1, -1), sub: int = 0) -> list[Tile]:
    """Tiles that rank ``q_rank``'s queries must compute against ``kv_rank``'s keys, for a
    plain (unpacked) sequence; see :func:`plan_segments`."""
    lay = get_layout(layout)
    lay.check_divisible(seq_len, world)
    return plan_segments(tuple(lay.segments(q_rank, world, seq_len)),
                         tuple(lay.segments(kv_rank, world, seq_len)),
                         causal=causal, window=window, diagonal=q_rank == kv_rank, sub=sub)


@functools.lru_cache(maxsize=4096)
def plan_segments(qsegs: tuple, ksegs: tuple, *, causal: bool,
                  window: tuple[int, int] = (-1, -1), diagonal: bool = False,
                  sub: int = 0) -> list[Tile]:
    """Tiles for query segments ``qsegs`` against key segments ``ksegs`` (local order).

    Segments carry their document (packed documents; ``-1`` marks padding): pairs from
    different documents, or involving padding, are skipped outright. ``diagonal``
    says both sides are the same tokens. Fully visible segment pairs are merged into as few
    rectangles as possible, so that e.g. a zigzag step from an earlier rank is one
    ``2c x c`` call and from a later one a ``c x 2c`` call, as in the balanced schedule.
    With ``sub > 0`` a windowed pair's tile is cut into sub-tiles of ``sub`` query rows
    (:func:`split_band`); ``sub = 0`` keeps one tile per pair (enough to know whether a
    block has any work)."""
    n_q = sum(s.length for s in qsegs)
    n_k = sum(s.length for s in ksegs)
    windowed = window[0] >= 0 or window[1] >= 0
    # Bounded on both sides (a window's left edge, and causality or its right edge): the
    # visible pairs are a narrow band, worth cutting into sub-tiles.
    narrow = sub > 0 and window[0] >= 0 and (causal or window[1] >= 0)
    packed = any(s.doc != 0 for s in qsegs + ksegs)
    if not causal and not windowed and not packed:
        return [Tile(0, n_q, 0, n_k, FULL)]
    if diagonal and causal and not windowed and not packed:
        # Local positions increase along the local order in every layout, so the
        # diagonal block is plain causal on the concatenated local sequence.
        return [Tile(0, n_q, 0, n_k, CAUSAL)]
    q_off = [0]
    for s in qsegs:
        q_off.append(q_off[-1] + s.length)
    k_off = [0]
    for s in ksegs:
        k_off.append(k_off[-1] + s.length)
    banded: list[Tile] = []
    full_rows: list[tuple[int, int, tuple[tuple[int, int], ...]]] = []
    for qi, qs in enumerate(qsegs):
        full_ranges: list[tuple[int, int]] = []
        q_doc = qs.doc
        for ki, ks in enumerate(ksegs):
            if q_doc < 0 or ks.doc != q_doc:
                continue
            band = segment_band(qs, ks, causal, window)
            if band is None:
                continue
            if band.is_full:
                if full_ranges and full_ranges[-1][1] == k_off[ki]:
                    full_ranges[-1] = (full_ranges[-1][0], k_off[ki + 1])
                else:
                    full_ranges.append((k_off[ki], k_off[ki + 1]))
            else:
                tile = Tile(q_off[qi], q_off[qi + 1], k_off[ki], k_off[ki + 1], band)
                banded.extend(split_band(tile, sub) if narrow else [tile])
        if full_ranges:
            key = tuple(full_ranges)
            if full_rows and full_rows[-1][1] == q_off[qi] and full_rows[-1][2] == key:
                full_rows[-1] = (full_rows[-1][0], q_off[qi + 1], key)
            else:
                full_rows.append((q_off[qi], q_off[qi + 1], key))
    tiles = [Tile(q0, q1, k0, k1, FULL) for q0, q1, ranges in full_rows for k0, k1 in ranges]
    return tiles + banded


def ring_steps(segments_of, world: int, *, causal: bool, window: tuple[int, int] = (-1, -1)) -> int:
    """How many ring steps are needed: 1 + the farthest hop at which any rank still has a
    tile to compute. Equal to ``world`` unless a window keeps every rank's reach short.
    ``segments_of(rank)`` gives a rank's segments (a tuple).

    Ranks are tried last first and the search of a step stops at the first rank with work:
    under causal masking the last ranks hold the latest tokens in every layout, so without
    a window each step costs one plan, O(N) in all; a window that empties far steps for
    every rank costs O(N²) plans, once per spec (:func:`spec_ring_steps` caches it)."""
    steps = 1
    for s in range(1, world):
        if any(plan_segments(segments_of(r), segments_of((r - s) % world), causal=causal,
                             window=window) for r in reversed(range(world))):
            steps = s + 1
    return steps


@functools.lru_cache(maxsize=256)
def spec_ring_steps(spec, world: int, causal: bool, window: tuple[int, int]) -> int:
    """:func:`ring_steps` over the ring shares of ``spec`` (a ``ShardSpec``), cached per
    (spec, world, mask): the per-call cost is one dictionary lookup."""
    return ring_steps(spec.share, world, causal=causal, window=window)
