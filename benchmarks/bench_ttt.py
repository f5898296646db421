"""In-Place TTT layer benchmark: fwd+bwd time of one layer on N CP ranks vs one process
(one thread each), bytes per rank per layer, and saved-tensor bytes vs the naive form that
keeps every chunk's weight matrix.

    python benchmarks/bench_ttt.py                      # S=16384, d=256, d_ff=1024, C=1024
    python benchmarks/bench_ttt.py --seq 4096 --repeats 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import ctxpar
from ctxpar.apps.launch import RankPool
from ctxpar.observe.memory import saved_tensor_bytes
from ctxpar.ttt import InPlaceTTTMLP
from ctxpar.ttt.reference import GatedMLP, all_chunk_weights_forward



def _layer(d, ff, chunk, layout, overlap=True):
    torch.manual_seed(0)
    layer = InPlaceTTTMLP(GatedMLP(d, ff), chunk_size=chunk, layout=layout, overlap=overlap)
    with torch.no_grad():  # away from init: the fast weights are live
        layer.ttt_conv.normal_(std=0.1)
    return layer


def _physical_cpus() -> list[int]:
    """One logical CPU per physical core (the first of its hyperthread siblings), so that
    two single-threaded ranks never share a core's arithmetic units."""
    cpus, seen = [], set()
    for cpu in sorted(os.sched_getaffinity(0)):
        path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        try:
            with open(path) as f:
                sib = f.read().strip()
        except OSError:
            sib = str(cpu)
        if sib not in seen:
            seen.add(sib)
            cpus.append(cpu)
    return cpus


def _time_rank(seq, d, ff, chunk, layout, repeats, warmup, overlap=True, pin=True):
    """Runs on every rank of the pool: seconds of fwd+bwd per repeat (the caller takes the
    slowest rank of each), and the bytes this rank received per layer."""
    dist = torch.distributed
    if pin:
        cpus = _physical_cpus()
        os.sched_setaffinity(0, {cpus[dist.get_rank() % len(cpus)]})
    layer = _layer(d, ff, chunk, layout, overlap)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, seq, d, generator=g)
    x_local = ctxpar.shard(x, layout=layout).requires_grad_(True)
    gout = torch.randn(x_local.shape, generator=g)
    times, nbytes = [], None
    for it in range(warmup + repeats):
        dist.barrier()
        t0 = time.perf_counter()
        with ctxpar.comm_counters() as c:
            out = layer(x_local)
            out.backward(gout)
        dt = time.perf_counter() - t0
        if it >= warmup:
            times.append(dt)
        nbytes = c.bytes_recv
        layer.zero_grad(set_to_none=True)
        x_local.grad = None
    return times, nbytes






def _memory(seq, d, ff, chunk):
    torch.set_num_threads(1)
    layer = _layer(d, ff, chunk, "contiguous")
    x = torch.randn(1, seq, d, requires_grad=True)
    ours = saved_tensor_bytes(lambda: layer(x))
    naive = saved_tensor_bytes(lambda: all_chunk_weights_forward(layer, x, chunk))
    # The activations any implementation keeps: the plain MLP plus the target path.
    plain = saved_tensor_bytes(lambda: (layer.down_proj(layer.activations(x)), layer.targets(x)))
    return {"seq": seq, "chunks": seq // chunk, "ours_bytes": ours, "naive_bytes": naive,
            "activations_bytes": plain, "ours_beyond_activations": ours - plain,
            "naive_beyond_activations": naive - plain, "weight_bytes": d * ff * 4}


def _run(pool, seq, args, layout, overlap=True):
    res = pool.run(_time_rank, seq, args.d, args.ff, args.chunk, layout, args.repeats, args.warmup,
                   overlap, not args.no_pin, timeout=3600)
    per_iter = [max(r[0][i] for r in res) for i in range(args.repeats)]  # slowest rank
    return statistics.median(per_iter), per_iter, [r[1] for r in res]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--ff", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bytes-seqs", type=int, nargs="*", default=[8192, 16384])
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-pin", action="store_true", help="do not pin rank r to physical core r")
    args = ap.parse_args(argv)

    report = {"config": vars(args)}
    # Interleaved rounds (one process, then every 2-rank variant, then again) so that slow
    # drifts of a shared machine hit all variants alike; speedups are medians of per-round
    # ratios. The first `warmup` rounds are discarded.
    variants = [(layout, overlap) for layout in ("contiguous", "zigzag") for overlap in (True, False)]
    one, multi = [], {v: [] for v in variants}
    one_args = argparse.Namespace(**{**vars(args), "repeats": 1, "warmup": 0})
    with RankPool(1, threads=1) as pool1, RankPool(args.world, threads=1) as pooln:
        for rnd in range(args.warmup + args.repeats):
            t1 = _run(pool1, args.seq, one_args, "contiguous")[0]
            times = {v: _run(pooln, args.seq, one_args, *v)[0] for v in variants}
            if rnd >= args.warmup:
                one.append(t1)
                for v in variants:
                    multi[v].append(times[v])
        report["one_process_s"] = statistics.median(one)
        report["one_process_all_s"] = one
        for (layout, overlap), ts in multi.items():
            key = f"{layout}_{'overlap' if overlap else 'no_overlap'}"
            report[f"{key}_{args.world}_ranks_s"] = statistics.median(ts)
            report[f"{key}_{args.world}_ranks_all_s"] = ts
            report[f"{key}_speedup"] = statistics.median(a / b for a, b in zip(one, ts))
        report["bytes_per_rank_per_layer"] = {}
        for seq in args.bytes_seqs:
            report["bytes_per_rank_per_layer"][seq] = _run(pooln, seq, one_args, "contiguous")[2]
    report["saved_tensors"] = _memory(args.seq, args.d, args.ff, args.chunk)
    # Twice the chunks at the same length: ours stays put, the naive form grows by K·|W|.
    report["saved_tensors_half_chunk"] = _memory(args.seq, args.d, args.ff, args.chunk // 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
