"""Ulysses, all-gather and hybrid attention (and method="auto") vs the float64 reference:
every layout x {full, causal} (+ sliding windows) x dtype x heads (MHA, GQA, and GQA with
Hkv below the Ulysses degree), on worlds 2, 3, 4 and the meshes [2,2], [1,4], [4,1], [2,1],
[1,2]; then communication counts against theory, degenerate meshes, packed documents,
the auto rule and bad input."""
import itertools

import pytest
import torch

import ctxpar
from ctxpar.attn.dispatch import choose_method
from ctxpar.apps.launch import RankError
from ctxpar.dist.mesh import cp_mesh
from ctxpar.dist.topology import CPTopology
from ctxpar.dist.topology import CPGroup
from ctxpar.attn.reference import attention_reference

from _cases import TOL, compare_with_reference, make_qkv, rel_err

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# Heads per world: MHA, and GQA with Hkv < the Ulysses degree where the world allows it
# (Hq=8, Hkv=2 on 4 ranks: one K/V head per rank, each replicated twice).
HEADS = {2: [(4, 4), (8, 2)], 3: [(6, 6), (6, 2)], 4: [(8, 8), (8, 2)]}
WINDOWS = [(5, 0), (3, 2)]
S, B, D = 48, 2, 16


def _group(mesh_sizes):
    return None if mesh_sizes is None else cp_mesh(hierarchical_context_parallel_sizes=mesh_sizes)


def _accuracy_cases(method, heads, mesh_sizes=None):
    """Every case on this rank; returns {case: errors} for the cases out of tolerance."""
    group = _group(mesh_sizes)
    bad = {}
    cases = [(lay, c, dt, h, (-1, -1)) for lay, c, dt, h in
             itertools.product(ctxpar.LAYOUTS, (False, True), DTYPES, heads)]
    cases += [(lay, c, torch.float64, heads[-1], w) for lay, c, w in
              itertools.product(ctxpar.LAYOUTS, (False, True), WINDOWS)]
    for i, (layout, causal, dtype, (hq, hkv), window) in enumerate(cases):
        q, k, v, dout = make_qkv(i, B, S, hq, hkv, D, dtype)
        errs = compare_with_reference(q, k, v, dout, layout=layout, group=group, causal=causal,
                                      window=window, method=method)
        worse = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
        if worse:
            bad[(layout, causal, str(dtype), hq, hkv, window)] = worse
    return len(cases), bad


