"""Cross-rank exclusive scans: the three algorithms against a float64 reference loop
(values, output, gradients of values and decay), for sum, affine and segmented variants,
contiguous and zigzag element orders, forward and reverse, worlds 1 to 4, and on
hierarchical (ring x ulysses) meshes."""
import math

import pytest
import torch

import ctxpar
from ctxpar.dist.mesh import cp_mesh
from ctxpar.scan import ALGORITHMS, exclusive_scan, owners

WORLDS = [1, 2, 3, 4]
VARIANTS = ["sum", "affine", "segmented", "affine+segmented"]
SHAPE = (3, 2)


def _elements(world, layout, seed=0):
    """The global sequence of elements, written out from the definitions (M of them)."""
    m = 2 if layout == "zigzag" else 1
    big_m = m * world
    g = torch.Generator().manual_seed(seed + big_m)
    d = torch.randn(big_m, *SHAPE, generator=g, dtype=torch.float64)
    decay = 0.5 + 0.5 * torch.rand(big_m, 1, SHAPE[1], generator=g, dtype=torch.float64)
    flags = torch.rand(big_m, generator=g) < 0.4
    grad = torch.randn(big_m, *SHAPE, generator=g, dtype=torch.float64)
    return d, decay, flags, grad


def _mine(layout, rank, world):
    # From the layout's definition: rank r holds block r, and block 2N-1-r for zigzag.
    return [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def _reference(d, decay, flags, variant, reverse):
    """Direct recurrence S <- a_q * S + D_q over the elements in scan order."""
    big_m = d.shape[0]
    order = range(big_m - 1, -1, -1) if reverse else range(big_m)
    state = torch.zeros_like(d[0])
    out = [None] * big_m
    for q in order:
        out[q] = state
        a = torch.ones_like(decay[q])
        if "affine" in variant:
            a = decay[q]
        if "segmented" in variant and bool(flags[q]):
            a = torch.zeros_like(a)
        state = a * state + d[q]
    return torch.stack(out)


def _run_all(layout, dtype_name):
    grp = torch.distributed
    rank, world = grp.get_rank(), grp.get_world_size()
    dtype = getattr(torch, dtype_name)
    d, decay, flags, grad = _elements(world, layout)
    idx = _mine(layout, rank, world)
    squeeze = (lambda t: t[0]) if layout == "contiguous" else (lambda t: t)
    results = {}
    for algorithm in ALGORITHMS:
        for variant in VARIANTS:
            for reverse in (False, True):
                vals = squeeze(d[idx]).to(dtype).requires_grad_(True)
                dec = squeeze(decay[idx]).to(dtype).requires_grad_(True) if "affine" in variant else None
                reset = squeeze(flags[idx]) if "segmented" in variant else None
                with ctxpar.comm_counters() as c:
                    out = exclusive_scan(vals, decay=dec, reset=reset, layout=layout,
                                         algorithm=algorithm, reverse=reverse)
                (out.double() * squeeze(grad[idx])).sum().backward()
                results[algorithm, variant, reverse] = (
                    out.detach(), vals.grad, None if dec is None else dec.grad,
                    dict(c.ops), c.bytes_recv)
    return results


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", WORLDS)
def test_scans_match_reference(run_ranks, world, layout):
    per_rank = run_ranks(world, _run_all, layout, "float64")
    d, decay, flags, grad = _elements(world, layout)
    for variant in VARIANTS:
        for reverse in (False, True):
            dl = d.clone().requires_grad_(True)
            decl = decay.clone().requires_grad_(True)
            ref = _reference(dl, decl, flags, variant, reverse)
            if ref.requires_grad:  # a lone element's prefix is a constant zero
                (ref * grad).sum().backward()
            else:
                dl.grad = torch.zeros_like(dl)
            if decl.grad is None:  # the decay never touched a nonzero state
                decl.grad = torch.zeros_like(decl)
            for algorithm in ALGORITHMS:
                for rank, res in enumerate(per_rank):
                    out, gv, gd, _, _ = res[algorithm, variant, reverse]
                    idx = _mine(layout, rank, world)
                    shape = out.shape
                    assert out.dtype == torch.float64
                    torch.testing.assert_close(out, ref[idx].detach().reshape(shape), rtol=1e-12, atol=1e-12)
                    torch.testing.assert_close(gv, dl.grad[idx].reshape(shape), rtol=1e-12, atol=1e-12)
                    if "affine" in variant:
                        torch.testing.assert_close(gd, decl.grad[idx].reshape(gd.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("world", [3, 4])
def test_algorithms_agree_in_fp32_and_bf16(run_ranks, world):
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-2)):
        per_rank = run_ranks(world, _run_all, "zigzag", dtype)
        for res in per_rank:
            for variant in VARIANTS:
                base = res["allgather", variant, False][0]
                assert base.dtype == getattr(torch, dtype)
                for algorithm in ALGORITHMS[1:]:
                    other = res[algorithm, variant, False][0]
                    torch.testing.assert_close(other.double(), base.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_round_counts(run_ranks, layout):
    world = 4
    per_rank = run_ranks(world, _run_all, layout, "float64")
    m = 2 if layout == "zigzag" else 1
    elem_bytes = math.prod(SHAPE) * 8
    for rank, res in enumerate(per_rank):
        ops, nbytes = res["allgather", "sum", False][3:]
        assert ops == {"all_gather": 1}
        assert nbytes == (world - 1) * m * elem_bytes
    hs_recvs = [res["hillis_steele", "sum", False][3].get("recv", 0) for res in per_rank]
    # ceil(log2 M) rounds; a zigzag rank may hear from two peers in one round.
    rounds = math.ceil(math.log2(m * world))
    assert max(hs_recvs) <= m * rounds
    if layout == "contiguous":
        assert max(hs_recvs) == rounds  # the last rank receives in every round
    ring_recvs = sum(res["ring", "sum", False][3].get("recv", 0) for res in per_rank)
    assert ring_recvs == m * (world - 1)  # contiguous: N-1 hops; zigzag: up and back down


def test_world_of_one_and_errors():
    x = torch.randn(4, dtype=torch.float64)
    assert torch.equal(exclusive_scan(x), torch.zeros(4, dtype=torch.float64))
    z = torch.randn(2, 4, dtype=torch.float64)
    assert torch.equal(exclusive_scan(z, layout="zigzag")[1], z[0])
    assert torch.equal(exclusive_scan(z, layout="zigzag", reset=[False, True])[1], z[0])
    assert torch.equal(exclusive_scan(z, layout="zigzag", reverse=True)[0], z[1])
    with pytest.raises(ValueError, match="striped"):
        exclusive_scan(x, layout="striped")
    with pytest.raises(ValueError, match="unknown scan algorithm 'tree'"):
        exclusive_scan(x, algorithm="tree")
    with pytest.raises(ValueError, match="leading dim of 2, got shape \\(4,\\)"):
        exclusive_scan(x, layout="zigzag")
    with pytest.raises(ValueError, match="2 flag\\(s\\).*got 3"):
        exclusive_scan(z, layout="zigzag", reset=[True, False, True])


# ------------------------------------------------------------------- hierarchical meshes
# An element is a contiguous run of a rank's shard, numbered in sequence order. For zigzag
# on a mesh, CP rank (r, u) holds the u-th of a2a equal pieces of ring rank r's shard
# (chunks r and 2*p2p-1-r); with an odd a2a the middle piece spans both chunks. Written out
# by hand for [a2a, p2p] = [3, 2]: chunks 0..3 are cut into thirds-of-two-thirds runs.
def test_mesh_owners_written_out():
    assert owners("zigzag", 2, 3) == ((0,), (1, 6), (7,), (2,), (3, 4), (5,))
    assert owners("zigzag", 2, 2) == ((0,), (3,), (1,), (2,))
    assert owners("zigzag", 3, 1) == ((0, 5), (1, 4), (2, 3))
    assert owners("contiguous", 2, 3) == tuple((q,) for q in range(6))


def _run_mesh(sizes, layout):
    mesh = cp_mesh(hierarchical_context_parallel_sizes=sizes)
    a2a, p2p = sizes
    cp_rank = mesh.get_local_rank("ring") * a2a + mesh.get_local_rank("ulysses")
    held = owners(layout, p2p, a2a)
    d, decay, flags, grad = _elements_mesh(held)
    idx = list(held[cp_rank])
    squeeze = (lambda t: t[0]) if layout == "contiguous" else (lambda t: t)
    results = {}
    for variant in VARIANTS:
        for reverse in (False, True):
            vals = squeeze(d[idx]).clone().requires_grad_(True)
            dec = squeeze(decay[idx]).clone().requires_grad_(True) if "affine" in variant else None
            reset = squeeze(flags[idx]) if "segmented" in variant else None
            out = exclusive_scan(vals, decay=dec, reset=reset, layout=layout, group=mesh, reverse=reverse)
            (out * squeeze(grad[idx])).sum().backward()
            results[variant, reverse] = (idx, out.detach(), vals.grad, None if dec is None else dec.grad)
    if a2a > 1:
        with pytest.raises(ValueError, match="use algorithm='allgather'"):
            exclusive_scan(squeeze(d[idx]), layout=layout, group=mesh, algorithm="ring")
    else:  # a mesh with a trivial Ulysses axis is a 1-D ring: every algorithm runs
        for algorithm in ALGORITHMS[1:]:
            out = exclusive_scan(squeeze(d[idx]), layout=layout, group=mesh, algorithm=algorithm)
            torch.testing.assert_close(out, results["sum", False][1], rtol=1e-12, atol=1e-12)
    return results


def _elements_mesh(held):
    big_m = sum(len(h) for h in held)
    g = torch.Generator().manual_seed(7 + big_m)
    d = torch.randn(big_m, *SHAPE, generator=g, dtype=torch.float64)
    decay = 0.5 + 0.5 * torch.rand(big_m, 1, SHAPE[1], generator=g, dtype=torch.float64)
    flags = torch.rand(big_m, generator=g) < 0.4
    grad = torch.randn(big_m, *SHAPE, generator=g, dtype=torch.float64)
    return d, decay, flags, grad


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("sizes", [[2, 2], [3, 1], [1, 2], [2, 1]], ids=str)
def test_scans_on_hierarchical_meshes(run_ranks, sizes, layout):
    a2a, p2p = sizes
    per_rank = run_ranks(a2a * p2p, _run_mesh, sizes, layout)
    d, decay, flags, grad = _elements_mesh(owners(layout, p2p, a2a))
    for variant in VARIANTS:
        for reverse in (False, True):
            dl = d.clone().requires_grad_(True)
            decl = decay.clone().requires_grad_(True)
            ref = _reference(dl, decl, flags, variant, reverse)
            (ref * grad).sum().backward()
            for res in per_rank:
                idx, out, gv, gd = res[variant, reverse]
                torch.testing.assert_close(out, ref[idx].detach().reshape(out.shape), rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(gv, dl.grad[idx].reshape(gv.shape), rtol=1e-12, atol=1e-12)
                if "affine" in variant:
                    want = torch.zeros_like(decl) if decl.grad is None else decl.grad
                    torch.testing.assert_close(gd, want[idx].reshape(gd.shape), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ non-finite elements
# A reset must select the restarted state, not multiply the old one by a zero coefficient
# (0 * inf = NaN): a non-finite element before a reset reaches no prefix after it, and a
# non-finite output gradient after a reset reaches no value gradient before it.
def _non_finite_rank(layout):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    d, decay, _, grad = _elements(world, layout)
    big_m, idx = d.shape[0], _mine(layout, rank, world)
    squeeze = (lambda t: t[0]) if layout == "contiguous" else (lambda t: t)
    results = {}
    for reverse in (False, True):
        step = -1 if reverse else 1
        reset = big_m - 2 if reverse else 1  # the poisoned value sits just before it
        flags = torch.arange(big_m) == reset
        for what in ("values", "grad"):
            vals, g = d.clone(), grad.clone()
            if what == "values":
                vals[reset - step] = float("inf")
            else:  # the output gradient of the element just after the reset
                g[reset + step] = float("inf")
            for algorithm in ALGORITHMS:
                v = squeeze(vals[idx]).requires_grad_(True)
                dec = squeeze(decay[idx]).requires_grad_(True)
                out = exclusive_scan(v, decay=dec, reset=squeeze(flags[idx]), layout=layout,
                                     algorithm=algorithm, reverse=reverse)
                (out * squeeze(g[idx])).sum().backward()
                results[reverse, what, algorithm] = [
                    (q, reset, *(t if layout == "contiguous" else t[j] for t in (out.detach(), v.grad, dec.grad)))
                    for j, q in enumerate(idx)]
    return results


@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "zigzag"), (3, "contiguous")])
def test_resets_isolate_non_finite_elements(run_ranks, world, layout):
    """Values: every prefix but the reset element's own (the poisoned state itself) is
    finite, and so is every gradient (a reset's decay multiplies no state: its gradient is
    0). Gradients: the value gradients beyond the reset (in the backward's direction) are
    finite."""
    found = []
    for rank in run_ranks(world, _non_finite_rank, layout):
        for (reverse, what, algorithm), elems in rank.items():
            for q, reset, out, gv, gd in elems:
                beyond = q > reset if reverse else q < reset
                checks = ({"prefix": (out, q != reset), "value grad": (gv, True), "decay grad": (gd, True)}
                          if what == "values" else {"value grad": (gv, beyond)})
                found += [f"{what} poisoned, reverse={reverse}, {algorithm}: {name} of element {q}"
                          for name, (t, must) in checks.items() if must and not bool(torch.isfinite(t).all())]
    assert not found, "\n".join(found)
