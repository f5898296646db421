"""The planner's work model against the library: bytes per rank (``comm_counters``),
score elements (counted kernel pairs) and a decoder layer's saved-for-backward bytes, on
the session's gloo rank pools at N = 2, 3, 4."""
from __future__ import annotations

import pytest
import torch

from ctxpar.apps.plan.specs import ModelSpec, RunSpec
from ctxpar.apps.plan.work import CPChoice, attention_work, comm_bytes, layer_saved_elements
from ctxpar.attn.kernels import sub_tile_rows

HQ, HKV, D = 12, 2, 8  # Hq splits over 2, 3, 4 (Ulysses); Hkv = 2 needs GQA replication at 3, 4
MODEL = ModelSpec("t", layers=1, hidden=HQ * D, heads=HQ, kv_heads=HKV, ffn=32, vocab=16)


def _group(method, a2a, p2p):
    if method != "hybrid":
        return None
    from ctxpar.dist.mesh import cp_mesh
    return cp_mesh(hierarchical_context_parallel_sizes=[a2a, p2p])


LAYOUTS = ("contiguous", "zigzag", "striped")
MASKS = {"causal": (96, 0, ()), "window": (1536, 300, ()), "packed": (96, 0, (37, 20, 39))}


def _masks(method):
    # hybrid shards packed documents by the ring axis: covered by ring, ulysses, allgather
    return [m for m in MASKS if not (m == "packed" and method == "hybrid")]


def _rank_counts(method, a2a, p2p):
    """Every layout x mask case of one method: one fwd+bwd of ctxpar.attention on this
    rank's shard each, with the counters of each half."""
    import ctxpar

    group = _group(method, a2a, p2p)
    rank = torch.distributed.get_rank()
    out = {}
    for layout in LAYOUTS:
        for mask in _masks(method):
            seq_len, window, docs = MASKS[mask]
            g = torch.Generator().manual_seed(0)
            full = [torch.randn(1, seq_len, h, D, generator=g, dtype=torch.float64) for h in (HQ, HKV, HKV, HQ)]
            cu = [0, *torch.tensor(docs).cumsum(0).tolist()] if docs else None
            if docs:
                q, k, v, dout = [ctxpar.shard_packed(t, cu, group=group, layout=layout).tokens for t in full]
            else:
                q, k, v, dout = [ctxpar.shard(t, group=group, layout=layout) for t in full]
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            with ctxpar.comm_counters() as cf:
                o = ctxpar.attention(q, k, v, group=group, method=method, layout=layout, causal=True,
                                     window=(window, 0) if window else (-1, -1), cu_seqlens=cu,
                                     check_args=False)
            with ctxpar.comm_counters() as cb:
                o.backward(dout)
            out[layout, mask] = (rank, cf.bytes_recv, cf.bytes_sent, cb.bytes_recv, cb.bytes_sent,
                                 sum(cf.score_elements.values()), sum(cb.score_elements.values()))
    return out


