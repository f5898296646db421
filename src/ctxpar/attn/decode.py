"""Attention of new tokens against a KV cache sharded over the CP group
(:mod:`ctxpar.attn.kvcache`): decode over shards, and pass-KV / pass-Q prefill
(arXiv 2411.01783).

Every path computes *partials*: the ``(out, lse)`` of some queries against one rank's shard
(:func:`shard_partial`; masks from global slots, a rank with no visible key gives
``out = 0, lse = -inf``), merged exactly with the LSE rule (:mod:`ctxpar.attn.merge`).

- :func:`decode_attention`: the queries (a few decode tokens) are the same on every rank;
  each rank computes its partial and one all-gather per level of the topology of
  ``[out, lse]`` (``B * Sq * Hq * (D + 1)`` values) merges them: bytes per step do not
  depend on the context length.
- :func:`pass_kv`: every rank's shard (cached and new tokens) travels round the ring; each
  rank merges its new queries' partials against every shard.
- :func:`pass_q`: the new queries travel round the ring, each rank computes the partial of
  every visiting block against its own shard, and one all-to-all returns the partials to
  the queries' owners.
- :func:`choose_prefill`: the rule of ``method="auto"``.

Both prefills expect the new tokens already appended to the shards (``KVShard.append_prefill``).
On a hierarchical mesh (``ring`` x ``ulysses``) the CP ranks are treated as one flat group:
the prefills travel :func:`ring_tour` (a ring over every CP rank made of the mesh's own
ring and Ulysses hops), pass-Q's partials return by :func:`all_to_all_cp`, and decode
all-gathers over both axes; each rank's shard is its hybrid-layout tokens (``ShardSpec``
on the mesh). Shapes: ``q``/``out`` ``[B, Sq, Hq, D]``, ``lse`` ``[B, Hq, Sq]`` (fp32;
fp64 for fp64), ``q_slots`` ``[Sq]``.
"""
from __future__ import annotations

import torch

from ctxpar.attn.kernels import block_forward, sub_tile_rows
from ctxpar.attn.kvcache import KVShard, visibility
from ctxpar.attn.merge import OutputAccumulator, merge_into
from ctxpar.attn.options import AttnOptions
from ctxpar.attn.slotplan import plan_slots
from ctxpar.attn.tiles import FULL
from ctxpar.dist import collectives as comms
from ctxpar.dist.topology import CPGroup, CPTopology
from ctxpar.numerics import acc_dtype

__all__ = ["shard_partial", "merge_partials", "decode_attention", "pass_kv", "pass_q",
           "choose_prefill", "prefill_attention", "ring_tour", "all_to_all_cp",
           "PREFILL_METHODS"]

PREFILL_METHODS = ("pass-kv", "pass-q", "auto")
_MATH_DECODE_ROWS = 8  # up to this many query rows a CPU partial over a whole shard uses math
_NEG_INF = float("-inf")


def shard_partial(q: torch.Tensor, q_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  k_slots: torch.Tensor, k_valid: torch.Tensor, opts: AttnOptions):
    """``(out, lse)`` of ``q`` ``[B, Sq, Hq, D]`` against one shard's keys ``[B, Sk, Hkv, D]``
    (``out`` in the accumulation dtype); rows that see no key: ``out = 0``, ``lse = -inf``.

    When every query may see every key (a decode step without a window) one kernel call
    covers the shard. Otherwise tiles from the slots
    (:func:`ctxpar.attn.slotplan.plan_slots`): band masks where the slots are evenly spaced
    and every key of the tile is valid; a dense ``[B, m, n]`` slot mask only for a tile
    with padded keys or of mixed spacing."""
    if _sees_every_key(q_slots, k_slots, opts):
        return _whole_shard(q, k, v, k_valid, opts)
    acc = OutputAccumulator(q, v.shape[-1])
    cdt = acc.out.dtype
    tiles = plan_slots(q_slots, k_slots, causal=opts.causal, window=opts.window,
                       sub=sub_tile_rows(q.device))
    for tile, dense in tiles:
        rows, cols = slice(tile.q0, tile.q1), slice(tile.k0, tile.k1)
        valid = k_valid[:, cols]
        mask = None
        if dense or not bool(valid.all()):
            mask = visibility(q_slots[rows], k_slots[cols], valid, causal=opts.causal,
                              window=opts.window)
            if not bool(mask.any()):
                continue
        out, lse = block_forward(q[:, rows], k[:, cols], v[:, cols],
                                 band=FULL if dense else tile.band, scale=opts.scale,
                                 backend=opts.backend, mask=mask)
        acc.add(tile, out.to(cdt), lse.to(cdt))
    return acc.result()


def _sees_every_key(q_slots: torch.Tensor, k_slots: torch.Tensor, opts: AttnOptions) -> bool:
    """True when every query slot may see every key slot (validity aside): decode's
    common case, causal with no window and every cached key at or before the queries."""
    if not k_slots.numel() or not q_slots.numel():
        return False
    left, right = opts.window
    kmin, kmax = int(k_slots.min()), int(k_slots.max())
    qmin, qmax = int(q_slots.min()), int(q_slots.max())
    return ((not opts.causal or kmax <= qmin) and (left < 0 or qmax - kmin <= left)
            and (right < 0 or kmax - qmin <= right))


