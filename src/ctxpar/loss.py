"""CP-aware loss and gradient reduction for training with a sequence-sharded CP group.

Under context parallelism every rank holds a slice of each sequence, a full replica of the
parameters, and computes logits for its own tokens only. Two things make the result equal
to one device's:

1. **The loss** (:func:`cp_cross_entropy`): the token-count-weighted mean cross-entropy
   over the whole group. Each rank computes the *sum* of its per-token losses and the
   *number* of its counted tokens (``labels != ignore_index``); both are all-reduced and
   the global sum is divided by the global count. Ignored / pad tokens count nowhere, and
   ranks with more or fewer real tokens weigh exactly as they should (a mean of per-rank
   means would not).

   The returned tensor has the *value* of the global mean on every rank, but its
   *gradient* is that of ``local_sum / global_count`` only: the other ranks' share enters
   as a detached constant. Calling ``backward()`` on every rank therefore
   back-propagates each token's loss exactly once across the group (the attention
   backward carries the cross-rank terms to the ranks that own the keys and values).

2. **The gradient reduction** (:func:`allreduce_gradients`): an explicit all-reduce
   (**sum**, not mean) of every parameter's ``.grad`` over the group. Because rank r's
   gradient is ``d(local_sum_r) / global_count``, the sum over ranks is
   ``d(sum_r local_sum_r) / global_count``, i.e. exactly the single-device gradient of
   the mean loss. For data parallelism on top of CP pass the flattened dp x cp group (a
   process group spanning both, a 2-D ``DeviceMesh``, or a list ``[dp_group, cp_group]``):
   the loss count and the gradients are then summed over both, which is again exact.
   This is what ``ctxpar train`` uses; DDP over the flattened dp x cp group is equivalent
   only when every rank's loss is normalised by the *global* token count, as here, and
   DDP's averaging is undone (DDP divides by the world size, so scale the loss by it).

``group`` everywhere accepts ``None`` (WORLD, or a world of one without
torch.distributed), a ``ProcessGroup``, a ``DeviceMesh`` of any dimension (reduced over
each of its axes in turn, which for a sum is the same as over the flattened mesh), or a
list/tuple of those (reduced over each in turn).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from ctxpar.dist.collectives import all_reduce
from ctxpar.dist.topology import CPGroup, axis_groups
from ctxpar.numerics import acc_dtype

__all__ = ["cp_cross_entropy", "allreduce_gradients", "allreduce_sum", "grad_norm"]


def allreduce_sum(t: torch.Tensor, *, group=None) -> torch.Tensor:
    """Sum ``t`` in place over every rank of ``group`` (see
    :func:`ctxpar.dist.topology.axis_groups`); returns ``t``."""
    for grp in axis_groups(group):
        all_reduce(grp, t)
    return t


def cp_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, group=None,
                     ignore_index: int = -100, return_count: bool = False):
    """Token-mean cross-entropy over the whole CP (and DP) group, equal to one device's.

    Args:
        logits: ``[..., V]`` this rank's logits (any float dtype; computed in fp32, or fp64
            for fp64 logits).
        labels: ``[...]`` int64 targets for the same tokens, *already shifted* on the full
            sequence before sharding (see
            :func:`ctxpar.integrations.transformers.shard_batch`); ``ignore_index`` tokens
            do not count.
        group: the group over which tokens are spread (see the module docstring).
        ignore_index: label value that is excluded from both the sum and the count.
        return_count: also return the global number of counted tokens (an int).

    Returns:
        A scalar whose value is ``global_sum / global_count`` on every rank (0 when no
        token counts) and whose gradient is that of ``local_sum / global_count``: follow
        ``backward()`` with :func:`allreduce_gradients` over the same group.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must "
                         f"agree in every dim but the last")
    acc = acc_dtype(logits.dtype)
    local_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(acc),
                                labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    local_count = (labels != ignore_index).sum()
    stats = torch.stack([local_sum.detach().to(torch.float64),
                         local_count.to(torch.float64)])
    allreduce_sum(stats, group=group)
    global_sum, count = stats[0].to(acc), int(stats[1].item())
    denom = max(count, 1)
    # Value: global mean. Gradient: this rank's tokens only (the rest is a constant).
    loss = local_sum / denom + (global_sum - local_sum.detach()) / denom
    return (loss, count) if return_count else loss


def _params_with_grad(params) -> list[torch.nn.Parameter]:
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    return [p for p in params if p.grad is not None]


def allreduce_gradients(params: torch.nn.Module | Iterable[torch.Tensor], *, group=None,
                        bucket_bytes: int = 64 << 20) -> None:
    """Sum the ``.grad`` of every parameter over ``group``, in place.

    With :func:`cp_cross_entropy` this makes every rank's gradient equal to the
    single-device gradient of the mean loss (see the module docstring for why a sum, not
    a mean). Gradients are flattened into buckets of up to ``bucket_bytes`` per dtype and
    device, so a model costs a few collectives, not one per parameter. Every rank must
    call it with the same parameters in the same order (replicated parameters, as under
    CP). Parameters without a gradient are skipped, which must then be so on every rank.
    """
    groups = axis_groups(group)
    if not groups:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for p in _params_with_grad(params):
        by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_kind.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= bucket_bytes:
                _reduce_bucket(bucket, groups)
                bucket, size = [], 0
        if bucket:
            _reduce_bucket(bucket, groups)


def _reduce_bucket(grads: Sequence[torch.Tensor], groups: Sequence[CPGroup]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    for grp in groups:
        all_reduce(grp, flat)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def grad_norm(params: torch.nn.Module | Iterable[torch.Tensor]) -> float:
    """The global L2 norm of the gradients (after :func:`allreduce_gradients` every rank
    holds the same gradients, so no communication is needed), computed in fp64."""
    grads = [p.grad for p in _params_with_grad(params)]
    if not grads:
        return 0.0
    return float(torch.sqrt(sum((g.detach().to(torch.float64) ** 2).sum() for g in grads)))
