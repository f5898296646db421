"""Ring attention: Q stays put, K/V blocks travel round the CP group.

At ring step s, rank r holds the K/V block of rank ``src = (r - s) mod N``. The tiles it
computes against that block come from ``ctxpar.attn.tiles.plan_segments``: layout, packed
documents, causality and the window are arguments of this one loop, not copies of it.

Forward: the transfer of the next K/V block (one packed ``[2, B, S, Hkv, D]`` buffer, never
expanded to Hq heads) is posted *before* the current block's compute and waited on only
when the block is needed, so communication overlaps compute. Block results are merged in
place into fp32 (fp64) accumulators with the LSE rule.

Backward (no recomputation of the forward): each block's gradients are computed from the
saved global ``out`` and ``lse``. dQ accumulates locally. The dK/dV accumulator of a block
travels with it: the rank that computed step s adds its share to what it received and
passes it on, overlapped with the next step's compute; after the last step it is sent to
the block's owner (N hops in all when every step is needed).
"""
from __future__ import annotations

import functools

import torch

from ctxpar.attn.kernels import saved_block_state, sub_tile_rows
from ctxpar.attn.merge import OutputAccumulator
from ctxpar.attn.options import AttnOptions
from ctxpar.attn.tiled import backward_tiles, forward_tiles
from ctxpar.attn.tiles import plan_segments, spec_ring_steps
from ctxpar.dist import collectives as comms
from ctxpar.dist.topology import CPGroup, CPTopology
from ctxpar.numerics import acc_dtype
from ctxpar.observe.trace import StepTimer
from ctxpar.sequence.spec import ShardSpec

__all__ = ["ring_attention"]

_DKV_TAG = 1  # dK/dV partial sums and K/V blocks can be in flight between one pair at once


@functools.lru_cache(maxsize=256)
def _plan(spec: ShardSpec, rank: int, size: int, causal: bool, window, sub: int):
    """``(steps, tiles of every step)`` for ring rank ``rank`` of ``size``, cached per
    (spec, rank, mask, sub-tile size): planning runs once per shape, a call costs one
    lookup (specs are interned, so the key hashes and compares cheaply)."""
    # Over the ring axis each rank holds its ring share (on a mesh: after the Ulysses
    # all-to-all, the whole Ulysses group's tokens).
    steps = spec_ring_steps(spec, size, causal, window)
    plans = tuple(plan_segments(spec.share(rank), spec.share((rank - s) % size), causal=causal,
                                window=window, diagonal=s == 0, sub=sub)
                  for s in range(steps))
    return steps, plans


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, grp: CPGroup, spec: ShardSpec, causal: bool, window, scale: float,
                backend: str):
        steps, plans = _plan(spec, grp.rank, grp.size, causal, tuple(window),
                             sub_tile_rows(q.device))
        acc = OutputAccumulator(q, v.shape[-1])
        # Double buffer: compute on `cur` while `nxt` is being received.
        cur = torch.stack([k, v])  # k and v have one shape (checked by ctxpar.attention)
        nxt = torch.empty_like(cur) if steps > 1 else None
        nxt_rank, prev_rank = grp.rank + 1, grp.rank - 1
        timer = StepTimer("fwd", q.device)
        for s in range(steps):
            pending = None
            if s + 1 < steps:
                pending = comms.exchange(grp, [(cur, nxt_rank)], [(nxt, prev_rank)])
            forward_tiles(acc, q, cur[0], cur[1], plans[s], scale=scale, backend=backend)
            timer.mark(s, "compute")
            if pending is not None:
                pending.wait()
                cur, nxt = nxt, cur
            timer.mark(s, "wait")
        out, lse = acc.result()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.grp, ctx.plans, ctx.steps = grp, plans, steps
        ctx.scale, ctx.backend = scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dout, q, k, v, out, lse = saved_block_state(ctx, dout)
        grp, plans, steps = ctx.grp, ctx.plans, ctx.steps
        cdt = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        kv_cur = torch.stack([k, v])
        kv_nxt = torch.empty_like(kv_cur) if steps > 1 else None
        # Three dK/dV buffers: `acc` takes this step's block gradients, `sending` is in
        # flight to the next rank, `incoming` receives the previous rank's partial sum.
        acc = torch.zeros(kv_cur.shape, dtype=cdt, device=q.device)
        sending = torch.empty_like(acc) if steps > 1 else None
        incoming = torch.empty_like(acc) if steps > 1 else None
        r = grp.rank
        dkv_pending = None
        timer = StepTimer("bwd", q.device)
        for s in range(steps):
            kv_pending = None
            if s + 1 < steps:
                kv_pending = comms.exchange(grp, [(kv_cur, r + 1)], [(kv_nxt, r - 1)])
            if s > 0:
                acc.zero_()
            backward_tiles((dq, acc[0], acc[1]), dout, q, kv_cur[0], kv_cur[1], out, lse, plans[s],
                           scale=ctx.scale, backend=ctx.backend, upcast=False)
            timer.mark(s, "compute")
            if dkv_pending is not None:
                dkv_pending.wait()
                acc += incoming
            if steps > 1:
                # After the last step the partial sum goes straight home: the block being
                # held came from rank r - (steps - 1).
                last = s + 1 == steps
                dst = r - (steps - 1) if last else r + 1
                src = r + (steps - 1) if last else r - 1
                dkv_pending = comms.exchange(grp, [(acc, dst)], [(incoming, src)], tag=_DKV_TAG)
                acc, sending = sending, acc
            if kv_pending is not None:
                kv_pending.wait()
                kv_cur, kv_nxt = kv_nxt, kv_cur
            timer.mark(s, "wait")
        if dkv_pending is not None:
            dkv_pending.wait()
            timer.mark(steps - 1, "wait")
            dkv = incoming
        else:
            dkv = acc
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype),
                None, None, None, None, None, None)


def ring_attention(q, k, v, topo: CPTopology, spec: ShardSpec, opts: AttnOptions):
    """Ring attention over ``topo``'s ring axis, each rank holding its ring share of
    ``spec`` (see :mod:`ctxpar.attn.options` for the signature). Returns ``(out, lse)``."""
    return _RingAttention.apply(q, k, v, topo.ring, spec, opts.causal, opts.window, opts.scale,
                                opts.backend)
