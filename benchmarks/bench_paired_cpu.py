"""ctxpar Ulysses against DeepSpeed Ulysses, call by call, in CPU seconds (issue 16 item 2).

On a shared, oversubscribed CPU the wall time of a fwd+bwd swings by 2-3x from one minute
to the next (other users' load), far more than the few percent at stake. This script
alternates the two implementations call by call on one rank pool (gloo, one thread per
rank, ``[B, S_local, H, D]`` shards of the same inputs) and records, per call, the wall time
of the slowest rank and the CPU seconds summed over the ranks (``time.process_time``: what
the call costs in work, much less sensitive to waiting for a core). Printed per case: the
medians and the median of the per-pair ratios ``DeepSpeed / ctxpar`` (> 1: ctxpar cheaper).
DeepSpeed must be installed (``DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed``).

    PYTHONPATH=src python benchmarks/bench_paired_cpu.py --worlds 2,4 --seq-lens 4096 --pairs 8
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _rank(s: int, causal: bool, pairs: int, ours: str, layout: str):
    import torch.distributed as dist

    import ctxpar
    from ctxpar.apps.bench.peers import make_peer

    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, s, 4, 64, generator=g) for _ in range(4)]
    fns = {"ctxpar": lambda a, b, c: ctxpar.attention(a, b, c, method=ours, layout=layout, causal=causal),
           "deepspeed": make_peer("deepspeed-ulysses", causal=causal)}
    shards = {"ctxpar": [ctxpar.shard(t, layout=layout) for t in full],
              "deepspeed": [ctxpar.shard(t, layout="contiguous") for t in full]}
    out = {name: ([], []) for name in fns}
    for i in range(pairs + 1):
        for name in (("ctxpar", "deepspeed") if i % 2 else ("deepspeed", "ctxpar")):
            q, k, v, do = shards[name]
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            dist.barrier()
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name](q, k, v).backward(do)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if i:  # call 0 of each is the warm-up
                out[name][0].append(wall)
                out[name][1].append(cpu)
    return out


def main() -> None:
    from ctxpar.apps.launch import RankPool

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--seq-lens", default="4096")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--method", default="ulysses:contiguous", help="ctxpar method:layout")
    args = p.parse_args()
    method, _, layout = args.method.partition(":")
    print(f"| N | S | causal | ctxpar {args.method} wall s | DeepSpeed wall s | wall ratio DS/ctxpar "
          "| ctxpar CPU s | DeepSpeed CPU s | CPU ratio DS/ctxpar |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w in (int(x) for x in args.worlds.split(",")):
        with RankPool(w, threads=1) as pool:
            for s in (int(x) for x in args.seq_lens.split(",")):
                for causal in (True, False):
                    res = pool.run(_rank, s, causal, args.pairs, method, layout or "contiguous",
                                   timeout=3000)
                    per = {}
                    for name in ("ctxpar", "deepspeed"):
                        wall = [max(r[name][0][i] for r in res) for i in range(args.pairs)]
                        cpu = [sum(r[name][1][i] for r in res) for i in range(args.pairs)]
                        per[name] = (wall, cpu)
                    rw = statistics.median(d / c for d, c in zip(per["deepspeed"][0], per["ctxpar"][0]))
                    rc = statistics.median(d / c for d, c in zip(per["deepspeed"][1], per["ctxpar"][1]))
                    med = {n: [statistics.median(x) for x in v] for n, v in per.items()}
                    print(f"| {w} | {s} | {'yes' if causal else 'no'} | {med['ctxpar'][0]:.3f} | "
                          f"{med['deepspeed'][0]:.3f} | {rw:.3f} | {med['ctxpar'][1]:.3f} | "
                          f"{med['deepspeed'][1]:.3f} | {rc:.3f} |", flush=True)


if __name__ == "__main__":
    main()
