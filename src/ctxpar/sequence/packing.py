"""Packed documents and padding for CP: :func:`shard_packed`, :func:`unshard_packed` and
:func:`pad_for_cp`. The token order (per-document balance for zigzag, documents in place
for the other layouts) is :class:`~ctxpar.sequence.spec.ShardSpec`'s.

``cu_seqlens`` is the global int32 tensor of document boundaries ``[0, e1, ..., S]`` as in
flash-attn varlen, describing the *original* (unpadded) documents. Attention never crosses
documents and never sees padding: pad rows get ``out = 0`` and ``lse = -inf`` (and zero
gradients), so they are finite, never NaN.
"""
from __future__ import annotations

import dataclasses

import torch

from ctxpar.dist.topology import resolve
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.sharding import check_gather_args, gather_ordered
from ctxpar.sequence.spec import ShardSpec, cp_multiple

__all__ = ["PackedShard", "PadInfo", "shard_packed", "unshard_packed", "pad_for_cp"]


@dataclasses.dataclass(frozen=True)
class PackedShard:
    """What :func:`shard_packed` returns for one rank.

    tokens: the local shard of ``x`` (sequence at ``dim``; pad positions hold ``value``).
    position_ids: int64 ``[S_local]``, positions *within each document* (for RoPE).
    pad_mask: bool ``[S_local]``, True at padding (ignore in the loss).
    local_cu_seqlens: int32 boundaries of the local runs of each document, in local order,
        for a user's own varlen kernel (padding runs included as their own entries).
    cu_seqlens: the original global boundaries: pass them to ``ctxpar.attention``.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    pad_mask: torch.Tensor
    local_cu_seqlens: torch.Tensor
    cu_seqlens: torch.Tensor


def shard_packed(x: torch.Tensor, cu_seqlens, *, group=None, layout: str = "zigzag", dim: int = 1,
                 value=0) -> PackedShard:
    """Shard a packed batch ``x`` (``[..., S, ...]``, documents given by ``cu_seqlens``,
    identical on every rank) with per-document load balancing (see
    :mod:`ctxpar.sequence.spec`). ``group`` may be a hierarchical mesh: the packed order is
    then that of the ring axis (documents padded so that it splits evenly), cut
    contiguously within each Ulysses group."""
    topo = resolve(group)
    dim = dim % x.dim()
    spec = ShardSpec.packed(get_layout(layout), topo, cu_seqlens)
    if spec.docs[-1] != x.shape[dim]:
        raise ValueError(f"cu_seqlens ends at {spec.docs[-1]} but x has {x.shape[dim]} tokens at dim {dim}")
    src, within = spec.sources(topo.rank)
    src = src.to(x.device)
    pad = src < 0
    # Pads read an extra row filled with `value`.
    fill = torch.full_like(x.narrow(dim, 0, 1), value)
    tokens = torch.cat([x, fill], dim).index_select(dim, torch.where(pad, x.shape[dim], src))
    runs = [s.length for s in spec.segments(topo.rank)]
    local_cu = torch.tensor([0] + runs).cumsum(0).to(torch.int32)
    return PackedShard(tokens, within.to(x.device), pad, local_cu.to(x.device),
                       torch.tensor(spec.docs, dtype=torch.int32, device=x.device))


def unshard_packed(x_local: torch.Tensor, cu_seqlens, *, group=None, layout: str = "zigzag",
                   dim: int = 1, check_args: bool = True) -> torch.Tensor:
    """Invert :func:`shard_packed`: gather every rank's shard and return the original packed
    order with padding dropped, ``[..., cu_seqlens[-1], ...]`` on every rank.
    ``check_args`` as for :func:`ctxpar.unshard`."""
    topo = resolve(group)
    dim = dim % x_local.dim()
    if check_args:
        check_gather_args(topo, x_local, dim, layout, cu_seqlens)
    spec = ShardSpec.packed(get_layout(layout), topo, cu_seqlens)
    if spec.seq_len != x_local.shape[dim] * topo.size:
        raise ValueError(f"{x_local.shape[dim]} local tokens x {topo.size} ranks do not match "
                         f"the {spec.seq_len} padded tokens of these cu_seqlens")
    src = torch.cat([spec.sources(q)[0] for q in range(topo.size)])
    keep = torch.nonzero(src >= 0).squeeze(1)
    return gather_ordered(x_local, topo, keep[torch.argsort(src[keep])], dim)


@dataclasses.dataclass(frozen=True)
class PadInfo:
    """What :func:`pad_for_cp` returns besides the padded tensor.

    cu_seqlens: ``[0, S]``: pass to ``ctxpar.attention(..., cu_seqlens=)`` so no query ever
        sees a pad key (needed without causal masking; harmless with it).
    pad_mask: bool ``[S_padded]``, True at padding: drop these from the loss.
    length: the original length S."""

    cu_seqlens: torch.Tensor
    pad_mask: torch.Tensor
    length: int


def pad_for_cp(x: torch.Tensor, *, group=None, layout: str = "zigzag", dim: int = 1,
               value=0, multiple_of: int = 1) -> tuple[torch.Tensor, PadInfo]:
    """Pad the full tensor ``x`` at the end of ``dim`` to the multiple the layout needs on
    ``group`` (2N for zigzag, N otherwise; times the Ulysses degree on a hierarchical mesh),
    times ``multiple_of`` (e.g. an In-Place TTT chunk size: every run of every shard is
    then whole chunks); shard the result with ``ctxpar.shard`` as usual."""
    topo = resolve(group)
    dim = dim % x.dim()
    n = x.shape[dim]
    mult = cp_multiple(get_layout(layout), topo.ring.size, topo.ulysses.size) * checked_multiple(multiple_of)
    total = -(-n // mult) * mult
    if total > n:
        shape = list(x.shape)
        shape[dim] = total - n
        x = torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim)
    mask = torch.arange(total, device=x.device) >= n
    return x, PadInfo(torch.tensor([0, n], dtype=torch.int32, device=x.device), mask, n)


def checked_multiple(multiple_of: int) -> int:
    """``multiple_of`` checked: a positive int."""
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be a positive int, got {multiple_of!r}")
    return multiple_of