def _choices(n):
    out = [CPChoice("ring", 1, n, ""), CPChoice("allgather", 1, n, ""), CPChoice("ulysses", n, 1, "")]
    out += [CPChoice("hybrid", a, n // a, "") for a in range(1, n + 1) if n % a == 0]
    return out


CASES = [(n, c.method, c.a2a, c.p2p) for n in (2, 3, 4) for c in _choices(n)]


@pytest.mark.parametrize("n,method,a2a,p2p", CASES)
def test_bytes_and_score_elements_match_counters(run_ranks, n, method, a2a, p2p):
    """Every layout (contiguous, zigzag, striped) x causal, windowed (sub-tiles) and packed."""
    res = run_ranks(n, _rank_counts, method, a2a, p2p, timeout=120)
    sub = sub_tile_rows(torch.device("cpu"))
    for layout in LAYOUTS:
        for mask in _masks(method):
            seq_len, window, docs = MASKS[mask]
            run = RunSpec(seq_len, dtype="float64", window=window, docs=docs)
            choice = CPChoice(method, a2a, p2p, layout)
            pred = comm_bytes(MODEL, run, choice)
            work = attention_work(run, choice, sub)
            case = (layout, mask)
            for rank, f_recv, f_sent, b_recv, b_sent, s_fwd, s_bwd in (r[case] for r in res):
                assert f_recv == f_sent == sum(pred["fwd"].values()), (case, rank, f_recv, pred)
                assert b_recv == b_sent == sum(pred["bwd"].values()), (case, rank, b_recv, pred)
                expect = sum(w.score_elements for w in work[rank])
                assert s_fwd == s_bwd == expect, (case, rank, s_fwd, expect)
            # a test that a zero prediction could not pass: every case moves bytes
            assert sum(pred["fwd"].values()) > 0, case


def test_score_elements_one_process():
    """World of one: causal, windowed (sub-tiles) and packed pairs as counted."""
    import ctxpar

    for seq_len, window, docs in ((512, 0, ()), (2048, 300, ()), (500, 0, (100, 250, 150)),
                                  (2000, 128, (900, 1100))):
        q, k, v = (torch.randn(1, seq_len, h, D, requires_grad=True) for h in (HQ, HKV, HKV))
        cu = None if not docs else [0, *torch.tensor(docs).cumsum(0).tolist()]
        with ctxpar.comm_counters() as c:
            ctxpar.attention(q, k, v, causal=True, window=(window, 0) if window else (-1, -1),
                             cu_seqlens=cu).sum().backward()
        run = RunSpec(seq_len, dtype="float32", window=window, docs=docs)
        work = attention_work(run, CPChoice("ring", 1, 1, "zigzag"), sub_tile_rows(torch.device("cpu")))
        expect = sum(w.score_elements for w in work[0])
        assert c.score_elements["block_fwd"] == c.score_elements["block_bwd"] == expect
        if window:  # the window's sub-tiles, not the causal triangle
            assert expect < seq_len * (window + 1 + 256 + 1)


def _layer_saved(method, seq_len, hybrid):
    """Saved-for-backward bytes of the bench's DecoderLayer on this rank's shard, as
    ``ctxpar.apps.bench.cells.rank_layer_memory`` measures them, except that the input
    owns its storage (``ctxpar.shard`` may return a view of the whole sequence, whose
    storage the count would include: 3x the shard under hybrid [2, 2])."""
    import ctxpar
    from ctxpar.apps.bench.cells import DecoderLayer
    from ctxpar.observe.memory import saved_tensor_bytes

    group = _group(method, *(hybrid or (1, 1)))
    torch.manual_seed(0)
    layer = DecoderLayer(method=method, group=group)
    x = ctxpar.shard(torch.randn(1, seq_len, 256), group=group).clone().requires_grad_()
    pos = ctxpar.position_ids(seq_len, group=group)
    return saved_tensor_bytes(lambda: layer(x, pos), exclude=layer.parameters())


# The bench's DecoderLayer (ctxpar.apps.bench.cells): hidden 256, 8 heads, 2 K/V heads, MLP 1024.
LAYER = ModelSpec("bench-layer", 1, 256, 8, 2, 1024, 16)


@pytest.mark.parametrize("n,method,hybrid", [(1, "ring", None), (2, "ring", None), (2, "allgather", None),
                                             (2, "ulysses", None), (4, "ring", None),
                                             (4, "allgather", None), (4, "ulysses", None),
                                             (4, "hybrid", (2, 2))])
def test_layer_activation_bytes_within_10_percent(run_ranks, n, method, hybrid):
    seq_len = 1024
    if n == 1:
        measured = [_layer_saved(method, seq_len, hybrid)]
    else:
        measured = run_ranks(n, _layer_saved, method, seq_len, hybrid, timeout=60)
    a2a, p2p = hybrid or ((n, 1) if method == "ulysses" else (1, n))
    per = layer_saved_elements(LAYER, CPChoice(method, a2a, p2p, "zigzag"))
    predicted = seq_len // n * (per["act"] * 4 + per["fp32"] * 4)
    for m in measured:
        assert abs(predicted - m) <= 0.10 * m, (predicted, m)


def test_shared_finish_frees_cores_as_ranks_finish():
    # Processor sharing on 2 cores: 4 jobs of 1, 1, 2, 4 s alone. Phase 1: 4 active
    # (x2) until 1 s of work each: 2 s; phase 2: 2 active (x1) for 1 s more; phase 3: 1
    # active for 2 s more -> 5 s for the longest, not 4 s x 2 = 8 s.
    from ctxpar.apps.plan.cost import shared_finish

    factor = lambda active: max(1.0, active / 2)  # noqa: E731
    assert shared_finish([4.0, 1.0, 2.0, 1.0], factor) == 5.0
    assert shared_finish([3.0] * 4, factor) == 6.0  # balanced: everyone shares all along
    assert shared_finish([2.5], factor) == 2.5
