"""Attention fwd+bwd under CP vs one process doing the whole sequence (CPU, gloo).

    python benchmarks/bench_attention.py --seq-len 16384 --world 2 --methods ring --layouts all

For every method x layout it reports the median fwd+bwd step time of the CP group (the
slowest rank per iteration), the speedup over one process running torch's fused
``scaled_dot_product_attention`` on the whole sequence with 1 thread and with ``world``
threads, and the efficiency against the ideal:

    ideal = min over T of (T * t_single(T threads)) / world      efficiency = ideal / cp_time

i.e. the best single-process *core-seconds* spread perfectly over the cores the CP run
uses (ranks run one thread each). Efficiency 1.0 means CP wastes nothing relative to the
best single process on the same cores; for 2 ranks it equals (speedup over 1 thread) / 2
whenever the 1-thread run is the most core-efficient. Single-process and CP timings come
from the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _inputs(b, s, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv, hq)]


def single_process(args, threads: int) -> list[float]:
    """Median-able fwd+bwd times of torch SDPA on the whole sequence in this process."""
    torch.set_num_threads(threads)
    q, k, v, dout = _inputs(args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim,
                            getattr(torch, args.dtype))
    q, k, v = [t.transpose(1, 2).requires_grad_() for t in (q, k, v)]
    dout = dout.transpose(1, 2)
    times = []
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=args.causal, enable_gqa=args.kv_heads != args.heads)
        out.backward(dout)
        dt = time.perf_counter() - t0
        q.grad = k.grad = v.grad = None
        if i >= args.warmup:
            times.append(dt)
    return times


def cp_rank(args, method: str, layout: str, group_spec=None) -> dict:
    """Runs on every rank: per-iteration fwd+bwd times and the bytes of one call."""
    import torch.distributed as dist

    import ctxpar

    group = None
    if group_spec is not None:
        group = ctxpar.cp_mesh(hierarchical_context_parallel_sizes=list(group_spec), device_type="cpu")
    full = _inputs(args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim,
                   getattr(torch, args.dtype))
    q, k, v, dout = [ctxpar.shard(t, group=group, layout=layout) for t in full]
    del full
    q, k, v = [t.clone().requires_grad_() for t in (q, k, v)]
    times, fwd_times = [], []
    counters = None
    for i in range(args.warmup + args.repeats):
        dist.barrier()
        with ctxpar.comm_counters() as c:
            t0 = time.perf_counter()
            out = ctxpar.attention(q, k, v, group=group, method=method, layout=layout, causal=args.causal)
            t1 = time.perf_counter()
            out.backward(dout)
            t2 = time.perf_counter()
        q.grad = k.grad = v.grad = None
        if i >= args.warmup:
            times.append(t2 - t0)
            fwd_times.append(t1 - t0)
        counters = c
    return {"times": times, "fwd_times": fwd_times, "bytes_recv": counters.bytes_recv,
            "bytes_sent": counters.bytes_sent, "ops": dict(counters.ops)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--methods", default="ring")
    p.add_argument("--layouts", default="all")
    p.add_argument("--hcp", default="", help="hybrid sizes as a2a,p2p (e.g. 1,2); used for method hybrid")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="", help="write the results here too")
    args = p.parse_args(argv)

    import ctxpar
    from ctxpar.launch import RankPool

    layouts = list(ctxpar.LAYOUTS) if args.layouts == "all" else args.layouts.split(",")
    single = {t: statistics.median(single_process(args, t)) for t in sorted({1, args.world})}
    ideal = min(t * v for t, v in single.items()) / args.world
    rows = []
    with RankPool(args.world, threads=1) as pool:
        for method in args.methods.split(","):
            spec = tuple(int(x) for x in args.hcp.split(",")) if method == "hybrid" and args.hcp else None
            for layout in layouts:
                res = pool.run(cp_rank, args, method, layout, spec, timeout=3600)
                per_iter = [max(r["times"][i] for r in res) for i in range(args.repeats)]
                fwd_iter = [max(r["fwd_times"][i] for r in res) for i in range(args.repeats)]
                t = statistics.median(per_iter)
                rows.append({
                    "method": method + (f"{list(spec)}" if spec else ""), "layout": layout,
                    "cp_time_s": t, "cp_fwd_time_s": statistics.median(fwd_iter),
                    "spread_s": max(per_iter) - min(per_iter),
                    "speedup_vs_1_thread": single[1] / t,
                    f"speedup_vs_{args.world}_threads": single[args.world] / t,
                    "efficiency": ideal / t,
                    "bytes_recv_per_rank": max(r["bytes_recv"] for r in res),
                })
    print(f"\nS={args.seq_len} B={args.batch} Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} "
          f"{args.dtype} causal={args.causal} fwd+bwd, world={args.world} x 1 thread")
    for t, v in single.items():
        print(f"single process, {t} thread(s): {v:.3f} s (median of {args.repeats})")
    print(f"ideal CP time (best single-process core-seconds / {args.world} cores): {ideal:.3f} s")
    print(f"\n| method | layout | CP fwd+bwd (s) | spread (s) | speedup vs 1 thread | speedup vs "
          f"{args.world} threads | efficiency | MiB recv/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['layout']} | {r['cp_time_s']:.3f} | {r['spread_s']:.3f} | "
              f"{r['speedup_vs_1_thread']:.2f}x | {r[f'speedup_vs_{args.world}_threads']:.2f}x | "
              f"{r['efficiency']:.3f} | {r['bytes_recv_per_rank'] / 2**20:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "single": single, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
