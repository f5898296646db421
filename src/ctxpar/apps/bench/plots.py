"""Rendering of ``ctxpar bench`` results: the Markdown table and the two plots.

- :func:`markdown_table`: the single-process baselines, one row per cell (times,
  efficiency, bytes against theory, compute vs blocked, saved bytes, error vs float64),
  the decoder-layer memory per rank, and the notes (skipped cells and peers).
- :func:`plot_timeline`: per-rank timeline of the ring steps of one traced fwd+bwd
  (``ctxpar.observe.trace.ring_trace``): a bar per step, compute (fwd / bwd) and waiting.
- :func:`plot_scaling`: efficiency against world size and against sequence length, and
  activation memory per rank against world size (decoder layer and attention alone).

Plots need matplotlib (the ``bench`` extra); it is imported only here, with the Agg backend.
"""
from __future__ import annotations

__all__ = ["markdown_table", "plot_timeline", "plot_scaling"]

_MiB = 2 ** 20


def _label(r: dict) -> str:
    if r["peer"]:
        return f"{r['method']} (peer)"
    hyb = f"{list(r['hybrid'])}" if r.get("hybrid") else ""
    return f"{r['method']}{hyb}"


def _fmt(x, spec=".3f", none="n/a") -> str:
    return none if x is None else format(x, spec)


def markdown_table(result: dict) -> str:
    """The whole report as Markdown."""
    cells, out = result["cells"], []
    c = result["config"]
    out.append(f"\n## ctxpar bench: B={c['batch']} Hq={c['heads']} Hkv={c['kv_heads']} D={c['head_dim']}, "
               f"{result['machine']}")
    out.append("\nSingle process, torch fused attention over the whole sequence (median):\n")
    out.append("| case | threads | fwd (s) | fwd+bwd (s) | err out / grad vs fp64 |\n|---|---|---|---|---|")
    for case, per in result["single_process"].items():
        for t, v in per.items():
            out.append(f"| {case} | {t.split('_')[0]} | {v['fwd_s']:.4f} | {v['tot_s']:.4f} | "
                       f"{_fmt(v.get('err_out'), '.1e')} / {_fmt(v.get('err_grad'), '.1e')} |")
    out.append("\nEfficiency = ideal ÷ CP time, ideal = min_T(T·t_single(T)) / cores used. Bytes: received "
               "per rank, fwd+bwd, measured (theory). Compute/blocked: one extra profiled fwd+bwd, "
               "mean over ranks. Saved: bytes saved for backward, max over ranks.\n")
    out.append("| method | layout | N | S | dtype | causal | fwd s (spread) | fwd+bwd s (spread) | eff fwd "
               "| eff fwd+bwd | MiB recv/rank (theory) | meas/theory | compute / blocked s | saved MiB/rank "
               "| CUDA peak MiB | err out / grad |")
    out.append("|" + "---|" * 16)
    for r in cells:
        meas = "n/c" if r["peer"] else f"{(r['fwd_recv'] + r['bwd_recv']) / _MiB:.2f}"
        out.append(
            f"| {_label(r)} | {r['layout']} | {r['world']} | {r['seq_len']} | {r['dtype']} | "
            f"{'yes' if r['causal'] else 'no'} | {r['fwd_s']:.4f} ({r['fwd_spread_s']:.4f}) | "
            f"{r['tot_s']:.4f} ({r['tot_spread_s']:.4f}) | {r['eff_fwd']:.3f} | {r['eff_tot']:.3f} | "
            f"{meas} ({(r['theory_fwd'] + r['theory_bwd']) / _MiB:.2f}) | {_fmt(r['bytes_ratio'], '.4f')} | "
            f"{_fmt(r['compute_s'])} / {_fmt(r['blocked_s'])} | {r['saved_bytes'] / _MiB:.2f} | "
            f"{_fmt(r['cuda_peak'] and r['cuda_peak'] / _MiB, '.0f')} | "
            f"{_fmt(r.get('err_out'), '.1e')} / {_fmt(r.get('err_grad'), '.1e')} |")
    rings = [r for r in cells if any(r["ring_wait_s"])]
    if rings:
        out.append("\nRing steps (ctxpar.observe.trace, traced run): compute / wait seconds per rank\n")
        out.append("| method | layout | N | S | causal | per rank compute / wait (s) |\n|---|---|---|---|---|---|")
        for r in rings:
            per = ", ".join(f"r{i}: {c_:.3f}/{w_:.3f}" for i, (c_, w_) in
                            enumerate(zip(r["ring_compute_s"], r["ring_wait_s"])))
            out.append(f"| {_label(r)} | {r['layout']} | {r['world']} | {r['seq_len']} | "
                       f"{'yes' if r['causal'] else 'no'} | {per} |")
    if result["layer_memory"]:
        n1 = {r["seq_len"]: r["saved_bytes"] for r in result["layer_memory"] if r["world"] == 1}
        out.append("\nDecoder layer (RMSNorm, q/k/v/o, RoPE, attention, SwiGLU MLP; hidden 256, 8 q / 2 kv "
                   "heads), activation memory per rank at a fixed global S:\n")
        out.append("| method | N | S | saved MiB/rank | × of N=1 | CUDA peak MiB |\n|---|---|---|---|---|---|")
        for r in result["layer_memory"]:
            ratio = r["saved_bytes"] / n1[r["seq_len"]] if r["seq_len"] in n1 else None
            out.append(f"| {r['method']} | {r['world']} | {r['seq_len']} | {r['saved_bytes'] / _MiB:.2f} | "
                       f"{_fmt(ratio)} | {_fmt(r['cuda_peak'] and r['cuda_peak'] / _MiB, '.0f')} |")
    if result["notes"]:
        out.append("\nNotes:\n" + "\n".join(f"- {n}" for n in dict.fromkeys(result["notes"])))
    return "\n".join(out)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


