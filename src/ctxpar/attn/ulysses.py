"""Ulysses attention (DeepSpeed-Ulysses): trade a sequence shard for a head shard.

Forward, on a CP group of N ranks (the *Ulysses degree*)::

    q [B, S/N, Hq, D] --all-to-all--> [B, S, Hq/N, D]       (k, v likewise)
    local attention over the whole sequence, Hq/N heads
    out [B, S, Hq/N, D] --all-to-all--> [B, S/N, Hq, D]

Backward is the mirror image: one all-to-all for dout, the local backward, three for dq,
dk, dv. Each all-to-all is a differentiable autograd Function (:class:`_SeqToHead`,
:class:`_HeadToSeq`), so the same pieces serve the hierarchical method (``ctxpar.attn.hybrid``),
where the local attention is replaced by a ring over the other mesh axis.

**Layouts.** After the all-to-all a rank holds every rank's tokens in rank order (the
layout's *gathered order*), not in global order. We permute once to global order
(``index_select`` over the sequence, O(S·Hq/N·D) bytes, folded into the copy that the
all-to-all needs anyway) and run one plain causal kernel, then permute back before the
return all-to-all. For zigzag the alternative, masking tiles of the gathered order by
global position, needs N² tile calls and N LSE merges over S rows; the permutation costs
less than one merge and keeps the fused kernel's causal block skipping. For the
contiguous layout the gathered order *is* the global order and nothing is permuted.

**Masks.** All masking of the local attention goes through the ring's planner
(``ctxpar.attn.tiles.plan_segments``), by *global* position, on the sequence in global
order cut into one segment per document (``cu_seqlens``; the whole sequence without it):
causal masking, sliding windows (cut into sub-tiles) and documents are planned one way
for every method. Tiles never cross a document and never cover padding, whose rows get
``out = 0``, ``lse = -inf``.

**GQA.** With ``Hkv % N == 0`` the K/V heads are scattered like the query heads. Otherwise
each K/V head is replicated ``rep = N / gcd(Hkv, N)`` times before the all-to-all (the
smallest count giving ``lcm(Hkv, N)`` heads, which both splits evenly over N ranks and
keeps the uniform head mapping ``h -> h // (Hq / Hkv)`` the kernels use), so each rank
receives ``Hkv' / N = Hkv / gcd(Hkv, N)`` K/V heads: exactly the one it needs when
``Hkv`` divides N (e.g. Hq=8, Hkv=2, N=4: rank j gets K/V head j // 2). The backward sums
the gradients of the replicas (in fp32). Bytes each rank sends (= receives) per call,
``e`` the element size, ``Sl = S/N``::

    forward:  (N-1)/N · B·Sl·D·e · (Hq [q] + 2·Hkv' [k, v] + Hq [out])
              (+ (N-1)/N · B·Hq·Sl·4 with return_lse: the LSE rides in the out all-to-all)
    backward: the same, for dout, dq, dk, dv
"""
from __future__ import annotations

import functools
import math

import torch

from ctxpar.attn.kernels import (block_backward, block_forward, refuse_double_backward,
                                 saved_block_state, sub_tile_rows)
from ctxpar.attn.merge import OutputAccumulator
from ctxpar.attn.options import AttnOptions
from ctxpar.attn.tiled import backward_tiles, forward_tiles, whole_tile
from ctxpar.attn.tiles import Tile, plan_segments
from ctxpar.dist import collectives as comms
from ctxpar.dist.topology import CPGroup, CPTopology
from ctxpar.numerics import acc_dtype
from ctxpar.observe.counters import record_compute
from ctxpar.sequence.layouts import Segment
from ctxpar.sequence.spec import ShardSpec

__all__ = ["ulysses_attention", "check_heads", "kv_replication", "seq_to_head", "head_to_seq"]


def check_heads(hq: int, degree: int, method: str = "ulysses") -> None:
    """Raise a ValueError naming the values when ``hq`` does not split over ``degree``."""
    if hq % degree:
        raise ValueError(
            f"method={method!r} needs the query heads (Hq={hq}) to be divisible by the Ulysses "
            f"degree ({degree}); use a degree that divides {hq}, or method='ring'")


def kv_replication(hkv: int, degree: int) -> int:
    """How many times each K/V head is replicated before the all-to-all: ``degree /
    gcd(hkv, degree)`` (1 when ``hkv % degree == 0``)."""
    return degree // math.gcd(hkv, degree)


# ------------------------------------------------------------------------ all-to-alls