def _whole_shard(q, k, v, k_valid: torch.Tensor, opts: AttnOptions):
    """One kernel call over the whole shard (the valid keys as a per-row mask when some
    are padding) instead of a tile per slot run and the merges between them: a decode
    step's partial is then one call per layer, like one process's attention. A few query
    rows on CPU take the math path: it reads K and V once with the query heads grouped,
    where the fused CPU kernel first copies them to every query head (measured 2x faster
    at one query and 16k keys, 1.3x at 8k)."""
    b, sq = q.shape[:2]
    mask = None if bool(k_valid.all()) else k_valid[:, None, :].expand(b, sq, k.shape[1])
    backend = opts.backend
    if backend == "auto" and q.device.type == "cpu" and sq <= _MATH_DECODE_ROWS:
        backend = "math"
    out, lse = block_forward(q, k, v, band=FULL, scale=opts.scale, backend=backend, mask=mask)
    cdt = acc_dtype(q.dtype)
    return out.to(cdt), lse.to(cdt)


def _pack(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``[out, lse]`` in one buffer ``[B, Sq, Hq, D + 1]``."""
    return torch.cat([out, lse.transpose(1, 2).unsqueeze(-1)], -1)


def _unpack(packed: torch.Tensor):
    return packed[..., :-1], packed[..., -1].transpose(1, 2)


def merge_partials(parts: torch.Tensor):
    """Merge packed partials ``[P, B, Sq, Hq, D + 1]`` in index order (so every rank that
    merges the same parts gets the same bits); returns ``(out, lse)``."""
    out, lse = _unpack(parts[0])
    out, lse = out.clone(), lse.contiguous().clone()
    for part in parts[1:]:
        merge_into(out, lse, *_unpack(part))
    return out, lse


def decode_attention(q: torch.Tensor, q_slots: torch.Tensor, shard: KVShard, topo: CPTopology,
                     opts: AttnOptions):
    """Queries that every rank holds (decode tokens, already appended to the cache) against
    the whole sharded cache: one partial per rank, one all-gather of ``[out, lse]`` per
    level of the topology, the same merged ``(out, lse)`` on every rank."""
    packed = _pack(*shard_partial(q, q_slots, shard.k, shard.v, shard.slots, shard.valid, opts))
    for grp in topo.levels:  # Ulysses first, then ring: every rank's partial, merged
        packed = _pack(*merge_partials(comms.all_gather(grp, packed)))
    out, lse = _unpack(packed)
    return out.to(q.dtype), lse.contiguous()


def ring_tour(topo: CPTopology) -> list[tuple[CPGroup | None, int]]:
    """The ring over every CP rank that pass-KV and pass-Q travel, as ``N`` stops: stop
    k's ``(group of the hop that reaches it, CP rank the block then held came from)``
    (stop 0: ``(None, own CP rank)``).

    On a 1-D group every hop goes to the next ring rank. On a mesh (``R`` ring x ``U``
    Ulysses ranks) the CP ranks form one flat ring made of the mesh's own groups: ``U - 1``
    hops to the next Ulysses rank, then one to the next ring rank, and so on (hop k is a
    ring hop when ``k mod U == 0``). After k hops every rank holds the block of the rank
    ``(k // U, k - k // U)`` behind it (ring, Ulysses offsets, modulo the axis sizes), so
    the ``N`` stops visit every CP rank once and no process group is created."""
    n_ring, n_uly = topo.ring.size, topo.ulysses.size
    r, u = topo.ring.rank, topo.ulysses.rank
    stops: list[tuple[CPGroup | None, int]] = []
    for k in range(topo.size):
        di = k // n_uly
        grp = None if k == 0 else (topo.ring if k % n_uly == 0 else topo.ulysses)
        stops.append((grp, ((r - di) % n_ring) * n_uly + (u - (k - di)) % n_uly))
    return stops


def all_to_all_cp(topo: CPTopology, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """``parts[c]`` (one shape) goes to CP rank c; returns ``got[c]``, from CP rank c. On a
    mesh: an all-to-all over the ring group (each message the ``U`` parts for one ring
    rank), then one over the Ulysses group."""
    n_ring, n_uly = topo.ring.size, topo.ulysses.size
    # got[i][j]: from (ring i, my Ulysses rank) for (my ring rank, Ulysses j)
    got = comms.all_to_all(topo.ring, [torch.stack(parts[i * n_uly:(i + 1) * n_uly])
                                       for i in range(n_ring)])
    # back[j][i]: from (ring i, Ulysses j) for this rank
    back = comms.all_to_all(topo.ulysses, [torch.stack([got[i][j] for i in range(n_ring)])
                                           for j in range(n_uly)])
    return [back[j][i] for i in range(n_ring) for j in range(n_uly)]


def _rotate(grp: CPGroup, blocks: list[torch.Tensor], shapes: list[tuple]) -> tuple:
    """Post: send ``blocks`` to the next rank, receive buffers of ``shapes`` from the
    previous one. Returns ``(pending, buffers)``."""
    bufs = [torch.empty(s, dtype=t.dtype, device=t.device) for t, s in zip(blocks, shapes)]
    pend = comms.exchange(grp, [(t.contiguous(), grp.rank + 1) for t in blocks],
                          [(t, grp.rank - 1) for t in bufs])
    return pend, bufs


def pass_kv(q: torch.Tensor, q_slots: torch.Tensor, shard: KVShard, topo: CPTopology,
            opts: AttnOptions):
    """This rank's new queries against every rank's shard, the shards travelling round the
    CP ranks (:func:`ring_tour`; ``N - 1`` hops of ``k, v, slots, valid``; each transfer
    is posted before the current block's kernel). Returns ``(out, lse)`` for the local
    queries."""
    stops = ring_tour(topo)
    n = len(stops)
    cur = [shard.k, shard.v, shard.slots, shard.valid.to(torch.uint8)]
    out = lse = None
    for step in range(n):
        pend = None
        if step < n - 1:
            grp, origin = stops[step + 1]
            m = shard.counts[origin]
            shapes = [(t.shape[0], m, *t.shape[2:]) for t in cur[:2]] + [(m,), (cur[3].shape[0], m)]
            pend, nxt = _rotate(grp, cur, shapes)
        o, l = shard_partial(q, q_slots, cur[0], cur[1], cur[2], cur[3].bool(), opts)
        if out is None:
            out, lse = o, l.contiguous()
        else:
            merge_into(out, lse, o, l)
        if pend is not None:
            pend.wait()
            cur = nxt
    return out.to(q.dtype), lse


def pass_q(q: torch.Tensor, q_slots: torch.Tensor, shard: KVShard, topo: CPTopology,
           opts: AttnOptions):
    """This rank's new queries travel round the CP ranks (:func:`ring_tour`; ``N - 1`` hops
    of ``q, slots``), each rank computes the partial of every visiting block against its
    own shard, and an all-to-all of ``[out, lse]`` (:func:`all_to_all_cp`) brings the
    partials home, merged in CP rank order. Needs the same number of new queries on every
    rank."""
    stops = ring_tour(topo)
    n = len(stops)
    parts: list[torch.Tensor | None] = [None] * n
    cur = [q, q_slots]
    for step in range(n):
        pend = None
        if step < n - 1:
            pend, nxt = _rotate(stops[step + 1][0], cur, [tuple(t.shape) for t in cur])
        parts[stops[step][1]] = _pack(*shard_partial(cur[0], cur[1], shard.k, shard.v,
                                                     shard.slots, shard.valid, opts))
        if pend is not None:
            pend.wait()
            cur = nxt
    back = all_to_all_cp(topo, parts) if n > 1 else parts
    out, lse = merge_partials(torch.stack(back))
    return out.to(q.dtype), lse.contiguous()


def choose_prefill(new_tokens: int, cached_tokens: int, hq: int, hkv: int, head_dim: int,
                   q_bytes: int, acc_bytes: int) -> str:
    """The rule of ``method="auto"``: the method that moves fewer bytes per rank.

    For T new and P cached tokens on N ranks, pass-KV sends ``N - 1`` shards of
    ``(T + P)/N`` tokens' K and V (``2 * Hkv * D`` values each); pass-Q sends ``N - 1``
    query blocks of ``T/N`` tokens (``Hq * D``) and returns as many partials
    (``Hq * (D + 1)`` accumulation-dtype values). Counting only the ring messages this is
    the paper's heuristic (pass-Q when ``T / (T + P) < 2 * Hkv / Hq``); the returned
    partials make pass-Q win only for smaller new-token fractions, e.g. below about
    ``Hkv / Hq`` in one dtype. Ties go to pass-KV. The same on every rank."""
    kv = (new_tokens + cached_tokens) * 2 * hkv * head_dim * q_bytes
    pq = new_tokens * hq * (head_dim * q_bytes + (head_dim + 1) * acc_bytes)
    return "pass-q" if pq < kv else "pass-kv"


def prefill_attention(q: torch.Tensor, q_slots: torch.Tensor, shard: KVShard,
                      topo: CPTopology, opts: AttnOptions, method: str = "auto"):
    """New queries ``[B, m, Hq, D]`` (this rank's share, already appended to ``shard``)
    against the whole cache by ``method`` ("pass-kv", "pass-q" or "auto":
    :func:`choose_prefill`). Returns ``(out, lse)``."""
    if method not in PREFILL_METHODS:
        raise ValueError(f"unknown prefill method {method!r}; expected one of {PREFILL_METHODS}")
    if method == "auto":
        new = q.shape[1] * topo.size
        method = choose_prefill(new, shard.total - new, q.shape[2], shard.k.shape[2], q.shape[3],
                                q.element_size(), torch.empty(0, dtype=acc_dtype(q.dtype)).element_size())
    if topo.size == 1:
        method = "pass-kv"  # the one shard is local; no message either way
    return (pass_q if method == "pass-q" else pass_kv)(q, q_slots, shard, topo, opts)
