"""All-gather K/V attention (Llama-3 style): every rank gathers all K/V, keeps its queries.

Forward, rank r of N:

1. post the all-gather of its packed ``[2, B, S/N, Hkv, D]`` K/V (Hkv heads, never
   expanded to Hq) *asynchronously*;
2. meanwhile compute its queries against its own K/V (the diagonal tiles, which need no
   communication);
3. wait, then compute the tiles against every other rank's K/V that its queries can see.

The tiles are those of ``ctxpar.attn.tiles.plan_segments``, by global position, for every
(q rank, kv rank) pair, exactly as in the ring: every layout, packed documents, causal
masking and windows work, and blocks no query can see are skipped (under causal, only the needed prefix is
computed: for the contiguous layout rank r computes against ranks 0..r only). Tile results
are folded into fp32 (fp64) accumulators with the LSE merge; that merge is local, a few
elementwise ops over ``S/N`` rows per tile, with no communication.

Backward: the gathered K/V are *saved* from the forward (memory ``2·B·S·Hkv·D`` elements
per rank, small under GQA), so K/V are gathered once per forward+backward. dQ accumulates
locally; the dK/dV of every rank's block accumulate in one fp32 ``[N, 2, B, S/N, Hkv, D]``
buffer, which a single reduce-scatter sums over ranks and returns to the owners.

Bytes each rank receives per call (``Sl = S/N``, ``e`` the element size):
forward ``(N-1)·2·B·Sl·Hkv·D·e`` (one all-gather); backward ``(N-1)·2·B·Sl·Hkv·D·4``
(one reduce-scatter, fp32 so that the sum over ranks is not rounded to bf16; 8 for fp64).
"""
from __future__ import annotations

import functools

import torch

from ctxpar.attn.kernels import refuse_double_backward, sub_tile_rows
from ctxpar.attn.merge import OutputAccumulator
from ctxpar.attn.options import AttnOptions
from ctxpar.attn.tiled import backward_tiles, forward_tiles
from ctxpar.attn.tiles import plan_segments
from ctxpar.dist import collectives as comms
from ctxpar.dist.topology import CPGroup, CPTopology
from ctxpar.numerics import acc_dtype
from ctxpar.sequence.spec import ShardSpec

__all__ = ["allgather_attention"]


@functools.lru_cache(maxsize=256)
def _plans(spec: ShardSpec, rank: int, size: int, causal: bool, window, sub: int):
    """``((src, tiles), ...)`` for every source rank with work, this rank's own block
    first; cached per (spec, rank, mask, sub-tile size), so a call plans nothing."""
    order = [rank] + [s for s in range(size) if s != rank]
    plans = []
    mine = spec.share(rank)
    for src in order:
        tiles = plan_segments(mine, spec.share(src), causal=causal, window=window,
                              diagonal=src == rank, sub=sub)
        if tiles:
            plans.append((src, tiles))
    return tuple(plans)


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, grp: CPGroup, spec: ShardSpec, causal: bool, window, scale: float,
                backend: str):
        plans = _plans(spec, grp.rank, grp.size, causal, tuple(window), sub_tile_rows(q.device))
        local = torch.stack([k, v])  # [2, B, Sl, Hkv, D]: one collective for K and V
        gathered, work = comms.all_gather(grp, local, async_op=True)  # [N, 2, B, Sl, Hkv, D]
        acc = OutputAccumulator(q, v.shape[-1])
        waited = False
        for src, tiles in plans:
            if src == grp.rank:
                kv = local  # the diagonal: computed while the gather is in flight
            else:
                if not waited:
                    work.wait()
                    waited = True
                kv = gathered[src]
            forward_tiles(acc, q, kv[0], kv[1], tiles, scale=scale, backend=backend)
        if not waited:
            work.wait()  # nothing needed the other blocks (e.g. contiguous rank 0, causal)
        out, lse = acc.result()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, gathered, out, lse)
        ctx.grp, ctx.plans, ctx.scale, ctx.backend = grp, plans, scale, backend
        ctx.kv_dtypes = (k.dtype, v.dtype)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        refuse_double_backward()
        q, gathered, out, lse = ctx.saved_tensors
        cdt = acc_dtype(q.dtype)
        dout = dout.to(q.dtype)
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dkv = torch.zeros(gathered.shape, dtype=cdt, device=q.device)  # every rank's block
        for src, tiles in ctx.plans:
            kv = gathered[src]
            backward_tiles((dq, dkv[src, 0], dkv[src, 1]), dout, q, kv[0], kv[1], out, lse, tiles,
                           scale=ctx.scale, backend=ctx.backend)
        mine = comms.reduce_scatter(ctx.grp, dkv)  # [2, B, Sl, Hkv, D], summed over ranks
        kd, vd = ctx.kv_dtypes
        return dq.to(q.dtype), mine[0].to(kd), mine[1].to(vd), None, None, None, None, None, None


def allgather_attention(q, k, v, topo: CPTopology, spec: ShardSpec, opts: AttnOptions):
    """All-gather K/V attention over a 1-D ``topo`` (see :mod:`ctxpar.attn.options`).
    Returns ``(out, lse)``."""
    return _AllGatherAttention.apply(q, k, v, topo.ring, spec, opts.causal, opts.window,
                                     opts.scale, opts.backend)
