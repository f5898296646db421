"""Generation under CP at the attention level: a sharded KV cache filled by a CP prefill,
decode tokens kept round-robin and attended over the shards, and pass-KV / pass-Q
continuation prefills, all against the float64 reference on the whole sequence."""
import pytest
import torch

import ctxpar
from ctxpar.attn.decode import (choose_prefill, decode_attention, prefill_attention,
                                shard_partial)
from ctxpar.attn.kvcache import KVShard, decode_owner, prefill_slots
from ctxpar.attn.options import AttnOptions
from ctxpar.attn.reference import attention_reference
from ctxpar.dist.topology import resolve

TOL = {"float64": 1e-10, "float32": 2e-5}
B, HQ, HKV, D = 2, 4, 2, 8


def _qkv(total: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, total, h, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV)]


def _reference(q, k, v, pads: list[int], window):
    """Per batch row: the reference on the row's tokens after its left padding."""
    outs, lses = torch.zeros_like(q), torch.full((B, HQ, q.shape[1]), float("-inf"), dtype=q.dtype)
    for b, p in enumerate(pads):
        o, l = attention_reference(q[b:b + 1, p:], k[b:b + 1, p:], v[b:b + 1, p:], causal=True,
                                   window=window)
        outs[b, p:], lses[b, :, p:] = o[0], l[0]
    return outs, lses


def _err(out, lse, ref_out, ref_lse, rows) -> float:
    """Relative error of out and lse on the valid query rows ``rows`` ([B, S] bool)."""
    e_out = (out.double() - ref_out)[rows].abs().max() / ref_out[rows].abs().max()
    e_lse = (lse.double() - ref_lse).transpose(1, 2)[rows].abs().max()
    return float(max(e_out, e_lse))


def _prefill(shard, layout, topo, q, k, v, valid, offset, opts, method):
    """Append this rank's share of new tokens and attend; returns (out, lse, slots)."""
    m = q.shape[1]
    slots = prefill_slots(layout, topo, m, offset)
    take = lambda x: ctxpar.shard(x, group=topo, layout=layout)  # noqa: E731
    shard.append_prefill(take(k), take(v), slots, take(valid))
    out, lse = prefill_attention(take(q), slots, shard, topo, opts, method)
    return out, lse, slots


def _topo(mesh):
    """The CP group: the world (``mesh`` None) or ``cp_mesh(mesh)`` (``[a2a, p2p]``)."""
    if mesh is None:
        return resolve(None)
    from ctxpar.dist.mesh import cp_mesh

    return resolve(cp_mesh(mesh))


