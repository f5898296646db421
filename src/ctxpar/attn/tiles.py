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
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ctxpar.sequence.layouts import Segment, get_layout

__all__ = ["Band", "Tile", "plan_tiles", "ring_steps"]


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
    m_min, m_max = -(ks.length - 1), qs.length - 1
    if (lo is not None and lo > m_max) or (hi is not None and hi < m_min) or (
        lo is not None and hi is not None and lo > hi
    ):
        return None
    if lo is not None and lo <= m_min:
        lo = None
    if hi is not None and hi >= m_max:
        hi = None
    return Band(lo, hi)


def plan_tiles(layout: str, world: int, seq_len: int, q_rank: int, kv_rank: int, *,
               causal: bool, window: tuple[int, int] = (-1, -1)) -> list[Tile]:
    """Tiles that rank ``q_rank``'s queries must compute against ``kv_rank``'s keys, for a
    plain (unpacked) sequence; see :func:`plan_segments`."""
    lay = get_layout(layout)
    lay.check_divisible(seq_len, world)
    return plan_segments(tuple(lay.segments(q_rank, world, seq_len)),
                         tuple(lay.segments(kv_rank, world, seq_len)),
                         causal=causal, window=window, diagonal=q_rank == kv_rank)


@functools.lru_cache(maxsize=4096)
def plan_segments(qsegs: tuple, ksegs: tuple, *, causal: bool,
                  window: tuple[int, int] = (-1, -1), diagonal: bool = False) -> list[Tile]:
    """Tiles for query segments ``qsegs`` against key segments ``ksegs`` (local order).

    Segments carry their document (packed documents; ``-1`` marks padding): pairs from
    different documents, or involving padding, are skipped outright. ``diagonal``
    says both sides are the same tokens. Fully visible segment pairs are merged into as few
    rectangles as possible, so that e.g. a zigzag step from an earlier rank is one
    ``2c x c`` call and from a later one a ``c x 2c`` call, as in the balanced schedule."""
    n_q = sum(s.length for s in qsegs)
    n_k = sum(s.length for s in ksegs)
    windowed = window[0] >= 0 or window[1] >= 0
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
                banded.append(Tile(q_off[qi], q_off[qi + 1], k_off[ki], k_off[ki + 1], band))
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
    ``segments_of(rank)`` gives a rank's segments (a tuple)."""
    steps = 1
    for s in range(1, world):
        if any(plan_segments(segments_of(r), segments_of((r - s) % world), causal=causal,
                             window=window) for r in range(world)):
            steps = s + 1
    return steps
