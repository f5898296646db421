"""Sliding-window attention cost (issue 18): one process, CP ranks, FlexAttention.

Causal attention with a ``(W, 0)`` window, fp32, B=1, H=4, D=32, every process on one
thread (``torch.set_num_threads(1)``). Every case is called once to warm up, then all
cases of a table run in interleaved rounds (``--repeats``); a table gives medians over
rounds, and its ratios are medians of per-round ratios. One-process times are CPU seconds
of the process (on one thread the cost of the call, little disturbed by whatever else
shares the machine); CP times are wall seconds.

    python benchmarks/bench_windows.py single                 # S = 16k, 32k, 64k; W = 256, 4096
    python benchmarks/bench_windows.py flex                   # FlexAttention forward, same sizes
    python benchmarks/bench_windows.py cp --seqs 32768        # N = 2, 4; contiguous and zigzag
    python benchmarks/bench_windows.py cp --seqs 32768 --methods ring,allgather,ulysses
    python benchmarks/bench_windows.py subs --seqs 16384      # sub-tile sizes 64 .. 512

``single``: fwd and fwd+bwd seconds, microseconds per token, the ratio to the previous
length (2.0 is linear), the fwd+bwd wall time and ``score_elements`` per token (at most
``W + 1 + sub``).
``flex``: ``torch.nn.attention.flex_attention`` under ``torch.compile`` with a
sliding-window ``BlockMask`` (forward only: on CPU it has no backward and, compiled, no
LSE), beside ctxpar's forward. ``cp``: N local gloo ranks, one thread each (``--pin``: rank r
pinned to CPU r mod cores); the slowest rank's wall time, speedup = t(one process) / t(N ranks),
efficiency = speedup / cores used (min(N, available CPUs)), CPU efficiency = t(one
process) / (N x the slowest rank's CPU time: imbalance and what CP adds in compute and
communication, whatever the machine's load; the wall efficiency on N free cores with
communication hidden), the per-round ratio of the wall time to the contiguous layout's (same
method, same rounds) and the bytes a rank receives per fwd+bwd (``comm_counters``).
``subs``: one process fwd+bwd by sub-tile size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch

import ctxpar
from ctxpar.apps.launch import RankPool
from ctxpar.attn import kernels

_HEADS, _DIM = 4, 32


def _clock(fn) -> tuple[float, float]:
    """Wall and CPU seconds of one call. One thread: the CPU time of this process is
    what the call cost, whatever else the (shared) machine runs meanwhile."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _rounds(cases: dict, repeats: int) -> dict:
    """``{key: [(wall, cpu) per round]}``: one warm-up call each (plans, masks, compiled
    kernels), then rounds that time every case once, so that a slow spell of the machine
    hits every case alike and ratios are taken within a round."""
    for fn in cases.values():
        fn()
    got = {key: [] for key in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            got[key].append(_clock(fn))
    return got


def _median(samples, which: int = 1) -> float:
    return statistics.median(x[which] for x in samples)


def _ratio(num, den, which: int = 1) -> float:
    """Median over rounds of the per-round ratio."""
    return statistics.median(a[which] / b[which] for a, b in zip(num, den))


def _inputs(s: int, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, s, _HEADS, _DIM, generator=g).requires_grad_(grad) for _ in range(3)]


def _ctxpar_calls(s: int, w: int, layout: str = "contiguous"):
    """``(fwd, fwd_bwd, pairs per token)`` for one process at length s, window w."""
    q, k, v = _inputs(s, True)
    kw = dict(layout=layout, causal=True, window=(w, 0))

    def fwd():
        with torch.no_grad():
            ctxpar.attention(q, k, v, **kw)

    def fwd_bwd():
        ctxpar.attention(q, k, v, **kw).sum().backward()

    with ctxpar.comm_counters() as c:
        fwd()
    return fwd, fwd_bwd, sum(c.score_elements.values()) / s


