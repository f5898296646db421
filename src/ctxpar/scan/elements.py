"""The scan's element algebra: composing elements ``(a, D, f)`` (:func:`combine`) and
packing several elements into one message buffer (:class:`Packer`); see
:mod:`ctxpar.scan` for the operator."""
from __future__ import annotations

import math

import torch

__all__ = ["combine", "Packer"]


# ------------------------------------------------------------------------ element algebra
# An element is (a, D, f): a None means "a = 1" (a plain sum), f a 0-dim bool tensor (the
# reset flag) or None (no resets); None as a whole element is the identity. Every element
# of one scan has the same None-ness of a and of f.


def combine(first, second):
    """``first`` then ``second`` (in scan order). A set reset flag of ``second`` selects its
    state with ``torch.where``: the old state may be non-finite, and 0 * inf is NaN."""
    if first is None:
        return second
    a1, d1, f1 = first
    a2, d2, f2 = second
    if a2 is None:
        a, d = None, d1 + d2
    else:
        a, d = a2 * a1, torch.addcmul(d2, a2, d1)
    if f2 is None:
        return a, d, None
    return (None if a is None else torch.where(f2, a2, a)), torch.where(f2, d2, d), f1 | f2


class Packer:
    """Flattens elements into rows of one buffer so one message carries several: a row is
    ``[f (1 value, if resets), a (if a decay), D]`` in the carry dtype."""

    def __init__(self, d_shape, a_shape, flags: bool, dtype, device):
        self.d_shape, self.a_shape, self.flags = tuple(d_shape), a_shape, flags
        self.nd = math.prod(self.d_shape)
        self.nf = int(flags)
        self.na = 0 if a_shape is None else math.prod(a_shape)
        self.width = self.nf + self.na + self.nd
        self.dtype, self.device = dtype, device

    def pack(self, elems) -> torch.Tensor:
        rows = []
        for a, d, f in elems:
            parts = [f.to(d.dtype).reshape(1)] if self.flags else []
            parts += [] if self.a_shape is None else [a.reshape(-1)]
            rows.append(torch.cat(parts + [d.reshape(-1)]))
        return torch.stack(rows)

    def unpack(self, buf: torch.Tensor):
        out = []
        lo = self.nf + self.na
        for row in buf.reshape(-1, self.width):
            f = row[0] > 0.5 if self.flags else None
            a = None if self.a_shape is None else row[self.nf:lo].view(self.a_shape)
            out.append((a, row[lo:].view(self.d_shape), f))
        return out

    def empty(self, n: int) -> torch.Tensor:
        return torch.empty(n, self.width, dtype=self.dtype, device=self.device)


