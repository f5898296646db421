"""Sliding windows cut into sub-tiles (issue 18): the cut covers exactly the band, the
accumulator merges sub-tiles like a plain merge would, the counted work is O(S·(W + sub))
and every method stays exact (float64 reference) with sub-tiles far smaller than the
shards: windows smaller than, equal to and larger than a sub-tile, windows with a right
side, packed documents, every layout, worlds 1-4 and hybrid meshes."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxpar
from ctxpar.attn import kernels
from ctxpar.attn.merge import OutputAccumulator, merge_into
from ctxpar.attn.dispatch import choose_method
from ctxpar.attn.tiles import Band, Tile, split_band
from ctxpar.dist.topology import CPGroup, CPTopology
from ctxpar.sequence.spec import ShardSpec

from _cases import TOL, compare_with_reference, make_qkv
from test_packing import _packed_errors

SUB = 8  # sub-tile rows in the exactness tests: shards of 12-96 tokens hold many of them
S, B, D = 96, 1, 8
# (causal, window): smaller than, equal to and larger than SUB; with a right side (l, r).
WINDOWS = [(True, (3, 0)), (True, (SUB, 0)), (True, (21, 0)), (True, (40, 5)),
           (False, (5, 7)), (False, (SUB, SUB)), (False, (21, 11)), (False, (0, 17))]


def _with_sub(sub, fn, *args):
    """Run ``fn`` with CPU sub-tiles of ``sub`` rows (in this rank's process)."""
    saved = dict(kernels.SUB_TILE_ROWS)
    kernels.SUB_TILE_ROWS["cpu"] = sub
    try:
        return fn(*args)
    finally:
        kernels.SUB_TILE_ROWS.update(saved)


# ------------------------------------------------------------------ the cut itself


@settings(max_examples=300, deadline=None)
@given(lq=st.integers(1, 40), lk=st.integers(1, 40), lo=st.integers(-45, 45),
       width=st.integers(0, 50), open_side=st.sampled_from(["none", "lo", "hi"]),
       sub=st.integers(1, 17), q0=st.integers(0, 5), k0=st.integers(0, 5))
def test_split_band_covers_the_band_exactly(lq, lk, lo, width, open_side, sub, q0, k0):
    band = Band(None if open_side == "lo" else lo, None if open_side == "hi" else lo + width)
    tile = Tile(q0, q0 + lq, k0, k0 + lk, band)
    covered = torch.zeros(lq, lk, dtype=torch.int64)
    for t in split_band(tile, sub):
        assert q0 <= t.q0 < t.q1 <= q0 + lq and k0 <= t.k0 < t.k1 <= k0 + lk
        assert t.q1 - t.q0 <= sub
        vis = t.band.dense(t.q1 - t.q0, t.k1 - t.k0)
        assert vis.any(), "a sub-tile with nothing visible is skipped"
        covered[t.q0 - q0:t.q1 - q0, t.k0 - k0:t.k1 - k0] += vis.long()
    assert torch.equal(covered, band.dense(lq, lk).long())  # every visible pair exactly once
    if open_side == "none":
        elements = sum(t.score_elements for t in split_band(tile, sub))
        assert elements <= lq * (width + sub)


def test_split_band_uses_the_fast_kernel_inside_the_band():
    # A causal window wider than a sub-tile: per row block an upper triangle (masked), a
    # fully visible middle (no mask) and the causal diagonal (the kernels' causal flag).
    tiles = split_band(Tile(0, 64, 0, 64, Band(0, 24)), 8)
    blocks = [t for t in tiles if t.q0 == 40]
    assert [(t.k0, t.k1, t.band) for t in blocks] == [
        (16, 24, Band(None, 0)), (24, 40, Band()), (40, 48, Band(0, None))]


# ------------------------------------------------------------------ the accumulator


def test_accumulator_equals_plain_merges():
    """Copying into fresh rows and filling untouched ones gives what zero/-inf init and a
    merge of every tile give, bit for bit, in any order of overlapping tiles."""
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(2, 50, 3, 4, dtype=torch.float64)
    for trial in range(20):
        tiles = []
        for _ in range(int(torch.randint(1, 9, (1,), generator=g))):
            a, b = sorted(torch.randint(0, 51, (2,), generator=g).tolist())
            if a < b:
                tiles.append(Tile(a, b, 0, 1, Band()))
        acc = OutputAccumulator(q, 4)
        out = torch.zeros(2, 50, 3, 4, dtype=torch.float64)
        lse = torch.full((2, 3, 50), float("-inf"), dtype=torch.float64)
        for t in tiles:
            o = torch.randn(2, t.q1 - t.q0, 3, 4, generator=g, dtype=torch.float64)
            l = torch.randn(2, 3, t.q1 - t.q0, generator=g, dtype=torch.float64)
            l[:, :, ::3] = float("-inf")  # rows that saw no key
            o[:, ::3] = 0.0
            acc.add(t, o, l)
            merge_into(out[:, t.q0:t.q1], lse[:, :, t.q0:t.q1], o, l)
        got_out, got_lse = acc.result()
        assert torch.equal(got_out, out) and torch.equal(got_lse, lse), (trial, tiles)


# ------------------------------------------------------------------ the work


def _elements(s, w, layout, backward=False):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, s, 2, 16, requires_grad=backward) for _ in range(3))
    with ctxpar.comm_counters() as fwd:
        out = ctxpar.attention(q, k, v, layout=layout, causal=True, window=(w, 0))
    with ctxpar.comm_counters() as bwd:
        if backward:
            out.sum().backward()
    return sum(fwd.score_elements.values()), sum(bwd.score_elements.values())


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("s", [4096, 16384])
def test_window_work_is_linear_in_the_sequence(s, layout):
    """Issue 18's bound: one process, causal, window 256: at most S·(W + 1 + sub) pairs
    (it was ~S²/2: 201 M pairs at S = 16384, 48x what the window needs)."""
    w, sub = 256, kernels.sub_tile_rows(torch.device("cpu"))
    fwd, bwd = _elements(s, w, layout, backward=s == 4096)
    assert s * (w + 1) <= fwd <= s * (w + 1 + sub)
    assert bwd in (0, fwd)  # the backward evaluates the same tiles