@pytest.mark.parametrize("method", ["ulysses", "allgather", "auto"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_method_matches_reference(run_ranks, world, method):
    for rank, (n, bad) in enumerate(run_ranks(world, _accuracy_cases, method, HEADS[world])):
        assert n > 0 and not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("sizes", [[2, 2], [1, 4], [4, 1], [2, 1], [1, 2]], ids=str)
def test_hybrid_matches_reference(run_ranks, sizes):
    world = sizes[0] * sizes[1]
    heads = [(8, 8), (8, 2)]  # on [4, 1]: Hkv=2 below the Ulysses degree 4
    for rank, (n, bad) in enumerate(run_ranks(world, _accuracy_cases, "hybrid", heads, sizes)):
        assert n > 0 and not bad, f"rank {rank}: {bad}"


# ----------------------------------------------------------------- degenerate meshes


def _degenerate(sizes):
    """[1, N] must be the ring and [N, 1] Ulysses (on contiguous pieces), bit for bit."""
    mesh = cp_mesh(hierarchical_context_parallel_sizes=sizes)
    flat_axis, flat_method = ("ring", "ring") if sizes[0] == 1 else ("ulysses", "ulysses")
    diffs = []
    for layout, causal, dtype in itertools.product(ctxpar.LAYOUTS, (False, True), DTYPES[1:]):
        q, k, v, dout = make_qkv(7, B, S, 8, 2, D, dtype)
        # The mesh order of [N, 1] is contiguous pieces whatever the layout.
        flat_layout = layout if sizes[0] == 1 else "contiguous"
        results = []
        for group, meth, lay in ((mesh, "hybrid", layout), (mesh[flat_axis], flat_method, flat_layout)):
            ql, kl, vl = [ctxpar.shard(t, group=group, layout=lay).requires_grad_() for t in (q, k, v)]
            out, lse = ctxpar.attention(ql, kl, vl, group=group, method=meth, layout=lay,
                                        causal=causal, return_lse=True)
            out.backward(ctxpar.shard(dout, group=group, layout=lay))
            results.append((out, lse, ql.grad, kl.grad, vl.grad))
        if not all(torch.equal(a, b) for a, b in zip(*results)):
            diffs.append((layout, causal, str(dtype)))
    return diffs


@pytest.mark.parametrize("sizes", [[1, 2], [2, 1], [1, 4], [4, 1]], ids=str)
def test_hybrid_degenerates_exactly(run_ranks, sizes):
    for rank, diffs in enumerate(run_ranks(sizes[0] * sizes[1], _degenerate, sizes)):
        assert not diffs, f"rank {rank}: not identical in {diffs}"


# ------------------------------------------------------------- communication counts


def _counts(method, hq, hkv, return_lse, mesh_sizes=None):
    group = _group(mesh_sizes)
    q, k, v, dout = make_qkv(0, B, S, hq, hkv, D, torch.float32)
    ql, kl, vl = [ctxpar.shard(t, group=group, layout="zigzag").requires_grad_() for t in (q, k, v)]
    with ctxpar.comm_counters() as fwd:
        res = ctxpar.attention(ql, kl, vl, group=group, method=method, causal=True,
                               return_lse=return_lse, check_args=False)
    out = res[0] if return_lse else res
    with ctxpar.comm_counters() as bwd:
        out.backward(ctxpar.shard(dout, group=group, layout="zigzag"))
    return (fwd.bytes_recv, fwd.bytes_sent, dict(fwd.ops), bwd.bytes_recv, bwd.bytes_sent, dict(bwd.ops))


def _ulysses_bytes(n, sl, hq, hkv, e=4, lse=False):
    """Bytes each rank receives for q, k, v and out: (n-1)/n of each local tensor, K/V
    with their heads replicated to lcm(Hkv, n)."""
    hkv_rep = hkv * ctxpar.attn.ulysses.kv_replication(hkv, n)
    fwd = (n - 1) * B * sl * D * e * (2 * hq + 2 * hkv_rep) // n
    return fwd + ((n - 1) * B * sl * (hq // n) * 4 if lse else 0), fwd


@pytest.mark.parametrize("world, hq, hkv", [(2, 4, 4), (4, 8, 2), (4, 8, 4)])
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
def test_ulysses_communication(run_ranks, world, hq, hkv, return_lse):
    fwd_bytes, bwd_bytes = _ulysses_bytes(world, S // world, hq, hkv, lse=return_lse)
    for res in run_ranks(world, _counts, "ulysses", hq, hkv, return_lse):
        frecv, fsent, fops, brecv, bsent, bops = res
        # 3 all-to-alls for q, k, v and 1 for the output (the LSE rides in it); the mirror.
        assert fops == {"all_to_all": 4} and bops == {"all_to_all": 4}
        assert frecv == fsent == fwd_bytes
        assert brecv == bsent == bwd_bytes


@pytest.mark.parametrize("world", [2, 3, 4])
def test_allgather_communication(run_ranks, world):
    hq, hkv = 4, 2
    kv_local = 2 * B * (S // world) * hkv * D  # K and V elements, Hkv heads (never Hq)
    for frecv, fsent, fops, brecv, bsent, bops in run_ranks(world, _counts, "allgather", hq, hkv, False):
        assert fops == {"all_gather": 1} and frecv == (world - 1) * kv_local * 4
        # K/V are gathered once: the backward only reduce-scatters dK/dV (fp32).
        assert bops == {"reduce_scatter": 1} and brecv == (world - 1) * kv_local * 4


@pytest.mark.parametrize("sizes, hq, hkv", [([2, 2], 8, 2), ([2, 2], 4, 4), ([4, 1], 8, 2),
                                            ([1, 4], 8, 2)], ids=str)
def test_hybrid_communication(run_ranks, sizes, hq, hkv):
    a2a, p2p = sizes
    world = a2a * p2p
    sl = S // world
    a2a_bytes = _ulysses_bytes(a2a, sl, hq, hkv)[1] if a2a > 1 else 0
    hkv_rep = hkv * ctxpar.attn.ulysses.kv_replication(hkv, a2a)
    kv_block = 2 * B * (S // p2p) * (hkv_rep // a2a) * D * 4  # head-sharded, ring-share long
    uly_ops = {"all_to_all": 4} if a2a > 1 else {}
    for frecv, fsent, fops, brecv, bsent, bops in run_ranks(world, _counts, "hybrid", hq, hkv, False, sizes):
        ring_f = {"send": p2p - 1, "recv": p2p - 1} if p2p > 1 else {}
        ring_b = {"send": 2 * p2p - 1, "recv": 2 * p2p - 1} if p2p > 1 else {}
        assert fops == {**uly_ops, **ring_f} and bops == {**uly_ops, **ring_b}
        assert frecv == a2a_bytes + (p2p - 1) * kv_block
        assert brecv == a2a_bytes + ((p2p - 1) * kv_block + p2p * kv_block if p2p > 1 else 0)


# ----------------------------------------------------------------- packed documents


def _packed(method, layout):
    world = torch.distributed.get_world_size()
    cu = torch.tensor([0, 9, 10, 31, 44], dtype=torch.int32)
    q, k, v, dout = make_qkv(3, 1, 44, 4 * world, 2, D, torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ro, _ = attention_reference(*ref_in, causal=True, cu_seqlens=cu)
    (ro * dout).sum().backward()
    loc = [ctxpar.shard_packed(t, cu, layout=layout).tokens.requires_grad_() for t in (q, k, v)]
    out = ctxpar.attention(*loc, method=method, layout=layout, causal=True, cu_seqlens=cu)
    out.backward(ctxpar.shard_packed(dout, cu, layout=layout).tokens)
    back = lambda t: ctxpar.unshard_packed(t, cu, layout=layout)  # noqa: E731
    pairs = [(out, ro)] + [(t.grad, r.grad) for t, r in zip(loc, ref_in)]
    return max(rel_err(back(x.detach()), r.detach()) for x, r in pairs)


@pytest.mark.parametrize("method", ["ulysses", "allgather"])
@pytest.mark.parametrize("world", [2, 3])
def test_packed_documents(run_ranks, world, method):
    for layout in ctxpar.LAYOUTS:
        errs = run_ranks(world, _packed, method, layout)
        assert max(errs) <= TOL[torch.float64], (layout, errs)


# --------------------------------------------------------------------- method="auto"


def _topo(n, mesh=False):
    one = CPGroup(None, 0, 1)
    if mesh:
        return CPTopology(one, one, ("ring", "ulysses"))
    return CPTopology(CPGroup(None, 0, n), one)


@pytest.mark.parametrize("n, hq, hkv, mesh, expected", [
    (4, 8, 8, True, "hybrid"),     # a mesh: hierarchical
    (1, 8, 8, False, "ring"),      # nothing to distribute
    (2, 8, 8, False, "ulysses"),   # MHA, heads split
    (8, 32, 8, False, "ulysses"),  # GQA, 32 + 8 <= 8 * 8: all-to-alls move fewer bytes
    (2, 8, 2, False, "allgather"),  # GQA, 8 + 2 > 2 * 2: small K/V, gather them
    (4, 8, 2, False, "allgather"),
    (4, 6, 6, False, "ring"),      # MHA whose heads do not split over 4 ranks
])
def test_auto_rule(n, hq, hkv, mesh, expected):
    assert choose_method(_topo(n, mesh), hq, hkv) == expected


# ------------------------------------------------------------------------- bad input


def _bad_heads(method, sizes=None):
    group = _group(sizes)
    q = torch.zeros(1, 8, 6, 8)
    kv = torch.zeros(1, 8, 2, 8)
    ctxpar.attention(q, kv, kv, group=group, method=method, layout="contiguous")


@pytest.mark.parametrize("method, world, sizes, pattern", [
    ("ulysses", 4, None, r"query heads \(Hq=6\) to be divisible by the Ulysses degree \(4\)"),
    ("hybrid", 4, [4, 1], r"query heads \(Hq=6\) to be divisible by the Ulysses degree \(4\)"),
    ("hybrid", 2, None, r"method='hybrid' needs a DeviceMesh with axes \('ring', 'ulysses'\)"),
    ("ring", 4, [2, 2], r"method='ring' takes a 1-D group"),
])
def test_bad_input_raises_everywhere(run_ranks, method, world, sizes, pattern):
    with pytest.raises(RankError) as info:
        run_ranks(world, _bad_heads, method, sizes, timeout=60)
    assert sorted(info.value.failures) == list(range(world))
    assert set(info.value.exc_types.values()) == {"ValueError"}
    import re
    for text in info.value.failures.values():
        assert re.search(pattern, text), text[-400:]
