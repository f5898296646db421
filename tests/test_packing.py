"""Packed documents, sliding windows and padding: exact vs the float64 reference, no
cross-document leakage, no NaN, window-limited communication."""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ctxpar
from ctxpar.sequence.packing import pad_for_cp, shard_packed, unshard_packed
from ctxpar.attn.reference import attention_reference

from _cases import rel_err

METHODS = [m for m in ctxpar.METHODS if m not in ("auto", "hybrid")]


def _packed_errors(doc_lens, layout, causal, window, method, dtype_name="float64", hcp=None):
    """On every rank: shard a packed batch, run attention, compare the real tokens with the
    reference (and check padding rows are zero and finite). Returns errors by name."""
    dtype = getattr(torch, dtype_name)
    cu = torch.tensor([0] + list(torch.tensor(doc_lens).cumsum(0).tolist()), dtype=torch.int32)
    s = int(cu[-1])
    g = torch.Generator().manual_seed(sum(doc_lens) * 7 + len(doc_lens))
    q, k, v, dout = [torch.randn(2, s, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ro, rl = attention_reference(*ref_in, causal=causal, window=window, cu_seqlens=cu)
    (ro * dout).sum().backward()
    group = None if hcp is None else ctxpar.cp_mesh(hierarchical_context_parallel_sizes=hcp)
    shards = [shard_packed(t, cu, layout=layout, group=group) for t in (q, k, v, dout)]
    local = [sh.tokens.to(dtype).requires_grad_() for sh in shards[:3]]
    out, lse = ctxpar.attention(*local, layout=layout, causal=causal, window=window, cu_seqlens=cu,
                                return_lse=True, method=method, group=group)
    out.backward(shards[3].tokens.to(dtype))
    pad = shards[0].pad_mask
    finite = all(torch.isfinite(t).all() for t in (out, local[0].grad, local[1].grad, local[2].grad))
    errs = {"finite": 0.0 if finite else float("inf"),
            "pad_out": out[:, pad].abs().max().item() if pad.any() else 0.0}
    gathered = {"out": out, "dq": local[0].grad, "dk": local[1].grad, "dv": local[2].grad}
    for (name, x), r in zip(gathered.items(), [ro, *[t.grad for t in ref_in]]):
        errs[name] = rel_err(unshard_packed(x.detach(), cu, layout=layout, group=group), r.detach())
    errs["lse"] = rel_err(unshard_packed(lse, cu, layout=layout, dim=2, group=group), rl)
    return errs


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc_lens=st.lists(st.integers(1, 20), min_size=1, max_size=5),
       layout=st.sampled_from(ctxpar.LAYOUTS), causal=st.booleans(),
       window=st.sampled_from([(-1, -1), (3, 0), (4, 2), (0, 0), (-1, 3)]),
       world=st.sampled_from([1, 2, 3, 4]), method=st.sampled_from(METHODS))
def test_packed_documents_match_reference(rank_pools, doc_lens, layout, causal, window, world, method):
    assume(method != "ulysses" or 4 % world == 0)  # Ulysses splits the 4 query heads
    for rank, errs in enumerate(rank_pools.get(world).run(_packed_errors, doc_lens, layout, causal,
                                                          window, method)):
        bad = {k: e for k, e in errs.items() if not e <= 1e-10}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("hcp", [[2, 2], [4, 1], [1, 4]], ids=str)
@pytest.mark.parametrize("layout", ctxpar.LAYOUTS)
def test_packed_documents_on_hybrid_meshes(run_ranks, layout, hcp):
    for causal, window in ((True, (-1, -1)), (False, (-1, -1)), (True, (4, 0))):
        for errs in run_ranks(4, _packed_errors, [1, 9, 14, 3], layout, causal, window, "hybrid",
                              "float64", hcp):
            bad = {k: e for k, e in errs.items() if not e <= 1e-10}
            assert not bad, (causal, window, bad)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("world", [2, 3])
def test_packed_documents_low_precision(run_ranks, world, dtype_name):
    tol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype_name]
    for errs in run_ranks(world, _packed_errors, [1, 13, 30, 4], "zigzag", True, (-1, -1), "ring",
                          dtype_name):
        assert all(e <= tol for e in errs.values()), errs


def _leakage(layout, world_docs):
    cu = torch.tensor(world_docs, dtype=torch.int32)
    s = int(cu[-1])
    g = torch.Generator().manual_seed(3)
    q, k, v = [torch.randn(1, s, 2, 8, generator=g) for _ in range(3)]
    outs = []
    for perturb in (False, True):
        qq, kk, vv = q.clone(), k.clone(), v.clone()
        if perturb:  # change every token of document 1 only
            a, b = int(cu[1]), int(cu[2])
            for t in (qq, kk, vv):
                t[:, a:b] += 5.0
        local = [shard_packed(t, cu, layout=layout).tokens for t in (qq, kk, vv)]
        out = ctxpar.attention(*local, layout=layout, causal=False, cu_seqlens=cu)
        outs.append(unshard_packed(out, cu, layout=layout))
    a, b = int(cu[1]), int(cu[2])
    untouched = torch.cat([torch.arange(0, a), torch.arange(b, s)])
    return (torch.equal(outs[0][:, untouched], outs[1][:, untouched]),
            not torch.equal(outs[0][:, a:b], outs[1][:, a:b]))