def single(args) -> list[dict]:
    torch.set_num_threads(1)
    cases, pairs = {}, {}
    for w in args.windows:
        for s in args.seqs:
            cases[w, s, "fwd"], cases[w, s, "fwd_bwd"], pairs[w, s] = _ctxpar_calls(s, w)
    got = _rounds(cases, args.repeats)
    print("| W | S | fwd s | fwd+bwd s | us/token (fwd+bwd) | ratio fwd | ratio fwd+bwd | "
          "fwd+bwd wall s | pairs/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for w in args.windows:
        for prev, s in zip([None] + args.seqs, args.seqs):
            f, fb = got[w, s, "fwd"], got[w, s, "fwd_bwd"]
            r = {"W": w, "S": s, "fwd_s": _median(f), "fwd_bwd_s": _median(fb),
                 "fwd_bwd_wall_s": _median(fb, 0), "pairs_per_token": pairs[w, s],
                 "ratio_fwd": prev and _ratio(f, got[w, prev, "fwd"]),
                 "ratio_fwd_bwd": prev and _ratio(fb, got[w, prev, "fwd_bwd"])}
            rows.append(r)
            fmt = lambda x: "" if not x else f"{x:.2f}"  # noqa: E731
            print(f"| {w} | {s} | {r['fwd_s']:.3f} | {r['fwd_bwd_s']:.3f} | "
                  f"{1e6 * r['fwd_bwd_s'] / s:.1f} | {fmt(r['ratio_fwd'])} | "
                  f"{fmt(r['ratio_fwd_bwd'])} | {r['fwd_bwd_wall_s']:.3f} | {pairs[w, s]:.0f} |")
    return rows


def _flex_call(s: int, w: int):
    """FlexAttention's forward at length s, window w (the BlockMask built here, the kernel
    compiled by the warm-up call)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def window(b, h, qi, ki):
        return (qi >= ki) & (qi - ki <= w)

    with warnings.catch_warnings():  # _compile is deprecated in favour of torch.compile
        warnings.simplefilter("ignore")
        # Compiled, the BlockMask is built block by block (eager, it materialises S x S).
        mask = create_block_mask(window, None, None, s, s, device="cpu", _compile=True)
    flex_fn = torch.compile(flex_attention)
    q, k, v = (t.transpose(1, 2) for t in _inputs(s, False))

    def fwd():
        with torch.no_grad():
            flex_fn(q, k, v, block_mask=mask)
    return fwd


def flex(args) -> list[dict]:
    torch.set_num_threads(1)
    cases = {}
    for w in args.windows:
        for s in args.seqs:
            cases[w, s, "flex"] = _flex_call(s, w)
            cases[w, s, "ctxpar"] = _ctxpar_calls(s, w)[0]
    got = _rounds(cases, args.repeats)
    rows = []
    print("| W | S | FlexAttention fwd s | ctxpar fwd s | ctxpar / Flex |")
    print("|---|---|---|---|---|")
    for w in args.windows:
        for s in args.seqs:
            f, ours = got[w, s, "flex"], got[w, s, "ctxpar"]
            r = {"W": w, "S": s, "flex_fwd_s": _median(f), "ctxpar_fwd_s": _median(ours),
                 "ratio": _ratio(ours, f)}
            rows.append(r)
            print(f"| {w} | {s} | {r['flex_fwd_s']:.3f} | {r['ctxpar_fwd_s']:.3f} | {r['ratio']:.2f} |")
    return rows


def _rank_rounds(s: int, w: int, variants: list, repeats: int, pin: bool) -> dict:
    """On every CP rank: ``{(method, layout): ([(wall, cpu) per round], bytes received per
    fwd+bwd)}``, the variants interleaved in rounds as in :func:`_rounds`."""
    dist = torch.distributed
    if pin:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[dist.get_rank() % len(cpus)]})
    cases, nbytes = {}, {}
    for method, layout in variants:
        q, k, v = (ctxpar.shard(t.detach(), layout=layout).requires_grad_() for t in _inputs(s, False))

        def call(q=q, k=k, v=v, method=method, layout=layout):
            dist.barrier()  # every rank starts the call together
            out = ctxpar.attention(q, k, v, layout=layout, causal=True, window=(w, 0),
                                   method=method, check_args=False)
            out.sum().backward()

        with ctxpar.comm_counters() as c:
            call()
        cases[method, layout], nbytes[method, layout] = call, c.bytes_recv
    got = _rounds(cases, repeats)
    return {key: (got[key], nbytes[key]) for key in cases}


def cp(args) -> list[dict]:
    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0))
    variants = [(m, lay) for m in args.methods for lay in args.layouts]
    rows = []
    print(f"| W | S | N | method | layout | one process s | N ranks wall s | speedup | "
          f"efficiency ({cores} cores) | CPU efficiency | wall vs contiguous | MB recv/rank |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in args.seqs:
        for w in args.windows:
            t1 = _median(_rounds({0: _ctxpar_calls(s, w)[1]}, args.repeats)[0])
            for n in args.worlds:
                with RankPool(n, threads=1) as pool:
                    res = pool.run(_rank_rounds, s, w, variants, args.repeats, args.pin, timeout=1800)
                walls = {key: [max(r[key][0][i][0] for r in res) for i in range(args.repeats)]
                         for key in variants}  # the slowest rank, per round
                for key in variants:
                    base = walls.get((key[0], "contiguous"))
                    vs = base and statistics.median(a / b for a, b in zip(walls[key], base))
                    rows.append(_cp_row(s, w, n, key, [r[key] for r in res], t1, cores, vs))
    return rows


def _cp_row(s, w, n, key, per_rank, t1, cores, vs) -> dict:
    """One table row from every rank's ``(rounds, bytes)``: the slowest rank's wall time
    and CPU time, medians over rounds; ``vs``: the median per-round ratio of this wall
    time to the contiguous layout's (same method)."""
    rounds = len(per_rank[0][0])
    wall, cpu = (statistics.median(max(r[0][i][j] for r in per_rank) for i in range(rounds))
                 for j in (0, 1))
    mb = max(r[1] for r in per_rank) / 2 ** 20
    r = {"S": s, "W": w, "N": n, "method": key[0], "layout": key[1], "one_s": t1, "cp_wall_s": wall,
         "speedup": t1 / wall, "efficiency": t1 / (min(n, cores) * wall),
         "cpu_efficiency": t1 / (n * cpu), "vs_contiguous": vs, "mb_recv": mb}
    print(f"| {w} | {s} | {n} | {key[0]} | {key[1]} | {t1:.3f} | {wall:.3f} | {r['speedup']:.2f} | "
          f"{r['efficiency']:.2f} | {r['cpu_efficiency']:.2f} | {'' if vs is None else f'{vs:.2f}'} | "
          f"{mb:.1f} |")
    return r


def subs(args) -> list[dict]:
    torch.set_num_threads(1)
    saved = dict(kernels.SUB_TILE_ROWS)

    def at(sub, fn):
        def run():
            kernels.SUB_TILE_ROWS["cpu"] = sub
            fn()
        return run

    cases, pairs = {}, {}
    try:
        for w in args.windows:
            for s in args.seqs:
                for sub in args.subs:
                    kernels.SUB_TILE_ROWS["cpu"] = sub
                    fwd, fwd_bwd, pairs[w, s, sub] = _ctxpar_calls(s, w)
                    cases[w, s, sub, "fwd"], cases[w, s, sub, "fwd_bwd"] = at(sub, fwd), at(sub, fwd_bwd)
        got = _rounds(cases, args.repeats)
    finally:
        kernels.SUB_TILE_ROWS.update(saved)
    rows = []
    print("| W | S | sub-tile rows | fwd s | fwd+bwd s | pairs/token |")
    print("|---|---|---|---|---|---|")
    for (w, s, sub), p in pairs.items():
        r = {"W": w, "S": s, "sub": sub, "fwd_s": _median(got[w, s, sub, "fwd"]),
             "fwd_bwd_s": _median(got[w, s, sub, "fwd_bwd"]), "pairs_per_token": p}
        rows.append(r)
        print(f"| {w} | {s} | {sub} | {r['fwd_s']:.3f} | {r['fwd_bwd_s']:.3f} | {p:.0f} |")
    return rows


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["single", "flex", "cp", "subs"])
    ap.add_argument("--seqs", type=_ints, default=[16384, 32768, 65536])
    ap.add_argument("--windows", type=_ints, default=[256, 4096])
    ap.add_argument("--worlds", type=_ints, default=[2, 4])
    ap.add_argument("--layouts", default="contiguous,zigzag")
    ap.add_argument("--methods", default="ring")
    ap.add_argument("--subs", type=_ints, default=[64, 128, 256, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pin", action="store_true", help="cp: pin rank r to CPU r mod cores")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args(argv)
    args.layouts, args.methods = args.layouts.split(","), args.methods.split(",")
    rows = {"single": single, "flex": flex, "cp": cp, "subs": subs}[args.part](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"part": args.part, "args": {k: v for k, v in vars(args).items()}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