def _cp_elements(s, w, layout):
    n, r = torch.distributed.get_world_size(), torch.distributed.get_rank()
    x = torch.randn(1, s // n, 2, 16)
    with ctxpar.comm_counters() as c:
        ctxpar.attention(x, x, x, layout=layout, causal=True, window=(w, 0), check_args=False)
    return r, sum(c.score_elements.values())


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_window_work_splits_evenly_under_cp(run_ranks, layout):
    s, w, sub = 4096, 256, kernels.sub_tile_rows(torch.device("cpu"))
    per_rank = dict(run_ranks(4, _cp_elements, s, w, layout))
    assert sum(per_rank.values()) <= s * (w + 1 + sub)
    assert max(per_rank.values()) <= s // 4 * (w + 1 + sub)


# ------------------------------------------------------------------ exactness


def _windowed_cases(method, sizes=None):
    group = None if sizes is None else ctxpar.cp_mesh(hierarchical_context_parallel_sizes=sizes)
    cases = [(lay, c, w, torch.float64) for lay, (c, w) in itertools.product(ctxpar.LAYOUTS, WINDOWS)]
    cases += [(lay, True, (21, 0), dt) for lay in ctxpar.LAYOUTS for dt in (torch.float32, torch.bfloat16)]
    bad = {}
    for i, (layout, causal, window, dtype) in enumerate(cases):
        q, k, v, dout = make_qkv(100 + i, B, S, 12, 4, D, dtype)
        errs = compare_with_reference(q, k, v, dout, layout=layout, group=group, causal=causal,
                                      window=window, method=method)
        worse = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
        if worse:
            bad[(layout, causal, window, str(dtype))] = worse
    return bad


@pytest.mark.parametrize("method", ["ring", "allgather", "ulysses"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sub_tiled_windows_match_reference(run_ranks, world, method):
    for rank, bad in enumerate(run_ranks(world, _with_sub, SUB, _windowed_cases, method)):
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("sizes", [[2, 2], [4, 1], [1, 2]], ids=str)
def test_sub_tiled_windows_on_hybrid_meshes(run_ranks, sizes):
    world = sizes[0] * sizes[1]
    for rank, bad in enumerate(run_ranks(world, _with_sub, SUB, _windowed_cases, "hybrid", sizes)):
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("method", ["ring", "allgather", "ulysses"])
@pytest.mark.parametrize("world", [2, 4])
def test_sub_tiled_windows_with_packed_documents(run_ranks, world, method):
    doc_lens = [37, 5, 60, 19]
    for layout, (causal, window) in itertools.product(ctxpar.LAYOUTS, WINDOWS[2:6]):
        for rank, errs in enumerate(run_ranks(world, _with_sub, SUB, _packed_errors, doc_lens,
                                              layout, causal, window, method)):
            bad = {k: e for k, e in errs.items() if not e <= 1e-10}
            assert not bad, f"rank {rank} {layout} causal={causal} window={window}: {bad}"


# ------------------------------------------------------------------ method="auto"


@pytest.mark.parametrize("n, layout, causal, window, gqa, mha", [
    (4, "contiguous", True, (64, 0), "ring", "ring"),    # the previous rank only: 2 steps
    (4, "contiguous", True, (64, 9), "ring", "ring"),    # the right side is hidden by causality
    (2, "contiguous", True, (64, 0), "allgather", "ulysses"),  # 2 steps of 2: a full ring
    (4, "contiguous", True, (200, 0), "allgather", "ulysses"),  # 3 steps: 7 blocks vs 6
    (5, "contiguous", True, (200, 0), "ring", "ring"),  # 3 steps of 5: 7 blocks vs 8; MHA: 8 heads
                                                        # do not split over 5 ranks
    (4, "contiguous", False, (64, 9), "allgather", "ulysses"),  # the next rank: a full ring
    (4, "zigzag", True, (64, 0), "allgather", "ulysses"),  # the second chunk: a full ring
    (4, "contiguous", True, (-1, -1), "allgather", "ulysses"),  # no window: the head rule
])
def test_auto_takes_a_short_ring_for_windows(n, layout, causal, window, gqa, mha):
    topo = CPTopology(CPGroup(None, 0, n), CPGroup(None, 0, 1))
    spec = ShardSpec(layout, n, 1, 128 * n)  # shards of 128 tokens
    assert choose_method(topo, 8, 2, spec=spec, causal=causal, window=window) == gqa
    assert choose_method(topo, 8, 8, spec=spec, causal=causal, window=window) == mha
    assert choose_method(topo, 8, 2) == "allgather"  # without the token order: heads only
