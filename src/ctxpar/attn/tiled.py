"""One tile plan through the kernels: :func:`forward_tiles` folds every tile's result into
an :class:`~ctxpar.attn.merge.OutputAccumulator`, :func:`backward_tiles` adds every
tile's gradients into dQ/dK/dV accumulators. The ring, all-gather and Ulysses loops differ
in where K/V come from and where their gradients go, not in how a tile is computed, so
they all call these; every kernel call is counted here (``comm_counters().compute_ops``
and ``score_elements``: the area of each tile handed to a kernel).
"""
from __future__ import annotations

import torch

from ctxpar.attn.kernels import block_backward, block_forward
from ctxpar.attn.merge import OutputAccumulator
from ctxpar.attn.tiles import Tile
from ctxpar.observe.counters import record_compute

__all__ = ["forward_tiles", "backward_tiles", "whole_tile"]


def whole_tile(tiles: list[Tile], lq: int, lk: int) -> Tile | None:
    """The plan's one tile when it covers all ``lq`` query rows and ``lk`` keys (a plain
    sequence: full or causal), else None. Its kernel result *is* the output and its
    kernel gradients *are* the gradients: no accumulator to copy into, no zeroed
    gradient buffers to add into (one pass over out and three over dq/dk/dv saved)."""
    if len(tiles) == 1:
        t = tiles[0]
        if (t.q0, t.q1, t.k0, t.k1) == (0, lq, 0, lk):
            return t
    return None


def forward_tiles(acc: OutputAccumulator, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  tiles: list[Tile], *, scale: float, backend: str) -> None:
    """Attention of ``q``'s tile rows against ``k``/``v``'s tile keys, merged into ``acc``."""
    for t in tiles:
        record_compute("block_fwd", t.score_elements)
        o, l = block_forward(q[:, t.q0:t.q1], k[:, t.k0:t.k1], v[:, t.k0:t.k1], band=t.band,
                             scale=scale, backend=backend)
        acc.add(t, o, l)


def backward_tiles(grads, dout, q, k, v, out, lse, tiles: list[Tile], *, scale: float,
                   backend: str, upcast: bool = True) -> None:
    """Add every tile's gradients into ``grads = (dq, dk, dv)`` (fp32/fp64, shaped like q,
    k, v), from the saved global ``out``/``lse`` (``ctxpar.attn.kernels.block_backward``)."""
    dq, dk, dv = grads
    for t in tiles:
        record_compute("block_bwd", t.score_elements)
        rows, keys = slice(t.q0, t.q1), slice(t.k0, t.k1)
        gq, gk, gv = block_backward(dout[:, rows], q[:, rows], k[:, keys], v[:, keys],
                                    out[:, rows], lse[:, :, rows], band=t.band, scale=scale,
                                    backend=backend, upcast=upcast)
        dq[:, rows] += gq
        dk[:, keys] += gk
        dv[:, keys] += gv