@pytest.mark.parametrize("layout", ctxpar.LAYOUTS)
def test_no_cross_document_leakage(run_ranks, layout):
    for same, changed in run_ranks(3, _leakage, layout, [0, 7, 20, 21, 33]):
        assert same and changed


def _padded_vs_unpadded(layout, causal, s):
    g = torch.Generator().manual_seed(s)
    q, k, v, dout = [torch.randn(1, s, 2, 8, generator=g, dtype=torch.float64) for _ in range(4)]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ro, _ = attention_reference(*ref_in, causal=causal)
    (ro * dout).sum().backward()
    padded = [pad_for_cp(t, layout=layout) for t in (q, k, v, dout)]
    info = padded[0][1]
    local = [ctxpar.shard(t, layout=layout).requires_grad_() for t, _ in padded[:3]]
    out = ctxpar.attention(*local, layout=layout, causal=causal, cu_seqlens=info.cu_seqlens)
    out.backward(ctxpar.shard(padded[3][0], layout=layout))
    full = [ctxpar.unshard(x, layout=layout)[:, :s] for x in (out, *[t.grad for t in local])]
    assert info.pad_mask.sum() == full[0].shape[1] * 0 + info.pad_mask.numel() - s
    return [rel_err(x, r.detach()) for x, r in zip(full, [ro, *[t.grad for t in ref_in]])]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ctxpar.LAYOUTS)
def test_padded_equals_unpadded_reference(run_ranks, layout, causal):
    for errs in run_ranks(3, _padded_vs_unpadded, layout, causal, 23):
        assert max(errs) <= 1e-10, errs


def _bad_length():
    x = torch.zeros(1, 5, 2, 8)  # 5 x 2 ranks = 10 tokens, zigzag needs a multiple of 4
    ctxpar.attention(x, x, x, layout="zigzag")


def test_non_divisible_length_names_the_fix(run_ranks):
    with pytest.raises(ctxpar.apps.launch.RankError) as info:
        run_ranks(2, _bad_length)
    text = info.value.failures[0]
    assert "ValueError" in text and "10 is not divisible by 4" in text and "pad_for_cp" in text


def _window_volume(window, causal):
    s, n = 64, torch.distributed.get_world_size()
    x = torch.randn(1, s // n, 2, 8, requires_grad=True)
    with ctxpar.comm_counters() as fwd:
        out = ctxpar.attention(x, x, x, layout="contiguous", causal=causal, window=window,
                               check_args=False)
    with ctxpar.comm_counters() as bwd:
        out.sum().backward()
    return fwd.ops["send"], fwd.bytes_recv, bwd.ops["send"], bwd.bytes_recv


@pytest.mark.parametrize("world", [3, 4])
def test_window_limits_ring_steps_and_bytes(run_ranks, world):
    s_local = 64 // world
    kv = 2 * s_local * 2 * 8 * 4  # one K/V block in bytes
    # A causal window shorter than a shard reaches only the previous rank: 2 steps.
    for sends, recv, bsends, brecv in run_ranks(world, _window_volume, (s_local - 1, 0), True):
        assert (sends, recv) == (1, kv)
        assert (bsends, brecv) == (1 + 2, kv + 2 * kv)  # K/V once, dK/dV partial sums twice
    # Without a window every block travels the whole ring.
    for sends, recv, bsends, brecv in run_ranks(world, _window_volume, (-1, -1), True):
        assert (sends, recv) == (world - 1, (world - 1) * kv)


def _fully_masked_rows(layout):
    # Document of length 1 and a window that excludes everything but self for some rows,
    # plus padding: every row must stay finite.
    cu = torch.tensor([0, 1, 2, 9], dtype=torch.int32)
    q = torch.randn(1, 9, 2, 8, dtype=torch.float64)
    sh = shard_packed(q, cu, layout=layout)
    x = sh.tokens.clone().requires_grad_()
    out = ctxpar.attention(x, x, x, layout=layout, causal=True, window=(0, 0), cu_seqlens=cu)
    out.sum().backward()
    return bool(torch.isfinite(out).all() and torch.isfinite(x.grad).all())


@pytest.mark.parametrize("layout", ctxpar.LAYOUTS)
def test_no_nan_for_fully_masked_rows(run_ranks, layout):
    assert all(run_ranks(4, _fully_masked_rows, layout))
