"""``ctxpar plan --validate``: the planner predicts every cell of a ``ctxpar bench`` run
from this machine's profile, and prints predicted and measured side by side.

A cell is one ``ctxpar.attention`` call (method x layout x world x length x dtype x
causal) timed fwd and fwd+bwd on local ranks; its prediction is
:func:`ctxpar.apps.plan.cost.attention_time` of the same shapes with every rank on this
machine (the profile's measured contention for that many ranks). Peer libraries' cells
are not ctxpar's schedules and are left out.
"""
from __future__ import annotations

import argparse
import json
import sys
import os
import tempfile

from ctxpar.apps.plan.cost import attention_time
from ctxpar.apps.plan.rates import Rates
from ctxpar.apps.plan.specs import ModelSpec, RunSpec
from ctxpar.apps.plan.work import CPChoice

__all__ = ["cell_specs", "predict_cell", "validate_rows", "run_bench", "format_rows", "TOLERANCE", "default_cells",
           "measure_tracked"]

TOLERANCE = 0.20


def cell_specs(cell: dict) -> tuple[ModelSpec, RunSpec, CPChoice]:
    """A bench cell (one ``ctxpar.attention`` call's shapes, method and layout) as the
    planner's model, run and CP choice."""
    h, d = cell["heads"], cell["head_dim"]
    model = ModelSpec("bench", 1, h * d, h, cell["kv_heads"], 1, 1, head_dim=d)
    run = RunSpec(cell["seq_len"], batch=cell["batch"], dtype=cell["dtype"], causal=cell["causal"])
    n, m = cell["world"], cell["method"]
    if m == "hybrid":
        a2a, p2p = cell["hybrid"]
    elif m == "ulysses":
        a2a, p2p = n, 1
    else:
        a2a, p2p = 1, n
    return model, run, CPChoice(m, a2a, p2p, cell["layout"])


def predict_cell(cell: dict, rates: Rates) -> tuple[float, float]:
    """Predicted (fwd, fwd+bwd) seconds of one bench cell."""
    fwd, bwd = attention_time(*cell_specs(cell), rates, local_ranks=cell["world"])
    return fwd, fwd + bwd


def validate_rows(results: dict, rates: Rates) -> list[dict]:
    """One row per ctxpar cell of a bench ``results.json``: predicted, measured, ratio."""
    rows = []
    for c in results["cells"]:
        if c.get("peer"):
            continue
        p_fwd, p_tot = predict_cell(c, rates)
        rows.append(dict(world=c["world"], seq_len=c["seq_len"], method=c["method"], layout=c["layout"],
                         hybrid=c.get("hybrid"), dtype=c["dtype"], pred_fwd=p_fwd, meas_fwd=c["fwd_s"],
                         pred_tot=p_tot, meas_tot=c["tot_s"], spread_tot=c.get("tot_spread_s"),
                         ratio=p_tot / c["tot_s"], ok=abs(p_tot / c["tot_s"] - 1) <= TOLERANCE))
    return rows


