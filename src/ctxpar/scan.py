"""Differentiable exclusive scans across the ranks of a CP group.

Elements and the operator
-------------------------
An *element* is one contiguous run of the sequence held by one rank (a segment of
:meth:`ctxpar.sequence.spec.ShardSpec.runs`); the global scan order is the order of the runs
in the sequence. With N ranks:

- ``layout="contiguous"``: one element per rank, rank r holds element r.
- ``layout="zigzag"``: rank r holds elements r and 2N-1-r (the block order of the zigzag
  sequence layout, see :mod:`ctxpar.sequence.layouts`); ``values`` carries a leading dim of 2 in
  local order.
- On a ``("ring", "ulysses")`` mesh, CP rank ``r * a2a + u`` holds the runs of its piece
  of ring rank r's shard (for zigzag, a leading dim of m = 1 or 2 runs; :func:`owners`).

Element q acts on a state as ``S -> a_q * S + D_q``, or ``S -> D_q`` where its reset flag
``f_q`` is set (the state restarts at element q):

- sum: ``a_q = 1``;
- affine / decayed: ``a_q = decay_q`` (any shape that broadcasts against ``D_q``);
- segmented: ``f_q = reset_q`` (with a decay or without).

Applying element 1 then element 2 composes as ``(a1, D1) then (a2, D2) = (a2*a1, a2*D1 + D2)``,
and with resets as ``(f1 or f2, f2 ? D2 : a2*D1 + D2)``. A reset *selects* D2; it never scales
the old state by a zero coefficient, since 0 * inf = NaN would carry a non-finite value
(say one packed document's overflow) across the reset into every later element, and
likewise backwards through the gradients. The *exclusive* scan returns, for each
element q, ``S_q = sum_{p<q} (prod_{p<k<q} a_k) D_p``: element q's own D never enters its
own prefix. Nothing is ever computed as an inclusive scan minus the element itself, so a
prefix is exact up to the rounding of the sums it contains. ``reverse=True`` scans from the
last element to the first: ``T_q = sum_{p>q} (prod_{q<k<p} a_k) D_p``.

Autograd: the backward of an exclusive scan is the reverse exclusive scan of the output
gradients with the same ``a`` and resets (``dD_q = T_q``), and ``d a_q = T_q * S_q``, or 0
where element q resets (its ``a_q`` multiplies no state).

Algorithms (all give the same result up to the order of the additions)
------------------------------------------------------------------------
================  =========================  ===========================================
``allgather``     1 round                    every rank receives the (N-1) other summaries
``hillis_steele`` ceil(log2 M) rounds        one summary per round (log-step windows)
``ring``          M-1 serial hops            the carry walks the element order once
================  =========================  ===========================================

On a mesh only ``allgather`` runs (Ulysses group, then ring). For 1-D zigzag, M = 2N and
the ring's carry goes up ranks 0..N-1 and back down: both P2P algorithms are written once
for an arbitrary owner map. ``allgather`` alone can be left in flight (:func:`start_scan`)
so that its communication overlaps local work.

Carries are accumulated and communicated in float32 (float64 for float64 input); results
come back in the input dtype.
"""
from __future__ import annotations

import functools
import math

import torch

from ctxpar.dist.collectives import PendingExchange, all_gather, exchange
from ctxpar.dist.topology import CPTopology, resolve
from ctxpar.numerics import acc_dtype
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.spec import ShardSpec

__all__ = ["ALGORITHMS", "PendingScan", "exclusive_scan", "exclusive_sum", "owners",
           "owners_of_runs", "start_scan"]

ALGORITHMS = ("allgather", "hillis_steele", "ring")


def _check(layout: str, algorithm: str) -> None:
    if not get_layout(layout).consecutive_runs:
        raise ValueError(
            f"scan layout {layout!r} is not supported: a rank of it holds no contiguous run of "
            f"the sequence to summarise")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown scan algorithm {algorithm!r}; expected one of {ALGORITHMS}")


def owners(layout: str, p2p: int, a2a: int = 1) -> tuple[tuple[int, ...], ...]:
    """Element indices held by every CP rank (``r * a2a + u``), in local order.

    The runs' structure does not depend on the sequence length, so it is read off the
    shortest length the topology admits."""
    _check(layout, "allgather")
    return _owners(layout, p2p, a2a)


@functools.lru_cache(maxsize=None)
def _owners(layout: str, p2p: int, a2a: int) -> tuple[tuple[int, ...], ...]:
    spec = ShardSpec(layout, p2p, a2a, get_layout(layout).granularity(p2p) * a2a)
    # One element per segment (zigzag blocks stay two elements even where they touch).
    return owners_of_runs([[s.start for s in spec.segments(q)] for q in range(p2p * a2a)])


