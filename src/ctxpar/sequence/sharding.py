"""Shard a full tensor for this CP rank, gather shards back, and the global positions of
a rank's tokens; the token order is :class:`~ctxpar.sequence.spec.ShardSpec`'s."""
from __future__ import annotations

import torch

from ctxpar.dist.agreement import check_agree_on, cu_checksum, dtype_code, text_code
from ctxpar.dist.collectives import all_gather
from ctxpar.dist.topology import CPTopology, resolve
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.spec import ShardSpec

__all__ = ["shard", "unshard", "position_ids", "take_segments", "gather_ordered",
           "check_gather_args"]


def take_segments(x: torch.Tensor, segments, dim: int) -> torch.Tensor:
    """The rows of ``x`` at dim ``dim`` that ``segments`` cover, in order."""
    parts = []
    for s in segments:
        if s.stride == 1:
            parts.append(x.narrow(dim, s.start, s.length))
        else:
            idx = [slice(None)] * x.dim()
            idx[dim] = slice(s.start, s.start + s.length * s.stride, s.stride)
            parts.append(x[tuple(idx)])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def shard(x: torch.Tensor, *, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Take this rank's shard of a full tensor that is identical on every rank.

    ``x``: ``[..., S, ...]`` with the sequence at ``dim``; returns ``[..., S/N, ...]`` in the
    layout's local order. ``group`` may also be a hierarchical CP mesh (see
    :mod:`ctxpar.sequence.spec` for its token order). Differentiable (the backward scatters
    into zeros)."""
    topo = resolve(group)
    lay = get_layout(layout)
    dim = dim % x.dim()
    spec = ShardSpec(lay, topo.ring.size, topo.ulysses.size, x.shape[dim])
    return take_segments(x, spec.segments(topo.rank), dim)


class _GatherOrdered(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, topo: CPTopology, index: torch.Tensor, dim: int):
        ctx.topo, ctx.index, ctx.dim, ctx.n_local = topo, index, dim, x_local.shape[dim]
        rows = x_local.movedim(dim, 0)
        for grp in topo.levels:  # Ulysses first, then ring: rows end in CP rank order
            rows = all_gather(grp, rows).flatten(0, 1)
        return rows.index_select(0, index).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        # Downstream of a gather the computation is replicated on every rank (e.g. a loss
        # on the gathered output), so this rank's gradient is its own rows' gradient.
        g = grad.movedim(ctx.dim, 0)
        full = g.new_zeros(ctx.n_local * ctx.topo.size, *g.shape[1:])
        full.index_copy_(0, ctx.index, g)
        mine = full.narrow(0, ctx.topo.rank * ctx.n_local, ctx.n_local)
        return mine.movedim(0, ctx.dim), None, None, None


def gather_ordered(x_local: torch.Tensor, topo: CPTopology, index: torch.Tensor, dim: int):
    """All-gather every CP rank's shard (concatenated in CP rank order) and return the rows
    ``index`` of it. Differentiable: the backward returns this rank's rows' gradient."""
    if topo.size == 1 and index.numel() == x_local.shape[dim] and bool(
            torch.equal(index, torch.arange(index.numel(), device=index.device))):
        return x_local
    return _GatherOrdered.apply(x_local, topo, index.to(x_local.device), dim)


def check_gather_args(topo: CPTopology, x_local: torch.Tensor, dim: int, layout: str,
                      cu_seqlens=None) -> None:
    """Before a gather: every rank must hold a shard of one shape, dtype and token order, or
    the all-gather fails inside the backend (or hangs); raise a ValueError on every rank."""
    fields = {"S_local": x_local.shape[dim], "ndim": x_local.dim(), "dim": dim,
              "other dims (product)": x_local.numel() // max(1, x_local.shape[dim]),
              "dtype": dtype_code(x_local.dtype), "layout": text_code(layout),
              "cu_seqlens checksum": cu_checksum(cu_seqlens)}
    check_agree_on(topo, fields, "unshard arguments", device=x_local.device,
                   shown=("S_local", "ndim", "dim", "other dims (product)"))


def unshard(x_local: torch.Tensor, *, group=None, layout: str = "zigzag", dim: int = 1,
            check_args: bool = True) -> torch.Tensor:
    """All-gather local shards back into the global order: ``[..., S/N, ...]`` ->
    ``[..., S, ...]`` on every rank. Differentiable: the computation downstream is taken
    to be replicated on every rank, so the backward returns this rank's slice of the
    gradient (not a sum over ranks). ``group`` may be a hierarchical CP mesh.
    ``check_args``: compare the shards' shapes, dtype and layout across ranks first (one
    small all-gather)."""
    topo = resolve(group)
    dim = dim % x_local.dim()
    if check_args:
        check_gather_args(topo, x_local, dim, layout)
    spec = ShardSpec.make(get_layout(layout), topo, x_local.shape[dim])
    order = torch.argsort(torch.cat([spec.positions(q) for q in range(topo.size)]))
    return gather_ordered(x_local, topo, order, dim)


def position_ids(seq_len: int, *, group=None, layout: str = "zigzag", device=None) -> torch.Tensor:
    """Global positions (int64 ``[seq_len // N]``) of this rank's tokens, e.g. for RoPE.
    ``group`` may be a hierarchical CP mesh."""
    topo = resolve(group)
    return ShardSpec(get_layout(layout), topo.ring.size, topo.ulysses.size, seq_len).positions(
        topo.rank, device)
