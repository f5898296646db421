"""Planning time of one attention call at large N, without a real group (issue 16 item 3).

What a call plans before any kernel runs: the shard spec (``ShardSpec.make``), then per
method the ring's step count and tiles of every step, all-gather's tiles of every source
rank, or Ulysses' permutation to global order and its tile plan. The planners run on a
stand-in topology (``CPTopology(CPGroup(None, rank, N))``: no process group needed), for
the last rank (the one with the most work under causal masking).

Timed per call: the median over ``--calls`` calls after one untimed call (so every cache
is warm, as in a training loop), and separately the first call of a fresh process state
(``cold``: caches cleared). Runs against whichever ``ctxpar`` is importable, so the same
script measures an older checkout (``PYTHONPATH=/old/src``): the ring planner's signature
changed from ``_plan(grp, spec, ...)`` to ``_plan(spec, rank, size, ...)`` and both are
handled.

    PYTHONPATH=src python benchmarks/bench_planning.py --worlds 8,64,128
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch

from ctxpar.attn import allgather, ring, tiles, ulysses
from ctxpar.attn.kernels import sub_tile_rows
from ctxpar.dist.topology import CPGroup, CPTopology
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.spec import ShardSpec

CASES = {  # name: (layout, causal, window, cu_seqlens or None)
    "zigzag causal": ("zigzag", True, (-1, -1), None),
    "contiguous window 512": ("contiguous", True, (512, 0), None),
}


def _clear_caches() -> None:
    for fn in (tiles.plan_segments, getattr(tiles, "spec_ring_steps", None), ring._plan,
               getattr(allgather, "_plans", None), getattr(ulysses, "_global_view", None),
               ShardSpec.share, ShardSpec.segments):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
    from ctxpar.sequence import spec as spec_mod
    if hasattr(spec_mod, "_interned"):
        spec_mod._interned.cache_clear()


def _ring_call(topo, layout, local, causal, window, sub):
    spec = ShardSpec.make(get_layout(layout), topo, local, None)
    grp = topo.ring
    if "grp" in inspect.signature(ring._plan).parameters:  # before issue 16
        return ring._plan(grp, spec, causal, window, sub)
    return ring._plan(spec, grp.rank, grp.size, causal, tuple(window), sub)


def _allgather_call(topo, layout, local, causal, window, sub):
    spec = ShardSpec.make(get_layout(layout), topo, local, None)
    grp = topo.ring
    if "grp" in inspect.signature(allgather._plans).parameters:
        return allgather._plans(grp, spec, causal, window, sub)
    return allgather._plans(spec, grp.rank, grp.size, causal, tuple(window), sub)


def _ulysses_call(topo, layout, local, causal, window, sub):
    spec = ShardSpec.make(get_layout(layout), topo, local, None)
    _, _, segments = ulysses._global_view(spec, topo.size, torch.device("cpu"))
    return tiles.plan_segments(segments, segments, causal=causal, window=window, diagonal=True,
                               sub=sub)


METHODS = {"ring": _ring_call, "allgather": _allgather_call, "ulysses": _ulysses_call}


def measure(method: str, world: int, case: str, local: int, calls: int) -> tuple[float, float]:
    """(cold seconds, median warm seconds) of one call's planning."""
    layout, causal, window, _ = CASES[case]
    topo = CPTopology(CPGroup(None, world - 1, world))
    fn = METHODS[method]
    sub = sub_tile_rows(torch.device("cpu"))
    _clear_caches()
    t0 = time.perf_counter()
    fn(topo, layout, local, causal, window, sub)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(topo, layout, local, causal, window, sub)
        warm.append(time.perf_counter() - t0)
    return cold, statistics.median(warm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", default="8,64,128")
    p.add_argument("--local", type=int, default=1024, help="tokens per rank")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--methods", default="ring,allgather,ulysses")
    args = p.parse_args()
    print("| method | case | N | cold (first call) ms | per call ms (median) |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        for case in CASES:
            for n in (int(x) for x in args.worlds.split(",")):
                cold, warm = measure(method, n, case, args.local, args.calls)
                print(f"| {method} | {case} | {n} | {cold * 1e3:.2f} | {warm * 1e3:.4f} |", flush=True)


if __name__ == "__main__":
    main()
