"""Tiles of new queries against cached keys from their global slots
(:mod:`ctxpar.attn.kvcache`), so that a prefill against the cache uses structured band
masks (:mod:`ctxpar.attn.tiles`) instead of one dense ``[B, Sq, Sk]`` mask.

A rank's slots are runs of evenly spaced values in local order (a layout's segments, then
decode tokens every ``N``-th slot). :func:`slot_segments` recovers them as
:class:`~ctxpar.sequence.layouts.Segment` s from the slots alone (no layout is named);
:func:`plan_slots` pairs query and key segments: pairs of one stride get a band tile (or
are skipped when nothing is visible), pairs of different strides a *dense* tile, whose
mask :func:`ctxpar.attn.kvcache.visibility` builds for that tile only. Memory then grows
with the largest tile that needs a mask, not with local length x shard length.
"""
from __future__ import annotations

import bisect

import torch

from ctxpar.attn.tiles import FULL, Tile, segment_band, split_band
from ctxpar.sequence.layouts import Segment

__all__ = ["slot_segments", "plan_slots"]


def slot_segments(slots: torch.Tensor) -> tuple[Segment, ...]:
    """Maximal runs of ``slots`` ``[n]`` (increasing int64) with one step between
    neighbours, greedily from the left, as Segments (a lone slot has stride 1)."""
    n = slots.numel()
    if n < 2:
        return tuple(Segment(int(s), 1) for s in slots.tolist())
    d = slots[1:] - slots[:-1]  # [n - 1]
    changes = ((d[1:] != d[:-1]).nonzero().flatten() + 1).tolist()  # where d takes a new value
    steps = d.tolist() if len(changes) > n // 4 else None  # many runs: one transfer
    segs, a = [], 0
    while a < n:
        if a == n - 1:
            segs.append(Segment(int(slots[a]), 1))
            break
        stride = steps[a] if steps is not None else int(d[a])
        nxt = bisect.bisect_right(changes, a)
        end = changes[nxt] if nxt < len(changes) else n - 1  # d is constant on [a, end)
        segs.append(Segment(int(slots[a]), end - a + 1, stride))
        a = end + 1
    return tuple(segs)


def _same_stride(qs: Segment, ks: Segment) -> tuple[Segment, Segment] | None:
    """The pair with one stride (a lone token takes its partner's), or None."""
    if qs.stride == ks.stride:
        return qs, ks
    if qs.length == 1:
        return Segment(qs.start, 1, ks.stride), ks
    if ks.length == 1:
        return qs, Segment(ks.start, 1, qs.stride)
    return None


def plan_slots(q_slots: torch.Tensor, k_slots: torch.Tensor, *, causal: bool,
               window: tuple[int, int], sub: int = 0) -> list[tuple[Tile, bool]]:
    """``(tile, dense)`` for queries at ``q_slots`` ``[Sq]`` against keys at ``k_slots``
    ``[Sk]`` (local rows): ``dense`` tiles need the slot mask, the others only their
    ``tile.band``. Tiles with no visible pair are left out. With ``sub > 0`` a band that
    a window bounds on both sides is cut into sub-tiles (:func:`ctxpar.attn.tiles.split_band`),
    as in training, so a windowed prefill costs O(S·(W + sub)), not O(S²)."""
    narrow = sub > 0 and window[0] >= 0 and (causal or window[1] >= 0)
    qsegs, ksegs = slot_segments(q_slots), slot_segments(k_slots)
    plan: list[tuple[Tile, bool]] = []
    q0 = 0
    for qs in qsegs:
        k0 = 0
        for ks in ksegs:
            pair = _same_stride(qs, ks)
            if pair is None:
                plan.append((Tile(q0, q0 + qs.length, k0, k0 + ks.length, FULL), True))
            else:
                band = segment_band(*pair, causal, window)
                if band is not None:
                    tile = Tile(q0, q0 + qs.length, k0, k0 + ks.length, band)
                    plan += [(t, False) for t in (split_band(tile, sub) if narrow else [tile])]
            k0 += ks.length
        q0 += qs.length
    return plan