def _prefill_then_decode(layout: str, dt: str, window, pads, steps: int, method: str,
                         mesh=None):
    """On every rank: prefill a prompt of 4N tokens (left padding ``pads`` per row), decode
    ``steps`` tokens; returns the worst relative error against the reference."""
    topo = _topo(mesh)
    dtype = getattr(torch, dt)
    s = 4 * topo.size
    q, k, v = _qkv(s + steps)
    valid = torch.ones(B, s + steps, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    ref_out, ref_lse = _reference(q, k, v, pads, window)
    opts = AttnOptions(True, window, D ** -0.5, "auto")
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    shard = KVShard.empty(kd, vd, topo, layout)
    out, lse, slots = _prefill(shard, layout, topo, qd[:, :s], kd[:, :s], vd[:, :s], valid[:, :s],
                               0, opts, method)
    err = _err(out, lse, ref_out[:, slots], ref_lse[:, :, slots], valid[:, slots])
    for t in range(s, s + steps):
        slot = shard.append_decode(kd[:, t:t + 1], vd[:, t:t + 1], topo)
        assert slot == t
        out, lse = decode_attention(qd[:, t:t + 1], torch.tensor([t]), shard, topo, opts)
        err = max(err, _err(out, lse, ref_out[:, t:t + 1], ref_lse[:, :, t:t + 1],
                            valid[:, t:t + 1]))
    # Round-robin: the shards differ by at most one token.
    assert max(shard.counts) - min(shard.counts) <= 1 and shard.k.shape[1] == shard.counts[topo.rank]
    return err


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("dt", ["float64", "float32"])
def test_prefill_then_decode(run_ranks, world, layout, dt):
    # No window: a decode step's partial is one kernel call over the shard (with the padded
    # keys as a mask in the second case); a window: the tile plan.
    for window, pads in (((-1, -1), [0, 0]), ((-1, -1), [2, 0]), ((5, 0), [0, 3])):
        errs = run_ranks(world, _prefill_then_decode, layout, dt, window, pads, 2 * world + 1, "auto")
        assert max(errs) < TOL[dt], (window, pads, errs)


def _continuation(layout: str, method: str, cached: int, new: int, window, mesh=None):
    """Prefill ``cached`` tokens, then ``new`` more against the cache by ``method``."""
    topo = _topo(mesh)
    q, k, v = _qkv(cached + new, seed=3)
    valid = torch.ones(B, cached + new, dtype=torch.bool)
    ref_out, ref_lse = _reference(q, k, v, [0, 0], window)
    opts = AttnOptions(True, window, D ** -0.5, "auto")
    shard = KVShard.empty(k, v, topo, layout)
    _prefill(shard, layout, topo, q[:, :cached], k[:, :cached], v[:, :cached], valid[:, :cached],
             0, opts, "pass-kv")
    part = slice(cached, cached + new)
    out, lse, slots = _prefill(shard, layout, topo, q[:, part], k[:, part], v[:, part],
                               valid[:, part], cached, opts, method)
    return _err(out, lse, ref_out[:, slots], ref_lse[:, :, slots], valid[:, slots])


@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "contiguous"), (4, "zigzag")])
@pytest.mark.parametrize("method", ["pass-kv", "pass-q"])
def test_continuation_prefill(run_ranks, world, layout, method):
    mult = ctxpar.sequence.spec.cp_multiple(layout, world)
    for new, cached in ((mult, 64 * mult), (8 * mult, 64 * mult), (4 * mult, 4 * mult)):
        for window in ((-1, -1), (7, 0)):
            errs = run_ranks(world, _continuation, layout, method, cached, new, window)
            assert max(errs) < 1e-10, (new, cached, window, errs)


def _decode_then_continue(layout: str, method: str, decoded: int, mesh=None):
    """Prefill 4N tokens, decode ``decoded`` (kept round-robin: the shards now mix strides),
    then a continuation prefill of the layout's multiple against that cache."""
    topo = _topo(mesh)
    cached = 4 * topo.size
    new = ctxpar.sequence.spec.cp_multiple(layout, topo.ring.size, topo.ulysses.size)
    total = cached + decoded + new
    q, k, v = _qkv(total, seed=4)
    valid = torch.ones(B, total, dtype=torch.bool)
    ref_out, ref_lse = _reference(q, k, v, [0, 0], (-1, -1))
    opts = AttnOptions(True, (-1, -1), D ** -0.5, "auto")
    shard = KVShard.empty(k, v, topo, layout)
    _prefill(shard, layout, topo, q[:, :cached], k[:, :cached], v[:, :cached],
             valid[:, :cached], 0, opts, "pass-kv")
    for t in range(cached, cached + decoded):
        shard.append_decode(k[:, t:t + 1], v[:, t:t + 1], topo)
    part = slice(cached + decoded, total)
    out, lse, slots = _prefill(shard, layout, topo, q[:, part], k[:, part], v[:, part],
                               valid[:, part], cached + decoded, opts, method)
    return _err(out, lse, ref_out[:, slots], ref_lse[:, :, slots], valid[:, slots])


@pytest.mark.parametrize("world,layout", [(2, "striped"), (3, "zigzag")])
@pytest.mark.parametrize("method", ["pass-kv", "pass-q"])
def test_continuation_after_decode(run_ranks, world, layout, method):
    errs = run_ranks(world, _decode_then_continue, layout, method, 2 * world + 1)
    assert max(errs) < 1e-10, errs