def owners_of_runs(starts) -> tuple[tuple[int, ...], ...]:
    """Element indices from every CP rank's run starts (local order): the runs numbered in
    sequence order."""
    order = {x: e for e, x in enumerate(sorted(x for rank in starts for x in rank))}
    return tuple(tuple(order[x] for x in rank) for rank in starts)


def _gather(topo: CPTopology, local: torch.Tensor):
    """All-gather ``local`` over every CP rank: ``([size, *local.shape], pending)``, rows in
    CP rank order. On a mesh: inside the Ulysses group first (blocking), then across the
    ring (left in flight)."""
    if topo.ulysses.size == 1:
        return all_gather(topo.ring, local, async_op=True)
    inner = all_gather(topo.ulysses, local)
    if topo.ring.size == 1:
        return inner, PendingExchange([])
    out, work = all_gather(topo.ring, inner, async_op=True)
    return out.view(topo.size, *local.shape), work


# ------------------------------------------------------------------------ element algebra
# An element is (a, D, f): a None means "a = 1" (a plain sum), f a 0-dim bool tensor (the
# reset flag) or None (no resets); None as a whole element is the identity. Every element
# of one scan has the same None-ness of a and of f.


def _combine(first, second):
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


class _Packer:
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


class PendingScan:
    """Result of :func:`start_scan`; ``wait()`` returns the exclusive prefixes ``[m, ...]``."""

    def __init__(self, result=None, finish=None):
        self._result, self._finish = result, finish

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._result = self._finish()
            self._finish = None
        return self._result


def start_scan(d: torch.Tensor, a: torch.Tensor | None, *, grp, layout: str,
               algorithm: str = "allgather", reverse: bool = False, held=None,
               reset: torch.Tensor | None = None) -> PendingScan:
    """Non-differentiable exclusive scan of this rank's ``m`` elements.

    ``d``: ``[m, *shape]`` (carry dtype); ``a``: ``None`` (sum) or ``[m, *a_shape]`` with
    ``a_shape`` broadcastable to ``shape``; ``reset``: ``None`` or bool ``[m]``, the elements
    where the state restarts (selected, never scaled by zero: see the module docstring).
    ``grp``: a :class:`~ctxpar.dist.topology.CPTopology` or anything ``group=`` takes. Every
    rank must pass the same shapes, ``a is None`` and ``reset is None``. ``held`` overrides the layout's element map
    (:func:`owners`): the element indices of every CP rank, in local order, e.g. the runs
    of a packed shard. ``allgather`` returns at once with the gather in flight; the other
    algorithms finish before returning."""
    _check(layout, algorithm)
    topo = resolve(grp)
    if topo.ulysses.size > 1 and algorithm != "allgather":
        raise ValueError(
            f"scan algorithm {algorithm!r} needs messages between any two CP ranks; on a "
            f"hierarchical mesh (sizes {topo.sizes}) use algorithm='allgather'")
    world, me = topo.size, topo.rank
    if held is None:
        held = owners(layout, topo.ring.size, topo.ulysses.size)
    mine = held[me]
    m, big_m = len(mine), sum(len(h) for h in held)
    if d.shape[0] != m:
        raise ValueError(f"layout={layout!r} holds {m} element(s) on this rank; got a leading dim of {d.shape[0]}")
    elems = [(None if a is None else a[j], d[j], None if reset is None else reset[j].to(torch.bool))
             for j in range(m)]
    # Work in virtual indices u: u = e going forward, u = M-1-e in reverse; the scan is then
    # always a forward exclusive scan over u.
    virt = [(big_m - 1 - e) if reverse else e for e in mine]
    where = {e: (q, j) for q, h in enumerate(held) for j, e in enumerate(h)}

    def owner_of(u: int) -> tuple[int, int]:
        return where[(big_m - 1 - u) if reverse else u]

    packer = _Packer(d.shape[1:], None if a is None else a.shape[1:], reset is not None, d.dtype,
                     d.device)
    zero = torch.zeros_like(d[0])

    def finish(states) -> torch.Tensor:
        return torch.stack([zero if s is None else s[1] for s in states])

    if world == 1 or algorithm == "allgather":
        return _allgather(elems, virt, held, topo, packer, finish, reverse)
    if algorithm == "ring":
        return PendingScan(_ring(elems, virt, owner_of, big_m, topo.ring, packer, finish))
    return PendingScan(_hillis_steele(elems, virt, owner_of, big_m, topo.ring, packer, finish))


