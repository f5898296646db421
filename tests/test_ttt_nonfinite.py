"""Packed documents stay isolated under CP when one of them is non-finite: a document reset
must *select* the restarted state (never multiply the old one by zero: 0 * inf = NaN), in
the forward carries and in the backward's reverse carries, for every scan algorithm.

Documents whose padded length is whole chunks start on chunk boundaries, so every
document other than the poisoned one must equal the same document run alone (the float64
token loop of :func:`ctxpar.ttt.reference.documents_reference`)."""
import functools

import pytest
import torch

import ctxpar
from ctxpar.scan import ALGORITHMS
from ctxpar.ttt.reference import documents_reference

from _ttt_cases import C, make_data, make_layer

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _docs(layout: str, world: int) -> tuple[int, ...]:
    """Two documents of whole chunks on every rank. Contiguous: document 1 ends inside rank
    1's shard, so on 3 ranks rank 1's block both ends document 1 and starts document 2, and
    rank 2's carry crosses that reset; zigzag: each document is 2N pieces of one chunk."""
    unit = C * world if layout == "contiguous" else 2 * world * C
    return 0, unit, 2 * unit


def _layer(dtype, layout, algorithm):
    return make_layer(dtype, layout=layout, scan_algorithm=algorithm)


def _data(docs):
    return make_data(torch.float64, docs[-1])


@functools.lru_cache(maxsize=None)
def _reference(docs):
    """Each document alone, from clean inputs: what every untouched document must give."""
    x, gout = _data(docs)
    out, dx, _ = documents_reference(_layer(torch.float64, "zigzag", "allgather"), x, gout, list(docs))
    return out, dx


def _run(layout, algorithm, dtype, x, gout, docs):
    """This rank's packed shard through the layer and back; full out and dx (float64)."""
    layer = _layer(dtype, layout, algorithm)
    cu = torch.tensor(docs, dtype=torch.int32)
    x_local = ctxpar.shard_packed(x.to(dtype), cu, layout=layout).tokens.requires_grad_(True)
    out = layer(x_local, cu_seqlens=cu)
    (out.double() * ctxpar.shard_packed(gout, cu, layout=layout).tokens).sum().backward()
    return (ctxpar.unshard_packed(out.detach(), cu, layout=layout).double(),
            ctxpar.unshard_packed(x_local.grad, cu, layout=layout).double())


def _isolation_rank(algorithm):
    """Per layout: (docs, {case: (out, dx)}) for a poisoned document 1 (inf, or 1e30 that
    overflows float32) and a poisoned output gradient in document 2."""
    world = torch.distributed.get_world_size()
    results = {}
    for layout in ("contiguous", "zigzag"):
        docs = _docs(layout, world)
        x, gout = _data(docs)
        cases = {}
        for name, dtype, value in (("inf", torch.float64, float("inf")), ("1e30", torch.float32, 1e30)):
            bad = x.clone()
            bad[0, 1] = value
            cases[name] = (dtype, _run(layout, algorithm, dtype, bad, gout, docs))
        bad_g = gout.clone()
        bad_g[0, docs[2] - 1] = float("inf")  # in the last block: its reverse summary is inf
        cases["inf grad"] = (torch.float64, _run(layout, algorithm, torch.float64, x, bad_g, docs))
        results[layout] = docs, cases
    return results


def _problem(got, want, tol, what):
    """None if ``got`` is finite and within ``tol`` of ``want``, else what is wrong."""
    if not bool(torch.isfinite(got).all()):
        return f"{what}: non-finite values leaked in"
    err = (got - want).abs().max().item()
    return None if err <= tol * want.abs().max().item() else f"{what}: max error {err:.3g}"


def _problems(docs, cases):
    """Every leak at once (a list of messages), for one layout's cases."""
    ref_out, ref_dx = _reference(docs)
    first, second = slice(0, docs[1]), slice(docs[1], docs[2])
    found = []
    for name in ("inf", "1e30"):
        dtype, (out, dx) = cases[name]
        assert not bool(torch.isfinite(out[:, first]).all()), name  # the probe does bite
        found += [_problem(out[:, second], ref_out[:, second], TOL[dtype], f"{name} in document 1: document 2 output"),
                  _problem(dx[:, second], ref_dx[:, second], TOL[dtype], f"{name} in document 1: document 2 dx")]
    _, (out, dx) = cases["inf grad"]
    assert not bool(torch.isfinite(dx[:, second]).all())
    found += [_problem(out, ref_out, TOL[torch.float64], "inf in document 2's output gradient: output"),
              _problem(dx[:, first], ref_dx[:, first], TOL[torch.float64],
                       "inf in document 2's output gradient: document 1 dx")]
    return [f for f in found if f is not None]


@pytest.mark.parametrize("world,algorithm", [(1, "allgather")] + [(w, a) for w in (2, 3) for a in ALGORITHMS])
def test_a_non_finite_document_leaks_into_no_other(run_ranks, world, algorithm):
    """World 1 checks the single-process chunk loop (no scan): its resets drop the
    accumulator."""
    found = [f"rank {rank}, {layout}: {f}"
             for rank, per_layout in enumerate(run_ranks(world, _isolation_rank, algorithm))
             for layout, (docs, cases) in per_layout.items() for f in _problems(docs, cases)]
    assert not found, "\n".join(found)
