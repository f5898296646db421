"""Hierarchical CP meshes: ctxpar.cp_mesh, the token order of shard / unshard /
position_ids on a mesh, group resolution (1-D meshes, 3-D dp x ring x ulysses meshes),
data-parallel composition, and clear errors for bad meshes."""
import re

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import ctxpar
from ctxpar.apps.launch import RankError
from ctxpar.sequence.layouts import get_layout
from ctxpar.dist.mesh import cp_mesh

from _cases import TOL, compare_with_reference, make_qkv


def _mesh_facts(sizes):
    mesh = cp_mesh(hierarchical_context_parallel_sizes=sizes)
    return (mesh.mesh_dim_names, tuple(mesh.shape), mesh.mesh.tolist(),
            mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses"))


@pytest.mark.parametrize("sizes", [[2, 2], [4, 1], [1, 4]], ids=str)
def test_cp_mesh_axes_and_order(run_ranks, sizes):
    a2a, p2p = sizes
    for rank, (names, shape, ranks, r, u) in enumerate(run_ranks(4, _mesh_facts, sizes)):
        assert names == ("ring", "ulysses") and shape == (p2p, a2a)
        # ulysses innermost: a Ulysses group is consecutive ranks (one node).
        assert ranks == torch.arange(4).view(p2p, a2a).tolist()
        assert (r, u) == divmod(rank, a2a)


def _expected_positions(layout, sizes, r, u, seq_len):
    """From the documented rule: the layout over the ring axis, then a contiguous split."""
    a2a, p2p = sizes
    share = get_layout(layout).positions(r, p2p, seq_len).tolist()
    n = seq_len // (a2a * p2p)
    return share[u * n:(u + 1) * n]


def _mesh_layout(sizes, layout, seq_len):
    mesh = cp_mesh(hierarchical_context_parallel_sizes=sizes)
    full = torch.randn(2, seq_len, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    pos = ctxpar.position_ids(seq_len, group=mesh, layout=layout)
    local = ctxpar.shard(full, group=mesh, layout=layout)
    back = ctxpar.unshard(local, group=mesh, layout=layout)
    (back * torch.arange(float(seq_len)).view(1, seq_len, 1)).sum().backward()
    r, u = mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses")
    return (pos.tolist(), (r, u), torch.equal(local, full.detach()[:, pos]),
            torch.equal(back, full.detach()), full.grad)


@pytest.mark.parametrize("layout", ctxpar.LAYOUTS)
@pytest.mark.parametrize("sizes", [[2, 2], [4, 1], [1, 4]], ids=str)
def test_mesh_shard_unshard_positions(run_ranks, sizes, layout):
    seq_len = 32
    seen, grads = [], []
    for pos, (r, u), ok_local, ok_back, grad in run_ranks(4, _mesh_layout, sizes, layout, seq_len):
        assert pos == _expected_positions(layout, sizes, r, u, seq_len)
        assert ok_local and ok_back
        seen += pos
        grads.append(grad)
    assert sorted(seen) == list(range(seq_len))
    # Each rank's gradient reaches exactly its own tokens; together they form the full one.
    assert torch.equal(sum(grads), torch.arange(float(seq_len)).view(1, seq_len, 1).expand(2, seq_len, 3))


def test_one_by_n_mesh_is_the_1d_layout(run_ranks):
    for layout in ctxpar.LAYOUTS:
        for pos, (r, u), *_ in run_ranks(4, _mesh_layout, [1, 4], layout, 32):
            assert pos == get_layout(layout).positions(r, 4, 32).tolist()


# --------------------------------------------------------------- dp x cp composition


def _dp_cp(shape, methods):
    """A 3-D ("dp", "ring", "ulysses") mesh: each dp replica has its own data and its own
    CP group; every method is compared with the reference of its own replica's data."""
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "ring", "ulysses"))
    dp = mesh.get_local_rank("dp")
    bad = {}
    for method in methods:
        for layout in ctxpar.LAYOUTS:
            for causal in (False, True):
                for dtype in (torch.float64, torch.bfloat16):
                    q, k, v, dout = make_qkv(100 + dp, 2, 32, 8, 2, 16, dtype)
                    errs = compare_with_reference(q, k, v, dout, layout=layout, group=mesh,
                                                  causal=causal, method=method)
                    worse = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
                    if worse:
                        bad[(method, layout, causal, str(dtype))] = worse
    return dp, bad


@pytest.mark.parametrize("shape", [(2, 1, 2), (2, 2, 1)], ids=str)
def test_dp_times_cp_3d_mesh(run_ranks, shape):
    results = run_ranks(4, _dp_cp, shape, ["hybrid", "auto"])
    assert [dp for dp, _ in results] == [0, 0, 1, 1]
    for rank, (_, bad) in enumerate(results):
        assert not bad, f"rank {rank}: {bad}"


