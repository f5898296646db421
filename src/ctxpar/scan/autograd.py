"""The differentiable scans: :func:`exclusive_scan` and :func:`exclusive_sum` (an autograd
Function whose backward is the reverse scan); see :mod:`ctxpar.scan`."""
from __future__ import annotations

import torch

from ctxpar.dist.topology import resolve
from ctxpar.numerics import acc_dtype
from ctxpar.scan.engine import check_scan_args, owners, start_scan
from ctxpar.sequence.layouts import get_layout

__all__ = ["exclusive_scan", "exclusive_sum"]


def _normalise(values, decay, reset, layout, m, stacked):
    """``values`` as ``m`` carry-dtype elements ``d``, the decay as ``a`` (None: a sum) and
    the reset flags as bool ``[m]`` (None: no resets)."""
    shape = values.shape[1:] if stacked else values.shape
    acc = acc_dtype(values.dtype)
    d = values.detach().to(acc).reshape(m, *shape)
    a = None
    if decay is not None:
        dec = torch.as_tensor(decay, dtype=acc, device=values.device).detach()
        full_dims = values.dim()
        if dec.dim() > full_dims:
            raise ValueError(f"decay of shape {tuple(dec.shape)} does not broadcast to values {tuple(values.shape)}")
        dec = dec.reshape((1,) * (full_dims - dec.dim()) + tuple(dec.shape))
        if not stacked:
            dec = dec.unsqueeze(0)
        torch.broadcast_shapes(dec.shape, d.shape)
        a = dec.expand(m, *dec.shape[1:]).clone()
    flags = None
    if reset is not None:
        flags = torch.as_tensor(reset, dtype=torch.bool, device=values.device).reshape(-1)
        if flags.numel() != m:
            raise ValueError(f"reset must hold {m} flag(s) for layout={layout!r}; got {flags.numel()}")
    return d, a, flags


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, decay, reset, grp, layout, algorithm, reverse):
        m = len(owners(layout, grp.ring.size, grp.ulysses.size)[grp.rank])
        stacked = get_layout(layout).segments_per_rank > 1  # values carry an element dim
        if stacked and (values.dim() == 0 or values.shape[0] != m):
            raise ValueError(f"layout={layout!r} scans {m} element(s) on this rank: values needs a "
                             f"leading dim of {m}, got shape {tuple(values.shape)}")
        d, a, flags = _normalise(values, decay, reset, layout, m, stacked)
        out = start_scan(d, a, grp=grp, layout=layout, algorithm=algorithm, reverse=reverse,
                         reset=flags).wait()
        ctx.meta = (grp, layout, algorithm, reverse, values.shape, values.dtype, m)
        ctx.decay_shape = None if decay is None else torch.as_tensor(decay).shape
        ctx.save_for_backward(a, out, flags)
        return out.reshape(values.shape).to(values.dtype)

    @staticmethod
    def backward(ctx, grad):
        grp, layout, algorithm, reverse, shape, dtype, m = ctx.meta
        a, out, flags = ctx.saved_tensors
        g = grad.to(out.dtype).reshape(out.shape)
        t = start_scan(g, a, grp=grp, layout=layout, algorithm=algorithm, reverse=not reverse,
                       reset=flags).wait()
        gv = t.reshape(shape).to(dtype) if ctx.needs_input_grad[0] else None
        gd = None
        if ctx.needs_input_grad[1]:
            ga = t * out  # d a_q = T_q * S_q
            if flags is not None:  # a reset's a_q scales no state; S_q may be non-finite
                ga = torch.where(flags.reshape(m, *([1] * (ga.dim() - 1))), 0.0, ga)
            ga = ga.reshape(shape)
            gd = ga.sum_to_size(ctx.decay_shape) if ctx.decay_shape != ga.shape else ga
            gd = gd.to(dtype)
        return gv, gd, None, None, None, None, None


def exclusive_scan(values: torch.Tensor, *, decay=None, reset=None, group=None,
                   layout: str = "contiguous", algorithm: str = "allgather",
                   reverse: bool = False) -> torch.Tensor:
    """Exclusive scan of per-rank summaries over a CP group; differentiable in ``values``
    and ``decay``.

    ``values``: this rank's element, any shape ``[*shape]`` (contiguous) or ``[m, *shape]``
    (zigzag: the m elements in local order; m = 2 on a 1-D group, see :func:`owners` on a
    mesh). ``decay``: ``None`` (sum), a number or a tensor broadcastable to ``values``
    (affine). ``reset``: ``None``, a bool (contiguous) or m bools (zigzag); a set flag makes
    the state restart at that element (segmented). ``group``: a ProcessGroup, a 1-D
    DeviceMesh or a ``("ring", "ulysses")`` mesh (then only ``algorithm="allgather"``).
    Returns the exclusive prefix, shaped and typed like ``values``: zeros on the first
    element (the last one with ``reverse=True``).

    >>> carry = exclusive_scan(rank_total, group=cp_group)                 # sum
    >>> carry = exclusive_scan(total, decay=gamma ** n_local, group=g)     # decayed
    >>> carry = exclusive_scan(total, reset=has_doc_start, group=g)        # segmented
    """
    check_scan_args(layout, algorithm)
    grp = resolve(group)
    if isinstance(decay, torch.Tensor) and decay.requires_grad:
        return _ScanFn.apply(values, decay, reset, grp, layout, algorithm, reverse)
    return _ScanFn.apply(values, None if decay is None else torch.as_tensor(decay).detach(),
                         reset, grp, layout, algorithm, reverse)


def exclusive_sum(values: torch.Tensor, **kwargs) -> torch.Tensor:
    """``exclusive_scan`` with no decay and no resets."""
    return exclusive_scan(values, **kwargs)