def run_bench(out_dir: str | None = None, extra: list[str] | None = None) -> dict:
    """Run ``ctxpar bench`` with its default matrix (no peers, no plots, no float64
    checks) and return its results."""
    from ctxpar.apps.bench import run as bench

    out_dir = out_dir or tempfile.mkdtemp(prefix="ctxpar-validate-")
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--peers", "none", "--no-plots", "--no-errors", "--out", out_dir] + (extra or []))
    bench.run(args)
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def default_cells() -> list[dict]:
    """The ctxpar cells of ``ctxpar bench``'s default matrix (its own flag defaults):
    N = 1 once per case, every method x layout at N > 1, hybrid [2, N/2] at even N >= 4."""
    from ctxpar.apps.bench import run as bench
    from ctxpar.apps.cli import parse_ints

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    cfg = p.parse_args([])
    shape = dict(batch=cfg.batch, heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                 causal=cfg.causal != "no", peer=False, hybrid=None)
    cells = []
    for w in parse_ints(cfg.worlds, "--worlds"):
        for s in parse_ints(cfg.seq_lens, "--seq-lens"):
            for dt in cfg.dtypes.split(","):
                base = dict(shape, world=w, seq_len=s, dtype=dt)
                if w == 1:
                    cells.append(dict(base, method="ring", layout="contiguous"))
                    continue
                for m in cfg.methods.split(","):
                    hyb = (2, w // 2) if m == "hybrid" else None
                    if (m == "hybrid" and (w < 4 or w % 2)) or (
                            m in ("ulysses", "hybrid") and cfg.heads % (hyb[0] if hyb else w)):
                        continue
                    cells += [dict(base, method=m, layout=lay, hybrid=hyb) for lay in cfg.layouts.split(",")]
    return cells


def measure_tracked(rates: Rates, cells: list[dict], *, warmup: int = 1, repeats: int = 5) -> list[dict]:
    """Run every cell as ``ctxpar bench`` does (its :func:`rank_cell`, one thread per
    rank) and predict it twice: from the profile as calibrated, and with the machine's
    speed measured around the cell (a fixed probe, before and after: this process alone,
    then every rank at once), since other users' load changes several-fold within
    minutes. The probe scales compute only; communication keeps the profile's rates."""
    import dataclasses
    import statistics

    from ctxpar.apps.bench.cells import rank_cell
    from ctxpar.apps.launch import RankPool
    from ctxpar.apps.plan.calibrate import probe, rank_probe

    if not rates.probe_s:
        raise ValueError("the profile has no probe time (probe_s): recalibrate with ctxpar plan --calibrate")
    opts = dict(device="cpu", warmup=warmup, repeats=repeats, errors=False)
    rows = []
    for world in sorted({c["world"] for c in cells}):
        with RankPool(world, threads=1) as pool:
            for c in (c for c in cells if c["world"] == world):
                alone, together = _probes(pool, world, probe, rank_probe)
                res = pool.run(rank_cell, c, opts, timeout=600)
                after = _probes(pool, world, probe, rank_probe)  # the load drifts: both sides
                alone, together = (alone + after[0]) / 2, (together + after[1]) / 2
                now = dataclasses.replace(rates, load=alone / rates.probe_s,
                                          slowdown={str(world): together / alone})
                tot = [max(r["tot"][i] for r in res) for i in range(len(res[0]["tot"]))]
                fwd = [max(r["fwd"][i] for r in res) for i in range(len(res[0]["fwd"]))]
                meas = dict(c, fwd_s=statistics.median(fwd), tot_s=statistics.median(tot),
                            tot_spread_s=max(tot) - min(tot))
                row = validate_rows({"cells": [meas]}, now)[0]
                row["pred_tot_static"] = predict_cell(c, rates)[1]
                row["load"], row["slowdown"] = now.load, together / alone
                rows.append(row)
                print(f"N={world} S={c['seq_len']} {c['method']}/{c['layout']}: predicted "
                      f"{row['pred_tot']:.4f} s, measured {row['meas_tot']:.4f} s (load x{now.load:.2f}, "
                      f"{world} ranks x{row['slowdown']:.2f})", file=sys.stderr, flush=True)
    return rows


def _probes(pool, world: int, probe, rank_probe) -> tuple[float, float]:
    """(this process alone, the slowest of ``world`` ranks at once) probe seconds."""
    alone = probe()
    return alone, (max(pool.run(rank_probe)) if world > 1 else alone)


def format_rows(rows: list[dict]) -> str:
    tracked = "load" in rows[0] if rows else False
    extra = " profile-only pred s | load x slowdown |" if tracked else ""
    head = ("| N | S | method | layout | pred fwd s | meas fwd s | pred fwd+bwd s | meas fwd+bwd s "
            f"| spread s | pred/meas | within ±20% |{extra}\n|---|---|---|---|---|---|---|---|---|---|---|"
            + ("---|---|" if tracked else ""))
    lines = [head]
    for r in rows:
        m = r["method"] + (f" {list(r['hybrid'])}" if r["hybrid"] else "")
        spread = "" if r["spread_tot"] is None else f"{r['spread_tot']:.4f}"
        lines.append(f"| {r['world']} | {r['seq_len']} | {m} | {r['layout']} | {r['pred_fwd']:.4f} | "
                     f"{r['meas_fwd']:.4f} | {r['pred_tot']:.4f} | {r['meas_tot']:.4f} | {spread} | "
                     f"{r['ratio']:.2f} | {'yes' if r['ok'] else 'NO'} |"
                     + (f" {r['pred_tot_static']:.4f} | {r['load']:.2f} x {r['slowdown']:.2f} |" if tracked else ""))
    ok = sum(r["ok"] for r in rows)
    lines.append(f"\n{ok} of {len(rows)} cells within ±{TOLERANCE:.0%} (fwd+bwd)")
    return "\n".join(lines)