def _allgather(elems, virt, held, topo, packer, finish, reverse) -> PendingScan:
    """Gather every rank's elements (left in flight) and fold them in order on wait()."""
    big_m, m = sum(len(h) for h in held), len(elems)
    # Ranks may hold different numbers of runs (odd a2a with zigzag): pad every message to
    # the largest count; the padding rows are never read.
    rows = max(len(h) for h in held)
    local = packer.pack(elems)
    if rows > m:
        local = torch.cat([local, local.new_zeros(rows - m, packer.width)])
    gathered, work = _gather(topo, local)

    def done():
        work.wait()
        by_u = {}
        for q in range(topo.size):
            got = packer.unpack(gathered[q])
            for j, e in enumerate(held[q]):
                by_u[(big_m - 1 - e) if reverse else e] = got[j]
        want = {u: j for j, u in enumerate(virt)}
        states, state = [None] * m, None
        for u in range(max(virt) + 1):
            if u in want:
                states[want[u]] = state
            state = _combine(state, by_u[u])
        return finish(states)

    return PendingScan(finish=done)


def _ring(elems, virt, owner_of, big_m, grp, packer, finish):
    """The carry walks u = 0, 1, ..., M-1; a rank waits for its predecessor's inclusive
    prefix, folds in its element and passes it on (local hand-offs need no message)."""
    me = grp.rank
    states, incl, sends = [None] * len(elems), {}, []
    for j in sorted(range(len(elems)), key=lambda j: virt[j]):
        u = virt[j]
        if u == 0:
            excl = None
        elif owner_of(u - 1)[0] == me:
            excl = incl[u - 1]
        else:
            buf = packer.empty(1)
            exchange(grp, [], [(buf, owner_of(u - 1)[0])]).wait()
            excl = packer.unpack(buf)[0]
        states[j] = excl
        incl[u] = _combine(excl, elems[j])
        if u + 1 < big_m and owner_of(u + 1)[0] != me:
            sends.append(exchange(grp, [(packer.pack([incl[u]]), owner_of(u + 1)[0])], []))
    for s in sends:
        s.wait()
    return finish(states)


def _hillis_steele(elems, virt, owner_of, big_m, grp, packer, finish):
    """Log-step scan. After the round with distance d, ``x_u`` covers elements
    (u-2d, u] and ``y_u`` covers (u-2d, u-1]; both absorb the x that arrives from u-d.
    ``y`` starts empty, so it ends as the exclusive prefix without any subtraction."""
    me = grp.rank
    x = {virt[j]: elems[j] for j in range(len(elems))}
    y = {u: None for u in x}
    order = sorted(x)
    d = 1
    while d < big_m:
        out_by_dst: dict[int, list] = {}
        local_in = {}
        for u in order:
            if u + d < big_m:
                dst = owner_of(u + d)[0]
                if dst == me:
                    local_in[u + d] = x[u]
                else:
                    out_by_dst.setdefault(dst, []).append(x[u])
        in_by_src: dict[int, list[int]] = {}
        for u in order:
            if u - d >= 0 and owner_of(u - d)[0] != me:
                in_by_src.setdefault(owner_of(u - d)[0], []).append(u)
        # One message per peer and round, rows in ascending u on both sides.
        sends = [(packer.pack(v), dst) for dst, v in sorted(out_by_dst.items())]
        recvs = [(packer.empty(len(us)), src) for src, us in sorted(in_by_src.items())]
        exchange(grp, sends, recvs).wait()
        for (buf, src) in recvs:
            for u, elem in zip(in_by_src[src], packer.unpack(buf)):
                local_in[u] = elem
        for u in order:
            if u - d >= 0:
                prev = local_in[u]
                y[u] = _combine(prev, y[u]) if y[u] is not None else prev
                x[u] = _combine(prev, x[u])
        d *= 2
    return finish([y[u] for u in virt])


# ---------------------------------------------------------------------- public, autograd


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
        if layout == "zigzag" and (values.dim() == 0 or values.shape[0] != m):
            raise ValueError(f"layout='zigzag' scans {m} element(s) on this rank: values needs a "
                             f"leading dim of {m}, got shape {tuple(values.shape)}")
        d, a, flags = _normalise(values, decay, reset, layout, m, layout == "zigzag")
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
    _check(layout, algorithm)
    grp = resolve(group)
    if isinstance(decay, torch.Tensor) and decay.requires_grad:
        return _ScanFn.apply(values, decay, reset, grp, layout, algorithm, reverse)
    return _ScanFn.apply(values, None if decay is None else torch.as_tensor(decay).detach(),
                         reset, grp, layout, algorithm, reverse)


def exclusive_sum(values: torch.Tensor, **kwargs) -> torch.Tensor:
    """``exclusive_scan`` with no decay and no resets."""
    return exclusive_scan(values, **kwargs)