@pytest.mark.parametrize("sizes,layout", [([2, 2], "zigzag"), ([2, 2], "contiguous"),
                                          ([3, 1], "zigzag")])
def test_mesh_prefill_decode_and_continuation(run_ranks, sizes, layout):
    """A hierarchical mesh ([a2a, p2p]): the shards are the hybrid layout's tokens, pass-KV
    and pass-Q travel the flat tour of both axes, decode merges over both axes; all exact
    against the float64 reference."""
    world = sizes[0] * sizes[1]
    for dt in ("float64", "float32"):
        errs = run_ranks(world, _prefill_then_decode, layout, dt, (5, 0), [0, 3], 2 * world + 1,
                         "pass-q", sizes)
        assert max(errs) < TOL[dt], (dt, errs)
    mult = ctxpar.sequence.spec.cp_multiple(layout, sizes[1], sizes[0])
    for method in ("pass-kv", "pass-q"):
        for new, cached in ((mult, 64 * mult), (4 * mult, 4 * mult)):
            errs = run_ranks(world, _continuation, layout, method, cached, new, (-1, -1), sizes)
            assert max(errs) < 1e-10, (method, new, cached, errs)
        errs = run_ranks(world, _decode_then_continue, layout, method, 2 * world + 1, sizes)
        assert max(errs) < 1e-10, (method, errs)


def test_ring_tour_visits_every_rank_once():
    """The flat tour of a mesh: every CP rank's block reaches every rank exactly once, each
    hop within one of the mesh's groups, and the block a rank receives is the one its
    sender held at the previous stop."""
    from ctxpar.attn.decode import ring_tour
    from ctxpar.dist.topology import CPGroup, CPTopology

    for n_ring, n_uly in ((1, 1), (3, 1), (1, 3), (2, 2), (3, 2), (2, 3)):
        topos = {(r, u): CPTopology(CPGroup(None, r, n_ring), CPGroup(None, u, n_uly),
                                    ("ring", "ulysses"))
                 for r in range(n_ring) for u in range(n_uly)}
        tours = {ru: ring_tour(t) for ru, t in topos.items()}
        for (r, u), tour in tours.items():
            assert sorted(o for _, o in tour) == list(range(n_ring * n_uly))
            assert tour[0] == (None, r * n_uly + u)
            for k in range(1, len(tour)):
                grp, origin = tour[k]
                ring_hop = grp is topos[(r, u)].ring
                sender = ((r - 1) % n_ring, u) if ring_hop else (r, (u - 1) % n_uly)
                assert tours[sender][k - 1][1] == origin, (n_ring, n_uly, r, u, k)


def test_prefill_tiles_need_no_dense_mask():
    """A prefill shard's slots are a layout's segments: every tile is a band; only tiles
    pairing runs of different spacing (decode tokens vs a prompt run) take a slot mask."""
    from ctxpar.attn.slotplan import plan_slots, slot_segments

    for layout in ("zigzag", "contiguous", "striped"):
        spec = ctxpar.sequence.spec.ShardSpec(ctxpar.sequence.layouts.get_layout(layout), 4, 1, 64)
        for r in range(4):
            q = spec.positions(r)
            assert len(slot_segments(q)) <= 2
            for kr in range(4):
                plan = plan_slots(q, spec.positions(kr), causal=True, window=(-1, -1))
                assert not any(dense for _, dense in plan), (layout, r, kr)
    keys = torch.cat([torch.arange(16), torch.arange(16, 40, 4)])  # prompt, then decode tokens
    plan = plan_slots(torch.arange(40, 48), keys, causal=True, window=(-1, -1))
    assert [dense for _, dense in plan] == [False, True]


def test_auto_rule():
    # Tiny-model heads (Hq 4, Hkv 2, D 8), fp32: pass-Q at low new-token fractions.
    pick = lambda new, cached: choose_prefill(new, cached, 4, 2, 8, 4, 4)  # noqa: E731
    assert pick(4, 256) == "pass-q" and pick(32, 256) == "pass-q"
    assert pick(64, 64) == "pass-kv" and pick(64, 0) == "pass-kv"


