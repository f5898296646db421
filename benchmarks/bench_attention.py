"""Attention fwd+bwd under CP vs one process doing the whole sequence: a thin wrapper over
``ctxpar bench`` (``src/ctxpar/bench.py``), kept for its familiar options.

    python benchmarks/bench_attention.py --seq-len 16384 --world 2 --methods ring --layouts all

is ``ctxpar bench --seq-lens 16384 --worlds 2 --methods ring --layouts all`` with no
decoder-layer memory sweep and no plots unless asked. Efficiency is the project's
"core-seconds" one: ``ideal = min over T of (T · t_single(T)) / cores``, ``t_single(T)``
one process running torch's fused attention over the whole sequence with T threads,
``efficiency = ideal / cp_time`` (see ``ctxpar.apps.bench.run``). Any other ``ctxpar bench`` option
(``--peers``, ``--dtypes``, ``--causal both``, ``--out`` ...) is passed through.
"""
from __future__ import annotations

import argparse
import shutil
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", default="16384")
    p.add_argument("--world", default="2")
    p.add_argument("--heads", default="8")
    p.add_argument("--kv-heads", default="8")
    p.add_argument("--head-dim", default="64")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--methods", default="ring")
    p.add_argument("--layouts", default="all")
    p.add_argument("--hcp", default="", help="hybrid sizes as a2a,p2p (e.g. 2,2)")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--json", default="", help="copy results.json here too")
    p.add_argument("--plots", action="store_true", help="also write the timeline and scaling plots")
    args, rest = p.parse_known_args(argv)

    from ctxpar.apps.bench import run as bench

    fwd = ["--seq-lens", args.seq_len, "--worlds", args.world, "--heads", args.heads,
           "--kv-heads", args.kv_heads, "--head-dim", args.head_dim, "--dtypes", args.dtype,
           "--methods", args.methods, "--layouts", args.layouts, "--causal", "yes" if args.causal else "no",
           "--layer-worlds", "", "--peers", "none"]
    if args.hcp:
        fwd += ["--hybrid-sizes", args.hcp]
    if not args.plots:
        fwd.append("--no-plots")
    bp = argparse.ArgumentParser(prog="ctxpar bench")
    bench.add_arguments(bp)
    bargs = bp.parse_args(fwd + rest)
    rc = bench.run(bargs)
    if args.json:
        shutil.copyfile(f"{bargs.out}/results.json", args.json)
    return rc


if __name__ == "__main__":
    sys.exit(main())