_COLORS = {("fwd", "compute"): "tab:blue", ("bwd", "compute"): "tab:green",
           ("fwd", "wait"): "tab:red", ("bwd", "wait"): "tab:orange"}


def plot_timeline(result: dict, path: str) -> str:
    """Per-rank bars of the ring steps of the traced run, for the ring cells of the largest
    world and length (causal first): one panel per layout."""
    plt = _plt()
    traced = [r for r in result["cells"] if any(r["events"]) and r["world"] > 1]
    if traced:
        key = max((r["world"], r["seq_len"], r["causal"]) for r in traced)
        traced = [r for r in traced if (r["world"], r["seq_len"], r["causal"]) == key
                  and r["dtype"] == traced[0]["dtype"]][:4]
    fig, axes = plt.subplots(max(1, len(traced)), 1, figsize=(11, 1.2 + 1.1 * sum(
        r["world"] for r in traced) if traced else 3), squeeze=False)
    if not traced:
        axes[0][0].text(0.5, 0.5, "no ring-based cell with N > 1 in this run", ha="center")
    for ax, r in zip(axes[:, 0], traced):
        t0 = min(e[3] for ev in r["events"] for e in ev)
        for rank, ev in enumerate(r["events"]):
            for phase, step, kind, a, b in ev:
                ax.barh(rank, (b - a) * 1e3, left=(a - t0) * 1e3, height=0.6 if kind == "compute" else 0.3,
                        color=_COLORS[(phase, kind)], edgecolor="black", linewidth=0.3)
                if kind == "compute" and (b - a) * 1e3 > 0.04 * ax.get_xlim()[1]:
                    ax.text((a + b - 2 * t0) / 2 * 1e3, rank, f"{phase[0]}{step}", ha="center",
                            va="center", fontsize=7, color="white")
        waits = ", ".join(f"{w:.3f}" for w in r["ring_wait_s"])
        comps = ", ".join(f"{c:.3f}" for c in r["ring_compute_s"])
        ax.set_title(f"{_label(r)} {r['layout']}: N={r['world']} S={r['seq_len']} {r['dtype']} "
                     f"causal={r['causal']} — compute per rank [{comps}] s, wait [{waits}] s", fontsize=9)
        ax.set_yticks(range(r["world"]), [f"rank {i}" for i in range(r["world"])])
        ax.invert_yaxis()
        ax.set_xlabel("ms since the start of the traced fwd+bwd")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    fig.legend(handles, [f"{p} {k}" for p, k in _COLORS], loc="upper right", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(rows, x: str):
    out: dict = {}
    for r in sorted(rows, key=lambda r: r[x]):
        out.setdefault(f"{_label(r)} {r['layout']}", ([], []))
        out[f"{_label(r)} {r['layout']}"][0].append(r[x])
    return out


def plot_scaling(result: dict, path: str) -> str:
    """Efficiency vs world size and vs length; saved MiB per rank vs world size."""
    plt = _plt()
    cells = result["cells"]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    if cells:
        causal = any(r["causal"] for r in cells)
        pick = [r for r in cells if r["causal"] == causal and r["dtype"] == cells[0]["dtype"]]
        s_max, w_max = max(r["seq_len"] for r in pick), max(r["world"] for r in pick)
        panels = [(ax[0][0], [r for r in pick if r["seq_len"] == s_max], "world", "eff_tot",
                   f"fwd+bwd efficiency vs N (S={s_max}, causal={causal})"),
                  (ax[0][1], [r for r in pick if r["world"] == w_max], "seq_len", "eff_tot",
                   f"fwd+bwd efficiency vs S (N={w_max}, causal={causal})"),
                  (ax[1][1], [r for r in pick if r["seq_len"] == s_max], "world", "saved_bytes",
                   f"attention alone: saved MiB per rank vs N (S={s_max})")]
        for a, rows, x, y, title in panels:
            # N=1 is one cell (every method is the same local call): it starts every line.
            one = [r for r in rows if r["world"] == 1] if x == "world" else []
            multi = [r for r in rows if r not in one] or rows
            for name, _ in _series(multi, x).items():
                pts = sorted((r[x], r[y] / (2 ** 20 if y == "saved_bytes" else 1)) for r in multi + one
                             if f"{_label(r)} {r['layout']}" == name or r in one)
                a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            a.set_title(title, fontsize=10)
            a.set_xlabel(x)
            if y == "eff_tot":
                a.axhline(1.0, color="grey", ls=":", lw=1)
                a.set_ylabel("ideal / CP time")
            else:
                a.set_ylabel("MiB per rank")
            if x == "world":
                a.set_xscale("log", base=2)
            xs = sorted({r[x] for r in rows})
            a.set_xticks(xs, [str(v) for v in xs])
            a.legend(fontsize=7)
    layer = result["layer_memory"]
    a = ax[1][0]
    if layer:
        n1 = next((r["saved_bytes"] for r in layer if r["world"] == 1), None)
        for m in dict.fromkeys(r["method"] for r in layer if r["world"] > 1):
            pts = sorted((r["world"], r["saved_bytes"] / 2 ** 20) for r in layer
                         if r["method"] == m or r["world"] == 1)
            a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ws = sorted({r["world"] for r in layer})
        if n1:
            a.plot(ws, [n1 / w / 2 ** 20 for w in ws], "k:", label="N=1 / N (ideal)")
        a.set_xscale("log", base=2)
        a.set_xticks(ws, [str(w) for w in ws])
        a.legend(fontsize=7)
    a.set_title(f"decoder layer: saved MiB per rank vs N (global S={layer[0]['seq_len'] if layer else '-'})",
                fontsize=10)
    a.set_xlabel("world")
    a.set_ylabel("MiB per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
