"""Ring attention vs the float64 reference: every layout x causal x world x dtype x heads x
head_dim, comparing out, lse, dq, dk and dv on every rank."""
import itertools

import pytest
import torch

import ctxpar

from _cases import TOL, compare_with_reference, make_qkv

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
HEADS = [(4, 4), (8, 2)]  # MHA, GQA
HEAD_DIMS = [64, 40]


def _ring_cases(layout, causal, method="ring"):
    worst = {}
    for (dtype, (hq, hkv), d) in itertools.product(DTYPES, HEADS, HEAD_DIMS):
        q, k, v, dout = make_qkv(hash((hq, d)) % 1000, 2, 48, hq, hkv, d, dtype)
        errs = compare_with_reference(q, k, v, dout, layout=layout, causal=causal, method=method)
        worst[(str(dtype), hq, hkv, d)] = errs
    return worst


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ctxpar.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_matches_reference(run_ranks, world, layout, causal):
    per_rank = run_ranks(world, _ring_cases, layout, causal)
    for rank, cases in enumerate(per_rank):
        for (dtype, hq, hkv, d), errs in cases.items():
            tol = TOL[getattr(torch, dtype.split(".")[1])]
            bad = {name: e for name, e in errs.items() if not e <= tol}
            assert not bad, f"rank {rank} {dtype} Hq={hq} Hkv={hkv} D={d}: {bad} > {tol}"


def _counts(layout, causal, b, s, hkv, d):
    q, k, v, dout = make_qkv(0, b, s, 4, hkv, d, torch.float32)
    ql, kl, vl = [ctxpar.shard(t, layout=layout).requires_grad_() for t in (q, k, v)]
    with ctxpar.comm_counters() as fwd:
        out = ctxpar.attention(ql, kl, vl, layout=layout, causal=causal, check_args=False)
    with ctxpar.comm_counters() as bwd:
        out.backward(ctxpar.shard(dout, layout=layout))
    return (fwd.bytes_recv, fwd.bytes_sent, dict(fwd.ops), dict(fwd.compute_ops),
            sum(fwd.score_elements.values()), bwd.bytes_recv, dict(bwd.ops), dict(bwd.compute_ops))


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("layout", ctxpar.LAYOUTS)
def test_ring_communication_and_block_counts(run_ranks, world, layout):
    b, s, hkv, d = 2, 48, 2, 8
    s_local = s // world
    kv_block = 2 * b * s_local * hkv * d * 4  # K and V, fp32, Hkv heads (never Hq)
    results = run_ranks(world, _counts, layout, True, b, s, hkv, d)
    fwd_blocks = 0
    elements = []
    for rank, (recv, sent, ops, cops, elems, brecv, bops, bcops) in enumerate(results):
        assert recv == sent == (world - 1) * kv_block
        assert ops == {"send": world - 1, "recv": world - 1}
        # Backward: K/V rotate again (N-1 hops) and the fp32 dK/dV partial sums make N hops.
        assert brecv == (world - 1) * kv_block + world * kv_block
        assert bops == {"send": 2 * world - 1, "recv": 2 * world - 1}
        assert bcops.get("block_bwd", 0) == cops.get("block_fwd", 0)
        fwd_blocks += cops.get("block_fwd", 0)
        elements.append(elems)
    if layout == "contiguous":
        # Rank r computes its diagonal and the r earlier blocks: N(N+1)/2 in total.
        assert fwd_blocks == world * (world + 1) // 2
        assert elements == [(r + 1) * s_local ** 2 for r in range(world)]
    else:
        # Balanced layouts: one call per step on every rank, equal work everywhere.
        assert fwd_blocks == world * world
        assert len(set(elements)) == 1
