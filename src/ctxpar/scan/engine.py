"""The scan engine: which CP rank holds which elements (:func:`owners`) and the three
algorithms that compute this rank's exclusive prefixes (:func:`start_scan`), without
autograd; see :mod:`ctxpar.scan`."""
from __future__ import annotations

import functools

import torch

from ctxpar.dist.collectives import PendingExchange, all_gather, exchange
from ctxpar.dist.topology import CPTopology, resolve
from ctxpar.scan.elements import Packer, combine
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.spec import ShardSpec

__all__ = ["ALGORITHMS", "PendingScan", "check_scan_args", "owners", "owners_of_runs",
           "start_scan"]

ALGORITHMS = ("allgather", "hillis_steele", "ring")


def check_scan_args(layout: str, algorithm: str) -> None:
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
    check_scan_args(layout, "allgather")
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
    check_scan_args(layout, algorithm)
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

    packer = Packer(d.shape[1:], None if a is None else a.shape[1:], reset is not None, d.dtype,
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
            state = combine(state, by_u[u])
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
        incl[u] = combine(excl, elems[j])
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
                y[u] = combine(prev, y[u]) if y[u] is not None else prev
                x[u] = combine(prev, x[u])
        d *= 2
    return finish([y[u] for u in virt])


