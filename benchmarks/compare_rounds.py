"""Paired comparison of ``ctxpar bench`` rounds: ctxpar's cells against a peer's.

Each round is one ``ctxpar bench`` run (its ``results.json``); within a round the bench runs
every case's ctxpar cells and then the peer's, back to back on the same rank pool, so a
case's cells see about the same machine load. Per case (N, S, causal) and round this
prints each cell's efficiency (``eff_tot``: fwd+bwd) and the paired difference
``ctxpar - peer`` of that round, and the paired time ratio ``peer time / ctxpar time`` (> 1:
ctxpar faster; it does not depend on the single-process baseline, which each round
measures at another moment); then the medians over rounds.

    python benchmarks/compare_rounds.py OUT1/results.json OUT2/results.json OUT3/results.json \\
        --ours ulysses/contiguous --peer deepspeed-ulysses
"""
from __future__ import annotations

import argparse
import json
import statistics


def _cells(path: str) -> dict:
    with open(path) as f:
        rows = json.load(f)["cells"]
    return {(r["world"], r["seq_len"], r["causal"], f"{r['method']}/{r['layout']}"): r for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="results.json of each round")
    p.add_argument("--ours", default="ulysses/contiguous", help="method/layout of the ctxpar cell")
    p.add_argument("--peer", default="deepspeed-ulysses/contiguous", help="method/layout of the other cell")
    p.add_argument("--metric", default="eff_tot", help="eff_tot (fwd+bwd) or eff_fwd")
    p.add_argument("--time", default="tot_s", help="tot_s (fwd+bwd) or fwd_s, for the time ratio")
    args = p.parse_args()
    rounds = [_cells(path) for path in args.results]
    cases = sorted({k[:3] for r in rounds for k in r})
    print(f"| N | S | causal | {args.ours} by round | {args.peer} by round | paired diff by round "
          f"| median {args.ours} | median {args.peer} | median paired diff | time ratio by round "
          f"| median time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        ours = [r[case + (args.ours,)][args.metric] for r in rounds if case + (args.ours,) in r]
        peer = [r[case + (args.peer,)][args.metric] for r in rounds if case + (args.peer,) in r]
        if not ours or not peer or len(ours) != len(peer):
            continue
        diff = [a - b for a, b in zip(ours, peer)]
        t_ours = [r[case + (args.ours,)][args.time] for r in rounds if case + (args.ours,) in r]
        t_peer = [r[case + (args.peer,)][args.time] for r in rounds if case + (args.peer,) in r]
        ratio = [b / a for a, b in zip(t_ours, t_peer)]  # > 1: ours is faster
        fmt = lambda xs: " / ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        print(f"| {case[0]} | {case[1]} | {'yes' if case[2] else 'no'} | {fmt(ours)} | {fmt(peer)} | "
              f"{' / '.join(f'{d:+.3f}' for d in diff)} | {statistics.median(ours):.3f} | "
              f"{statistics.median(peer):.3f} | {statistics.median(diff):+.3f} | {fmt(ratio)} | "
              f"{statistics.median(ratio):.3f} |")


if __name__ == "__main__":
    main()
