"""``ctxpar bench``: speed, communication and memory of every CP method, against the ideal
and against peer libraries, with plots.

For every cell of the matrix method × layout × world size × sequence length × dtype ×
causal (plus each installed peer, see ``ctxpar.apps.bench.peers``) it measures, on local ranks
(gloo on CPU, one thread each; NCCL on CUDA, one GPU each):

- fwd and fwd+bwd time: median and spread (max - min) over ``--repeats`` timed runs after
  ``--warmup``; a run's time is that of its slowest rank.
- efficiency = ideal ÷ CP time, with the project's "core-seconds" ideal:
  ``ideal = min over T of (T · t_single(T)) / cores``, ``t_single(T)`` the time of one
  process running torch's fused ``scaled_dot_product_attention`` over the whole sequence
  with T threads (T = 1 or all the cores the CP run uses), ``cores = min(world, CPUs)``
  (on CUDA: T = 1 GPU and cores = world).
- bytes sent/received per rank (``ctxpar.comm_counters``), fwd and bwd, against the
  theoretical volume of each design (:func:`theory_recv_bytes`).
- compute vs blocked time, from one extra untimed fwd+bwd per cell under torch.profiler:
  compute = time in top-level aten ops, blocked = wall - compute (waiting on
  communication, plus Python overhead); for ring-based methods also the per-step
  ``ctxpar.observe.trace.ring_trace`` (the timeline plot).
- activation memory per rank: bytes saved for backward (``ctxpar.observe.memory``), and the CUDA
  peak allocation on CUDA; plus, separately, the saved bytes per rank of a whole decoder
  layer (:class:`DecoderLayer`) at a fixed global length for N = 1, 2, 4.
- error vs the float64 reference (out, and the worst of dq/dk/dv), max abs error relative
  to the reference's max abs value.

Outputs: a Markdown table on stdout, ``OUT/results.json``, ``OUT/timeline.png`` and
``OUT/scaling.png`` (``ctxpar.apps.bench.plots``; needs matplotlib, the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import torch

from ctxpar.apps.bench.cells import (DecoderLayer, rank_cell, rank_layer_memory, reference, rel_errors,
                          single_process, theory_recv_bytes)
from ctxpar.apps.cli import parse_ints

__all__ = ["add_arguments", "run", "theory_recv_bytes", "DecoderLayer"]

_QUICK = dict(methods="ring,ulysses,allgather", layouts="zigzag", worlds="2", seq_lens="512",
              dtypes="float32", causal="yes", warmup=1, repeats=2, layer_seq_len=256,
              layer_worlds="1,2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--methods", default="ring,ulysses,allgather,hybrid",
      help="comma list of ctxpar methods; method:layout runs that method on that layout only")
    a("--layouts", default="zigzag,contiguous", help="comma list, or 'all'")
    a("--worlds", default="1,2,4", help="CP world sizes (local ranks)")
    a("--seq-lens", default="1024,2048", help="global sequence lengths")
    a("--dtypes", default="float32", help="comma list: float32, bfloat16, float16, float64")
    a("--causal", default="yes", choices=("both", "yes", "no"), help="causal, full, or both")
    a("--batch", type=int, default=1)
    a("--heads", type=int, default=8)
    a("--kv-heads", type=int, default=8)
    a("--head-dim", type=int, default=64)
    a("--hybrid-sizes", default="", help="a2a,p2p for method hybrid (default: 2,N/2 for even N>=4)")
    a("--warmup", type=int, default=1)
    a("--repeats", type=int, default=5)
    a("--peers", default="auto", help="comma list of peers (ctxpar.apps.bench.peers.PEERS), 'auto' = all, 'none'")
    a("--no-errors", dest="errors", action="store_false", help="skip the float64 reference checks")
    a("--layer-seq-len", type=int, default=2048, help="global length for the decoder-layer memory")
    a("--layer-worlds", default="1,2,4", help="world sizes for the decoder-layer memory ('' = skip)")
    a("--device", default="cpu", choices=("cpu", "cuda"))
    a("--out", default="bench-results", help="folder for results.json and the plots")
    a("--no-plots", dest="plots", action="store_false")
    a("--timeout", type=float, default=3600.0, help="seconds per cell before a hang is declared")
    a("--quick", action="store_true", help="tiny CI configuration (well under a minute): "
      + ", ".join(f"{k}={v}" for k, v in _QUICK.items()) + ", no peers unless --peers names some")
    from ctxpar.apps.bench.million import add_arguments as million_arguments

    million_arguments(p)


# ------------------------------------------------------------------------------ theory


def _resolve(args) -> argparse.Namespace:
    cfg = argparse.Namespace(**vars(args))
    if args.quick:
        for key, val in _QUICK.items():
            setattr(cfg, key, val)
        if args.peers == "auto":
            cfg.peers = "none"
    return cfg


def _check_counts(cfg: argparse.Namespace) -> None:
    """Counts and sizes a run needs (>= 1; warm-up >= 0): one line naming the flag, before
    any rank starts."""
    lists = {"--worlds": cfg.worlds, "--seq-lens": cfg.seq_lens, "--layer-worlds": cfg.layer_worlds,
             "--hybrid-sizes": cfg.hybrid_sizes}
    for flag, text in lists.items():
        try:
            values = parse_ints(text, flag)
        except ValueError as e:
            raise SystemExit(f"ctxpar bench: {e}") from None
        if any(v < 1 for v in values) or (flag in ("--worlds", "--seq-lens") and not values):
            raise SystemExit(f"ctxpar bench: {flag} takes integers >= 1, got {text!r}")
    for flag, value, least in (("--repeats", cfg.repeats, 1), ("--warmup", cfg.warmup, 0),
                               ("--batch", cfg.batch, 1), ("--heads", cfg.heads, 1),
                               ("--kv-heads", cfg.kv_heads, 1), ("--head-dim", cfg.head_dim, 1),
                               ("--layer-seq-len", cfg.layer_seq_len, 1)):
        if value < least:
            raise SystemExit(f"ctxpar bench: {flag} must be >= {least}; got {flag} {value}")


def _default_hybrid(world: int) -> tuple[int, int] | None:
    """Method hybrid's default [a2a, p2p] = [2, N/2], for an even N >= 4 (else None)."""
    return (2, world // 2) if world >= 4 and world % 2 == 0 else None


def _cells(cfg, notes: list[str]):
    """Every cell of the matrix (ctxpar methods, then runnable peers), in run order."""
    from ctxpar import LAYOUTS
    from ctxpar.apps.bench.peers import PEERS, peer_layout, peer_status

    layouts = list(LAYOUTS) if cfg.layouts == "all" else cfg.layouts.split(",")
    causals = {"both": (True, False), "yes": (True,), "no": (False,)}[cfg.causal]
    peers = [] if cfg.peers == "none" else (list(PEERS) if cfg.peers == "auto" else cfg.peers.split(","))
    shape = dict(batch=cfg.batch, heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim)
    worlds, lengths = parse_ints(cfg.worlds, "--worlds"), parse_ints(cfg.seq_lens, "--seq-lens")
    for w, s, dt, causal in itertools.product(worlds, lengths, cfg.dtypes.split(","), causals):
        base = dict(shape, world=w, seq_len=s, dtype=dt, causal=causal, peer=False, hybrid=None)
        if w == 1:  # every method and layout is the same local computation on one rank
            notes.append("N=1: one cell per case (every method and layout is the same local kernel call)")
            yield dict(base, method="ring", layout="contiguous")
            continue
        for m in cfg.methods.split(","):
            m, _, only = m.partition(":")  # "ring:zigzag": this method on this layout only
            hyb = None
            if m == "hybrid":
                hyb = tuple(parse_ints(cfg.hybrid_sizes, "--hybrid-sizes")) if cfg.hybrid_sizes else _default_hybrid(w)
                if hyb is None or hyb[0] * hyb[1] != w:
                    notes.append(f"hybrid skipped at N={w}: needs --hybrid-sizes a2a,p2p with a2a*p2p={w}")
                    continue
            if m in ("ulysses", "hybrid") and cfg.heads % (w if m == "ulysses" else hyb[0]):
                notes.append(f"{m} skipped at N={w}: {cfg.heads} heads do not split")
                continue
            for lay in [only] if only else layouts:
                yield dict(base, method=m, layout=lay, hybrid=hyb)
        for p in peers:
            why = peer_status(p, device=cfg.device, world=w, hq=cfg.heads, hkv=cfg.kv_heads)
            if why is None:
                yield dict(base, method=p, layout=peer_layout(p), peer=True)
            else:
                notes.append(f"peer {p} skipped at N={w}: {why}")


def _cores(cfg, world: int) -> int:
    return world if cfg.device == "cuda" else min(world, os.cpu_count() or 1)


def _summary(cell, res, single, ref, cfg) -> dict:
    """Aggregate the per-rank results of one cell into one row."""
    n = len(res)
    fwd = [max(r["fwd"][i] for r in res) for i in range(len(res[0]["fwd"]))]
    tot = [max(r["tot"][i] for r in res) for i in range(len(res[0]["tot"]))]
    cores = _cores(cfg, cell["world"])
    threads = sorted(t for t in single if t <= cores)
    ideal_f = min(t * statistics.median(single[t][0]) for t in threads) / cores
    ideal_t = min(t * statistics.median(single[t][1]) for t in threads) / cores
    row = dict(cell, fwd_s=statistics.median(fwd), fwd_spread_s=max(fwd) - min(fwd), fwd_times=fwd,
               tot_s=statistics.median(tot), tot_spread_s=max(tot) - min(tot), tot_times=tot,
               ideal_fwd_s=ideal_f, ideal_tot_s=ideal_t, cores=cores)
    row["eff_fwd"], row["eff_tot"] = ideal_f / row["fwd_s"], ideal_t / row["tot_s"]
    for key in ("fwd_recv", "fwd_sent", "bwd_recv", "bwd_sent", "saved_bytes"):
        row[key] = max(r[key] for r in res)
    th = theory_recv_bytes(cell) or (0, 0)
    row["theory_fwd"], row["theory_bwd"] = th
    counted = not cell["peer"]
    row["bytes_ratio"] = ((row["fwd_recv"] + row["bwd_recv"]) / sum(th)) if counted and sum(th) else (
        1.0 if counted else None)
    known = res[0]["compute"] is not None
    row["compute_s"] = statistics.mean(r["compute"] for r in res) if known else None
    row["blocked_s"] = statistics.mean(r["traced_wall"] - r["compute"] for r in res) if known else None
    row["traced_wall_s"] = max(r["traced_wall"] for r in res)
    row["ring_compute_s"] = [sum(e[4] - e[3] for e in r["events"] if e[2] == "compute") for r in res]
    row["ring_wait_s"] = [sum(e[4] - e[3] for e in r["events"] if e[2] == "wait") for r in res]
    row["events"] = [r["events"] for r in res]
    row["cuda_peak"] = max(r["cuda_peak"] for r in res) if res[0]["cuda_peak"] is not None else None
    if ref is not None:
        got = [torch.zeros_like(t, dtype=res[0]["tensors"][i].dtype) for i, t in enumerate(ref)]
        for r in res:
            for g, t in zip(got, r["tensors"]):
                g[:, r["positions"]] = t
        row.update(rel_errors(got, ref))
    return row


def _key(cell: dict) -> tuple:
    """What a cell's baseline and reference depend on: (S, dtype, causal)."""
    return cell["seq_len"], cell["dtype"], cell["causal"]


def _baselines(cfg, cells: list[dict], singles: dict, refs: dict) -> None:
    """Fill in the single-process baselines (``singles[key][threads]`` = fwd times, tot
    times, tensors) and float64 references (``refs[key]``) that ``cells`` still lack. Run
    before a world's ranks start, while no rank is busy."""
    for c in cells:
        single = singles.setdefault(_key(c), {})
        for t in sorted({1, _cores(cfg, c["world"])} if cfg.device == "cpu" else {1}):
            if t not in single:
                single[t] = single_process(c, t, cfg.warmup, cfg.repeats, cfg.device)
        if cfg.errors and _key(c) not in refs:
            refs[_key(c)] = reference(c)


def _cell_rows(cfg, pool, cells: list[dict], singles: dict, refs: dict, t_start: float) -> list[dict]:
    """Every cell of one world on its pool, one summary row each (printed as it ends)."""
    opts = dict(device=cfg.device, warmup=cfg.warmup, repeats=cfg.repeats, errors=cfg.errors)
    rows = []
    for c in cells:
        res = pool.run(rank_cell, c, opts, timeout=cfg.timeout)
        rows.append(_summary(c, res, singles[_key(c)], refs.get(_key(c)), cfg))
        print(f"[{time.perf_counter() - t_start:6.1f}s] N={c['world']} S={c['seq_len']} {c['method']}/"
              f"{c['layout']} {c['dtype']} causal={c['causal']}: fwd+bwd {rows[-1]['tot_s']:.4f}s "
              f"eff {rows[-1]['eff_tot']:.3f}", flush=True)
    return rows


def _layer_rows(cfg, pool, world: int) -> list[dict]:
    """Decoder-layer saved bytes per rank of every method on ``world`` ranks (hybrid only
    where the default [2, N/2] mesh exists)."""
    rows = []
    for m in dict.fromkeys(x.partition(":")[0] for x in cfg.methods.split(",")):
        hyb = _default_hybrid(world) if m == "hybrid" else None
        if m == "hybrid" and hyb is None:
            continue
        res = pool.run(rank_layer_memory, m, cfg.layer_seq_len, cfg.device, hyb, timeout=cfg.timeout)
        rows.append(dict(method=m, world=world, seq_len=cfg.layer_seq_len,
                         saved_bytes=max(r["saved_bytes"] for r in res), cuda_peak=res[0]["cuda_peak"]))
    return rows


def _single_summary(singles: dict, refs: dict) -> dict:
    """results.json's "single_process": median times (and errors) per case and threads."""
    return {f"S={key[0]} {key[1]} causal={key[2]}": {
        f"{t}_threads": {"fwd_s": statistics.median(v[0]), "tot_s": statistics.median(v[1]),
                         **(rel_errors(v[2], refs[key]) if key in refs else {})}
        for t, v in single.items()} for key, single in singles.items()}


def _write(cfg, result: dict) -> None:
    """results.json, the Markdown table on stdout and (unless --no-plots) the plots."""
    from ctxpar.apps.bench.plots import markdown_table, plot_scaling, plot_timeline

    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(markdown_table(result))
    if cfg.plots:
        for path in (plot_timeline(result, os.path.join(cfg.out, "timeline.png")),
                     plot_scaling(result, os.path.join(cfg.out, "scaling.png"))):
            print(f"wrote {path}")
    print(f"wrote {os.path.join(cfg.out, 'results.json')} ({result['elapsed_s']:.0f} s)")


def run(args) -> int:
    """Entry point of ``ctxpar bench``: every world's cells on one pool of that world."""
    from ctxpar.apps.cli import writable_dir
    from ctxpar.apps.launch import RankPool

    if args.million:  # one training step at a million tokens: ctxpar.apps.bench.million
        from ctxpar.apps.bench.million import run_million

        return run_million(args)
    cfg = _resolve(args)
    _check_counts(cfg)
    writable_dir(cfg.out, "bench")
    notes: list[str] = []
    cells = list(_cells(cfg, notes))
    layer_worlds = parse_ints(cfg.layer_worlds, "--layer-worlds")
    singles: dict = {}
    refs: dict = {}
    rows, layer_rows = [], []
    t_start = time.perf_counter()
    ngpu = torch.cuda.device_count() if cfg.device == "cuda" else 0
    for w in sorted({c["world"] for c in cells} | {x for x in layer_worlds if x > 1}):
        if cfg.device == "cuda" and w > ngpu:
            notes.append(f"N={w} skipped: needs one GPU per rank ({ngpu} GPU(s))")
            continue
        w_cells = [c for c in cells if c["world"] == w]
        _baselines(cfg, w_cells, singles, refs)
        backend = "nccl" if cfg.device == "cuda" else "gloo"
        with RankPool(w, backend=backend, threads=1, collective_timeout_s=cfg.timeout) as pool:
            rows += _cell_rows(cfg, pool, w_cells, singles, refs, t_start)
            if w in layer_worlds and w > 1:
                layer_rows += _layer_rows(cfg, pool, w)
    if 1 in layer_worlds:  # a world of one, in this process (no torch.distributed needed)
        r1 = rank_layer_memory("ring", cfg.layer_seq_len, cfg.device)
        layer_rows.insert(0, dict(method="(any)", world=1, seq_len=cfg.layer_seq_len, **r1))
    _write(cfg, {"config": dict(vars(cfg)), "machine": _machine(cfg),
                 "single_process": _single_summary(singles, refs), "cells": rows,
                 "layer_memory": layer_rows, "notes": notes,
                 "elapsed_s": time.perf_counter() - t_start})
    return 0


def _machine(cfg) -> dict:
    info = {"cpus": os.cpu_count(), "torch": torch.__version__, "device": cfg.device}
    if cfg.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info