def _seq_to_head(x: torch.Tensor, grp: CPGroup, order: torch.Tensor | None) -> torch.Tensor:
    """``[B, Sl, H, D]`` (local order) -> ``[B, S, H/N, D]`` (global order when ``order``
    is given, else gathered order). The result is a strided view of a ``[S, B, H/N, D]``
    buffer: sequence-major, so the received chunks concatenate without a copy."""
    n = grp.size
    if n == 1:
        return x
    b, sl, h, d = x.shape
    send = x.unflatten(2, (n, h // n)).permute(2, 1, 0, 3, 4)  # [N, Sl, B, H/N, D]
    seq = comms.all_to_all_single(grp, send).view(n * sl, b, h // n, d)
    if order is not None:
        seq = seq.index_select(0, order)
    return seq.transpose(0, 1)


def _head_to_seq(y: torch.Tensor, lse: torch.Tensor | None, grp: CPGroup,
                 positions: torch.Tensor | None):
    """``[B, S, h, D]`` (global order if ``positions``, else gathered order) and optionally
    ``lse [B, h, S]`` -> ``([B, S/N, N·h, D], [B, N·h, S/N] or None)``. The LSE travels in
    the same all-to-all as ``y`` (one byte buffer), so the count stays one per call."""
    n = grp.size
    if n == 1:
        return y, lse
    b, s, h, d = y.shape
    sl = s // n
    seq = y.transpose(0, 1)  # [S, B, h, D]
    if positions is not None:
        seq = seq.index_select(0, positions)  # gathered order: chunk j is rank j's tokens
    if lse is None:
        recv = comms.all_to_all_single(grp, seq.reshape(n, sl, b, h, d))
        return recv.permute(2, 1, 0, 3, 4).reshape(b, sl, n * h, d), None
    if positions is not None:
        lse = lse.index_select(2, positions)
    nb_y = _pad8(sl * b * h * d * y.element_size())
    nb_l = _pad8(b * h * sl * lse.element_size())
    send = torch.empty(n, nb_y + nb_l, dtype=torch.uint8, device=y.device)
    _part(send, 0, nb_y, y.dtype, (n, sl, b, h, d)).copy_(seq.view(n, sl, b, h, d))
    _part(send, nb_y, nb_l, lse.dtype, (n, b, h, sl)).copy_(lse.reshape(b, h, n, sl).permute(2, 0, 1, 3))
    recv = comms.all_to_all_single(grp, send)
    out = _part(recv, 0, nb_y, y.dtype, (n, sl, b, h, d)).permute(2, 1, 0, 3, 4).reshape(b, sl, n * h, d)
    lse_out = _part(recv, nb_y, nb_l, lse.dtype, (n, b, h, sl)).permute(1, 0, 2, 3).reshape(b, n * h, sl)
    return out, lse_out


def _pad8(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


def _part(buf: torch.Tensor, offset: int, nbytes: int, dtype, shape) -> torch.Tensor:
    """A typed view of bytes ``[offset, offset + nbytes)`` of every row of ``buf``."""
    numel = math.prod(shape[1:])
    return buf[:, offset:offset + nbytes].view(dtype)[:, :numel].view(shape)


def _fold_replicas(g: torch.Tensor, rep: int) -> torch.Tensor:
    if rep == 1:
        return g
    b, sl, h, d = g.shape
    return g.view(b, sl, h // rep, rep, d).sum(3, dtype=acc_dtype(g.dtype)).to(g.dtype)


class _SeqToHead(torch.autograd.Function):
    """Sequence shard -> head shard (``rep``: replicate each head first, for GQA)."""

    @staticmethod
    def forward(ctx, x, grp: CPGroup, order, positions, rep: int):
        ctx.grp, ctx.positions, ctx.rep = grp, positions, rep
        if rep > 1:
            x = x.repeat_interleave(rep, dim=2)
        return _seq_to_head(x, grp, order)

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward()
        gx, _ = _head_to_seq(g, None, ctx.grp, ctx.positions)
        return _fold_replicas(gx, ctx.rep), None, None, None, None


class _HeadToSeq(torch.autograd.Function):
    """Head shard -> sequence shard; the LSE (optional, not differentiable) rides along."""

    @staticmethod
    def forward(ctx, y, lse, grp: CPGroup, positions, order):
        ctx.grp, ctx.order = grp, order
        out, lse_out = _head_to_seq(y, lse, grp, positions)
        if lse_out is None:
            lse_out = y.new_empty(0, dtype=acc_dtype(y.dtype))
        ctx.mark_non_differentiable(lse_out)
        return out, lse_out

    @staticmethod
    def backward(ctx, gout, _glse):
        refuse_double_backward()
        return _seq_to_head(gout, ctx.grp, ctx.order), None, None, None, None


def seq_to_head(x, grp: CPGroup, *, order=None, positions=None, rep: int = 1):
    """Differentiable sequence-to-head all-to-all; see :func:`_seq_to_head`."""
    if grp.size == 1 and rep == 1:
        return x
    return _SeqToHead.apply(x, grp, order, positions, rep)


def head_to_seq(y, lse, grp: CPGroup, *, positions=None, order=None):
    """Differentiable head-to-sequence all-to-all; returns ``(out, lse or None)``."""
    if grp.size == 1:
        return y, lse
    out, lse_out = _HeadToSeq.apply(y, lse, grp, positions, order)
    return out, (lse_out if lse is not None else None)


# --------------------------------------------------------------------- local attention


class _LocalAttention(torch.autograd.Function):
    """Attention of one rank's full-sequence head shard under a tile plan (global order).
    A plan of one whole tile (plain sequences) calls the kernels directly
    (:func:`~ctxpar.attn.tiled.whole_tile`); the values are the same either way."""

    @staticmethod
    def forward(ctx, q, k, v, tiles: list[Tile], scale: float, backend: str):
        whole = whole_tile(tiles, q.shape[1], k.shape[1])
        if whole is not None:
            record_compute("block_fwd", whole.score_elements)
            out, lse = block_forward(q, k, v, band=whole.band, scale=scale, backend=backend)
        else:
            acc = OutputAccumulator(q, v.shape[-1])
            forward_tiles(acc, q, k, v, tiles, scale=scale, backend=backend)
            out, lse = acc.result()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tiles, ctx.whole, ctx.scale, ctx.backend = tiles, whole, scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dout, q, k, v, out, lse = saved_block_state(ctx, dout)
        if ctx.whole is not None:
            record_compute("block_bwd", ctx.whole.score_elements)
            grads = block_backward(dout, q, k, v, out, lse, band=ctx.whole.band, scale=ctx.scale,
                                   backend=ctx.backend, upcast=False)
        else:
            cdt = acc_dtype(q.dtype)
            grads = [torch.zeros(t.shape, dtype=cdt, device=q.device) for t in (q, k, v)]
            backward_tiles(grads, dout, q, k, v, out, lse, ctx.tiles, scale=ctx.scale,
                           backend=ctx.backend, upcast=False)
        dq, dk, dv = grads
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# Small: an entry holds two int64 [S] tensors on the device (packed batches make one per
# batch), 16 of them are 34 MB at S = 128k.
@functools.lru_cache(maxsize=16)
def _global_view(spec: ShardSpec, n: int, device: torch.device):
    """For the concatenation of every rank's tokens (the gathered order): the global
    position of each token (None if already in order), the permutation to global order
    (None likewise) and the whole sequence in global order as segments, one per run of a
    document (its number: 0 plain, 1.. packed documents, -1 padding). Built on the host
    from the spec and cached per (spec, N, device): a call reads no device value and
    copies nothing to the device."""
    positions = torch.cat([spec.share_positions(r) for r in range(n)])
    in_order = bool(torch.equal(positions, torch.arange(positions.numel())))
    order = None if in_order else torch.argsort(positions)
    doc = torch.cat([spec.share_doc_ids(r) for r in range(n)])
    doc = doc if order is None else doc[order]
    cuts = (torch.nonzero(doc[1:] != doc[:-1]).flatten() + 1).tolist()
    bounds = [0] + cuts + [doc.numel()]
    segments = tuple(Segment(a, b - a, 1, int(doc[a])) for a, b in zip(bounds, bounds[1:]))
    if in_order:
        return None, None, segments
    return positions.to(device), order.to(device), segments


# ------------------------------------------------------------------------ the method


def ulysses_attention(q, k, v, topo: CPTopology, spec: ShardSpec, opts: AttnOptions):
    """Ulysses attention over a 1-D ``topo`` (see :mod:`ctxpar.attn.options`). Returns
    ``(out, lse)`` (``lse`` None when ``opts.return_lse`` is False)."""
    grp = topo.ring
    n = grp.size
    positions, order, segments = _global_view(spec, n, q.device)
    rep = kv_replication(k.shape[2], n)
    qh = seq_to_head(q, grp, order=order, positions=positions)
    kh = seq_to_head(k, grp, order=order, positions=positions, rep=rep)
    vh = seq_to_head(v, grp, order=order, positions=positions, rep=rep)
    tiles = plan_segments(segments, segments, causal=opts.causal, window=opts.window, diagonal=True,
                          sub=sub_tile_rows(q.device))
    oh, lh = _LocalAttention.apply(qh, kh, vh, tiles, opts.scale, opts.backend)
    return head_to_seq(oh, lh if opts.return_lse else None, grp, positions=positions, order=order)