def _dp_cp_1d(methods):
    """A ("dp", "cp") mesh: 1-D methods take mesh["cp"]; cp_mesh(mesh=...) splits the cp
    axis into ("ring", "ulysses") for hybrid."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    dp = mesh.get_local_rank("dp")
    hier = cp_mesh(hierarchical_context_parallel_sizes=[2, 1], mesh=mesh)
    bad = {}
    for method in methods:
        group = hier if method == "hybrid" else mesh["cp"]
        for layout in ctxpar.LAYOUTS:
            for causal in (False, True):
                q, k, v, dout = make_qkv(200 + dp, 2, 32, 8, 2, 16, torch.float64)
                errs = compare_with_reference(q, k, v, dout, layout=layout, group=group,
                                              causal=causal, method=method)
                if not max(errs.values()) <= TOL[torch.float64]:
                    bad[(method, layout, causal)] = errs
    return hier.mesh_dim_names, hier.mesh.tolist(), bad


def test_dp_times_cp_1d_groups_and_split_mesh(run_ranks):
    results = run_ranks(4, _dp_cp_1d, ["ring", "ulysses", "allgather", "auto", "hybrid"])
    for rank, (names, ranks, bad) in enumerate(results):
        assert names == ("ring", "ulysses")
        assert ranks == ([[0, 1]] if rank < 2 else [[2, 3]])  # this replica's CP ranks
        assert not bad, f"rank {rank}: {bad}"


# ------------------------------------------------------------------------- bad meshes


def _bad_sizes(sizes):
    cp_mesh(hierarchical_context_parallel_sizes=sizes)


def _bad_axes(where):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    q = torch.zeros(1, 8, 4, 8)
    if where == "attention":
        ctxpar.attention(q, q, q, group=mesh, method="hybrid")
    elif where == "shard":
        ctxpar.shard(torch.zeros(1, 16, 2), group=mesh)
    else:
        cp_mesh(hierarchical_context_parallel_sizes=[2, 2], mesh=mesh)


@pytest.mark.parametrize("call, arg, pattern", [
    (_bad_sizes, [3, 1], r"\[3, 1\] multiply to 3, but the CP world has 4 ranks"),
    (_bad_sizes, [2, 4], r"\[2, 4\] multiply to 8, but the CP world has 4 ranks"),
    (_bad_sizes, [2], r"must be \[a2a, p2p\] \(two positive ints\)"),
    (_bad_sizes, [0, 4], r"must be \[a2a, p2p\] \(two positive ints\)"),
    (_bad_axes, "attention", r"must have axes 'ring' and 'ulysses'.*got axes \('dp', 'tp'\)"),
    (_bad_axes, "shard", r"must have axes 'ring' and 'ulysses'"),
    (_bad_axes, "cp_mesh", r"mesh= must have axes \('ring', 'ulysses'\)"),
])
def test_bad_mesh_raises_everywhere(run_ranks, call, arg, pattern):
    with pytest.raises(RankError) as info:
        run_ranks(4, call, arg, timeout=60)
    assert sorted(info.value.failures) == [0, 1, 2, 3]
    assert set(info.value.exc_types.values()) == {"ValueError"}
    for text in info.value.failures.values():
        assert re.search(pattern, text), text[-400:]


def _mesh_length_not_divisible():
    mesh = cp_mesh(hierarchical_context_parallel_sizes=[2, 2])
    ctxpar.shard(torch.zeros(1, 6, 2), group=mesh, layout="contiguous")


def test_mesh_length_not_divisible(run_ranks):
    with pytest.raises(RankError) as info:
        run_ranks(4, _mesh_length_not_divisible, timeout=60)
    assert set(info.value.exc_types.values()) == {"ValueError"}
    assert "ring shares of 3 tokens" in info.value.failures[0]


def _mesh_mismatch():
    mesh = cp_mesh(hierarchical_context_parallel_sizes=[2, 2])
    q = torch.zeros(1, 8, 4, 8)
    causal = torch.distributed.get_rank() != 3  # one rank disagrees
    ctxpar.attention(q, q, q, group=mesh, method="hybrid", causal=causal)


def test_mesh_argument_mismatch_raises_everywhere(run_ranks):
    # Rank 3 shares a group with ranks 1 and 2 only; rank 0 must still hear of it.
    with pytest.raises(RankError) as info:
        run_ranks(4, _mesh_mismatch, timeout=60)
    assert sorted(info.value.failures) == [0, 1, 2, 3]
    assert set(info.value.exc_types.values()) == {"ValueError"}
    assert "causal differs" in info.value.failures[1]
    assert "another rank of the mesh found a mismatch" in info.value.failures[0]


def _hybrid_packed(sizes, layout):
    """Packed documents on a mesh, sharded through the public API: the ring axis's packed
    order (documents padded so each ring share splits evenly), split contiguously within
    the Ulysses group."""
    from ctxpar.attn.reference import attention_reference
    from _cases import rel_err

    mesh = cp_mesh(hierarchical_context_parallel_sizes=sizes)
    cu = torch.tensor([0, 9, 10, 31, 44], dtype=torch.int32)
    q, k, v, dout = make_qkv(5, 1, 44, 8, 2, 16, torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ro, _ = attention_reference(*ref_in, causal=True, cu_seqlens=cu)
    (ro * dout).sum().backward()

    def shard(t):
        return ctxpar.shard_packed(t, cu, group=mesh, layout=layout).tokens

    def back(t):
        return ctxpar.unshard_packed(t, cu, group=mesh, layout=layout)

    loc = [shard(t).clone().requires_grad_() for t in (q, k, v)]
    out = ctxpar.attention(*loc, group=mesh, method="hybrid", layout=layout, causal=True,
                           cu_seqlens=cu)
    out.backward(shard(dout))
    pairs = [(out, ro)] + [(t.grad, r.grad) for t, r in zip(loc, ref_in)]
    return max(rel_err(back(x.detach()), r.detach()) for x, r in pairs)


@pytest.mark.parametrize("layout", ctxpar.LAYOUTS)
def test_hybrid_packed_documents(run_ranks, layout):
    errs = run_ranks(4, _hybrid_packed, [2, 2], layout)
    assert max(errs) <= TOL[torch.float64], errs
