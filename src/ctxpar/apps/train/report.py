"""The report of ``ctxpar train``: the printed summary, ``metrics.json`` and the loss curve."""
from __future__ import annotations

import json
import math
import os

__all__ = ["summary", "write_outputs", "tokens_per_s"]


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def _duration(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m else f"{s:.1f}s"


def tokens_per_s(metrics: dict) -> dict:
    """Throughput: over all steps (tokens / summed step time, the first step excluded as
    warm-up) and over the steps at the full sequence length."""
    h = metrics["history"]
    full = metrics["config"]["seq_len"]
    rows = list(zip(h["seq_len"], h["tokens"], h["step_s"]))
    rows = rows[1:] or rows
    at_full = [r for r in rows if r[0] == full]

    def rate(r):
        return sum(n for _, n, _ in r) / max(sum(t for *_, t in r), 1e-9) if r else float("nan")

    return {"overall": rate(rows), "full_length": rate(at_full)}


def summary(m: dict) -> str:
    """The human-readable summary printed at the end of ``ctxpar train``."""
    c, t, eq = m["config"], m["task"], m["equivalence"]
    method = f"hybrid (hcp a2a={c['hcp'][0]} p2p={c['hcp'][1]})" if c["hcp"] else c["method"]
    tps = tokens_per_s(m)
    h = m["history"]
    lines = [
        "",
        "=" * 72,
        f"ctxpar train: {m['world']} ranks ({m.get('launcher', 'local')}, {c['device']}), "
        f"method={method}, layout={c['layout']}, {c['dtype']}",
        f"model: Llama, {c['layers']} layers, hidden {c['hidden']}, {c['heads']} heads "
        f"({c['kv_heads']} kv), {m['params'] / 1e6:.2f} M parameters"
        + (f", In-Place TTT in layers {list(c['ttt_layers'] or [c['layers'] - 1])}" if c["ttt"] else ""),
        f"task: key-value recall, {t['keys']} keys x {t['values']} values, {t['queries']} "
        f"queries per {c['seq_len']}-token sequence; chance {t['chance']:.1%}",
        f"training: {c['steps']} steps of {c['batch_size'] * c['seq_len']} tokens (length "
        f"warm-up {min(h['seq_len'])}..{max(h['seq_len'])}); last step: loss "
        f"{h['loss'][-1]:.4f}, accuracy {h['acc'][-1]:.1%}",
        "",
        f"recall accuracy (held-out, full length): {m['recall_accuracy']:.1%} of "
        f"{m['queries']} queries (chance {t['chance']:.1%})",
        f"  answer held by another rank:           {m['cross_rank_accuracy']:.1%} of "
        f"{m['cross_rank_queries']} queries",
        f"throughput: {tps['full_length']:,.0f} tokens/s at full length "
        f"({tps['overall']:,.0f} tokens/s over all steps)",
        "activation memory (saved tensors, full-length step): "
        + ", ".join(f"rank {r} {_mib(b)}" for r, b in enumerate(m["activation_bytes_per_rank"]))
        + (f"; single process {_mib(eq['single_activation_bytes'])}"
           if "single_activation_bytes" in eq else ""),
    ]
    if eq:
        lines += [
            "",
            f"equivalence check (initial weights, one {eq['seq_len']}-token batch; single "
            f"process = SDPA on the full sequence):",
            f"  {'':12s} {'CP':>16s} {'single process':>16s} {'rel. diff':>10s}",
            f"  {'loss':12s} {eq['cp_loss']:16.10f} {eq['single_loss']:16.10f} "
            f"{eq['loss_rel_diff']:10.2e}",
            f"  {'grad norm':12s} {eq['cp_grad_norm']:16.10f} {eq['single_grad_norm']:16.10f} "
            f"{eq['grad_norm_rel_diff']:10.2e}",
            f"  worst parameter gradient: {eq['max_param_grad_rel_diff']:.2e} "
            f"({eq['worst_param']})",
            f"  -> {'PASS' if eq['passed'] else 'FAIL'} (tolerance {eq['tolerance']:.0e} for "
            f"{c['dtype']})",
        ]
    else:
        lines.append("equivalence check: skipped (--no-equivalence)")
    if m.get("saved"):
        saved = m["saved"]
        lines.append(f"model: {saved}" if saved.startswith("not saved") else
                     f"model saved to {saved} (try: ctxpar generate --model {saved})")
    if "wall_s" in m:
        lines.append(f"wall time: {_duration(m['wall_s'])}")
    lines.append("=" * 72)
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_outputs(metrics: dict, out_dir: str) -> list[str]:
    """Write ``metrics.json`` and (with matplotlib) ``loss_curve.png``; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    data = dict(metrics)
    data["tokens_per_s"] = tokens_per_s(metrics)
    path = os.path.join(out_dir, "metrics.json")
    with open(path, "w") as f:
        json.dump(_jsonable(data), f, indent=2)
    written = [path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    h = metrics["history"]
    steps = range(1, len(h["loss"]) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, h["loss"], label="loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax2 = ax.twinx()
    ax2.plot(steps, h["acc"], label="recall accuracy", color="tab:orange", alpha=0.7)
    ax2.axhline(metrics["task"]["chance"], color="gray", ls=":", label="chance")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1)
    c = metrics["config"]
    ax.set_title(f"ctxpar train: {metrics['world']} ranks, {c['method']}/{c['layout']}, "
                 f"seq {c['seq_len']}")
    fig.legend(loc="center right", bbox_to_anchor=(0.88, 0.5))
    fig.tight_layout()
    png = os.path.join(out_dir, "loss_curve.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    written.append(png)
    return written