def _decode_bytes(cached: int, mesh=None):
    topo = _topo(mesh)
    q, k, v = _qkv(cached + 1)
    opts = AttnOptions(True, (-1, -1), D ** -0.5, "auto")
    shard = KVShard.empty(k, v, topo, "zigzag")
    slots = prefill_slots("zigzag", topo, cached, 0)
    take = lambda x: ctxpar.shard(x, group=topo, layout="zigzag")  # noqa: E731
    shard.append_prefill(take(k[:, :cached]), take(v[:, :cached]), slots,
                         torch.ones(B, slots.numel(), dtype=torch.bool))
    with ctxpar.comm_counters() as c:
        shard.append_decode(k[:, cached:], v[:, cached:], topo)
        decode_attention(q[:, cached:], torch.tensor([cached]), shard, topo, opts)
    return c.bytes_sent, c.bytes_recv, shard.nbytes


def test_decode_bytes_do_not_grow_with_context(run_ranks):
    small = run_ranks(2, _decode_bytes, 64)
    large = run_ranks(2, _decode_bytes, 1024)
    assert [s[:2] for s in small] == [s[:2] for s in large]
    # One all-gather of [out, lse] in fp64: B * Sq * Hq * (D + 1) values from the peer.
    assert small[0][1] == B * 1 * HQ * (D + 1) * 8
    # KV bytes per rank: half of the whole cache, within one token.
    whole = 2 * B * 1025 * HKV * D * 8
    assert all(abs(s[2] - whole / 2) <= 2 * B * HKV * D * 8 for s in large)


def test_mesh_decode_bytes_do_not_grow_with_context(run_ranks):
    """On a [2, 2] mesh: one all-gather per axis (one peer each), the same at 64 and 1024
    cached tokens; KV bytes per rank a quarter of the whole cache, within one token."""
    small = run_ranks(4, _decode_bytes, 64, [2, 2])
    large = run_ranks(4, _decode_bytes, 1024, [2, 2])
    assert [s[:2] for s in small] == [s[:2] for s in large]
    assert all(s[1] == 2 * B * 1 * HQ * (D + 1) * 8 for s in small)
    whole = 2 * B * 1025 * HKV * D * 8
    assert all(abs(s[2] - whole / 4) <= 2 * B * HKV * D * 8 for s in large)


def test_single_rank_and_empty_partials():
    topo = resolve(None)
    assert decode_owner(5, topo) == 0
    q, k, v = _qkv(4)
    opts = AttnOptions(True, (-1, -1), D ** -0.5, "auto")
    # A query that sees no valid key: out 0, lse -inf, no NaN.
    out, lse = shard_partial(q[:, :1], torch.tensor([0]), k[:, 1:], v[:, 1:], torch.tensor([1, 2, 3]),
                             torch.ones(B, 3, dtype=torch.bool), opts)
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())
    shard = KVShard.empty(k, v, topo, "zigzag")
    with pytest.raises(ValueError, match="layout='zigzag'.*layout='contiguous'"):
        shard.check_belongs(topo, "contiguous")


def test_windowed_prefill_tiles_are_sub_tiled():
    """A windowed prefill through the cache is cut like training's band tiles: the pairs the
    kernels see grow with S·(W + sub), not S² (issue 18's bound, on the prefill path)."""
    from ctxpar.attn.slotplan import plan_slots

    s, w, sub = 2048, 64, 128
    slots = torch.arange(s)
    tiles = plan_slots(slots, slots, causal=True, window=(w, 0), sub=sub)
    pairs = sum((t.q1 - t.q0) * (t.k1 - t.k0) for t, _ in tiles)
    assert s * (w + 1) <= pairs <= s * (w + 1 + sub)
    whole = plan_slots(slots, slots, causal=True, window=(w, 0))
    assert sum((t.q1 - t.q0) * (t.k1 - t.k0) for t, _ in whole) == s * s
