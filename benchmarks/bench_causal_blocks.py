"""How much of a causal block a fused kernel computes, measured against the planner's rule.

A fused kernel's causal flag skips work only in whole blocks of its own tiling, so a causal
``n x n`` block costs more than its ``n(n+1)/2`` visible pairs. ``ctxpar.apps.plan.work``
holds the blocking (``KERNEL_BLOCKS``) and the planner times tiles by
``kernel_pairs``. This script times the kernel ``ctxpar.attn.kernels`` calls for
each block (torch's CPU flash kernel on CPU, one thread, as a ``ctxpar bench`` rank runs),
causal and full, forward and backward, and prints the measured causal/full ratio beside
the rule's ``kernel_pairs / n²``.

    PYTHONPATH=src python benchmarks/bench_causal_blocks.py --sizes 256,512,768,1024,2048
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ctxpar.apps.plan.work import kernel_pairs
from ctxpar.attn.tiles import Band, Tile


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,384,512,640,768,1024,1536,2048,3072")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    print("| n | full fwd ms | full bwd ms | causal/full fwd | causal/full bwd | rule |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim) for _ in range(3))
        ms = {}
        for causal in (True, False):
            out, lse = fwd(q, k, v, 0.0, causal)
            dout = torch.randn_like(out)
            ms[causal] = (_median_ms(lambda: fwd(q, k, v, 0.0, causal), args.repeats),
                          _median_ms(lambda: bwd(dout, q, k, v, out, lse, 0.0, causal), args.repeats))
        rule = kernel_pairs(Tile(0, n, 0, n, Band(0, None)), "cpu_flash")[0] / (n * n)
        print(f"| {n} | {ms[False][0]:.2f} | {ms[False][1]:.2f} | {ms[True][0] / ms[False][0]:.3f} | "
              f"{ms[True][1] / ms[False][1]:.3f} | {rule:.3f} |")


if __name__ == "__main__":
    main()
