"""``ctxpar plan``: pick the CP method, [a2a, p2p] and layout for a model, a sequence
length and a cluster, and predict step time and memory per device (no recomputation).

Modes: plan (default; a ranked table and a recommendation, ``--json`` for scripts),
``--calibrate --out profile.json`` (measure this machine), ``--validate`` (predict every
cell of ``ctxpar bench``'s default matrix from a profile and measure them side by side).
A bad request prints one line saying why and exits 2 (nothing fits: exits 3).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ctxpar.apps.cli import parse_ints

__all__ = ["add_arguments", "run"]

GIB = 1 << 30

EXAMPLES = """examples:
  ctxpar plan --model llama3-8b --seq-len 1048576 --nodes 8 --per-node 8 --device h100
  ctxpar plan --model path/to/config.json --seq-len 131072 --window 4096 --nodes 2 --device h200 --json
  ctxpar plan --calibrate --out profile.json          # measure this machine (about a minute)
  ctxpar plan --model tiny --seq-len 1048576 --window 4096 --ttt-layers 0 --dtype float32 \\
      --nproc 4 --profile profile.json --method ring --layout contiguous
  ctxpar plan --validate --profile profile.json      # predicted vs measured ctxpar bench cells

Exit status: 0 a plan that fits; 2 a bad request (one line says why, e.g. heads not
divisible by a2a); 3 nothing fits without recomputation (says by how many GiB).
Left out of the model: pipeline parallelism, TP's own communication and sequence-parallel
norms, the optimizer step's time, DP gradient traffic beyond what overlaps the backward."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    a = p.add_argument_group("model and run").add_argument
    a("--model", default="llama3-8b", help="preset (llama3-8b, llama3-70b, llama3-405b, llama2-7b, "
      "qwen3-4b, qwen3-8b, qwen3-14b, tiny) or an HF config.json path (default: llama3-8b)")
    a("--seq-len", type=int, default=131072, help="tokens per sequence (default 131072)")
    a("--batch", type=int, default=1, help="sequences per CP group per step (default 1)")
    a("--dtype", default="bfloat16", help="bfloat16 (default), float16, float32, float64")
    a("--no-causal", dest="causal", action="store_false", help="bidirectional attention")
    a("--window", type=int, default=0, help="causal sliding window in tokens (0: none)")
    a("--docs", default="", help="packed document lengths, comma separated (sum = --seq-len)")
    a("--ttt-layers", default="", help="In-Place TTT layer indices, comma separated (e.g. 0,6,12)")
    a("--prefill", action="store_true", help="one forward prefill instead of a training step")
    a("--sharding", default="fsdp", choices=("fsdp", "replicated"),
      help="parameters, gradients and Adam state: FSDP over dp x cp (default) or replicated")
    c = p.add_argument_group("cluster").add_argument
    c("--nodes", type=int, default=1, help="nodes (default 1)")
    c("--per-node", type=int, default=8, help="devices per node (default 8)")
    c("--device", default="h100", help="device preset: h100 (default), h200, b200, a100")
    c("--profile", help="a calibrated profile (ctxpar plan --calibrate) instead of a preset")
    c("--nproc", type=int, help="local ranks on this machine (one node of N; with --profile)")
    c("--tp", type=int, default=1, help="tensor-parallel degree inside a node (divides heads, weights)")
    s = p.add_argument_group("search").add_argument
    s("--methods", default="ring,allgather,ulysses,hybrid", help="methods to consider")
    s("--layouts", default="zigzag,contiguous", help="layouts to consider")
    s("--cp", type=int, help="CP degree (default: every divisor of the devices; the rest is DP)")
    s("--method", help="evaluate only this method (with --hcp for hybrid)")
    s("--hcp", type=int, nargs=2, metavar=("A2A", "P2P"), help="hybrid's [a2a, p2p]")
    s("--layout", help="evaluate only this layout")
    s("--top", type=int, default=10, help="rows of the table (default 10)")
    s("--json", action="store_true", help="print JSON instead of the table")
    m = p.add_argument_group("calibration and validation").add_argument
    m("--calibrate", action="store_true", help="measure this machine; write --out")
    m("--out", default="profile.json", help="profile path for --calibrate (default profile.json)")
    m("--on", default="cpu", choices=("cpu", "cuda"), help="--calibrate on CPU ranks or one GPU per rank")
    m("--worlds", default="2,4", help="--calibrate: local rank counts to measure (default 2,4)")
    m("--validate", action="store_true", help="predict and measure ctxpar bench's default matrix")
    m("--bench-results", help="--validate against this bench results.json instead of running the bench")
    m("--bench-out", help="--validate --static: keep the bench's results.json in this folder")
    m("--repeats", type=int, default=5, help="--validate: timed runs per cell (default 5, as ctxpar bench)")
    m("--static", action="store_true", help="--validate: run ctxpar bench itself and predict from the "
      "profile alone (default: run its cells with the machine's speed probed before each)")


def _inputs(args):
    """(model, run, cluster, rates, local_ranks) from the flags; ValueErrors name values."""
    from ctxpar.apps.plan.rates import load_profile, preset_rates
    from ctxpar.apps.plan.specs import ClusterSpec, RunSpec, get_device, get_model

    model = get_model(args.model)
    ttt = tuple(parse_ints(args.ttt_layers, "--ttt-layers"))
    bad = [i for i in ttt if not 0 <= i < model.layers]
    if bad:
        raise ValueError(f"--ttt-layers {list(bad)} outside the model's {model.layers} layers")
    run = RunSpec(args.seq_len, batch=args.batch, dtype=args.dtype, causal=args.causal,
                  window=args.window, docs=tuple(parse_ints(args.docs, "--docs")), ttt_layers=ttt,
                  prefill=args.prefill, sharding=args.sharding)
    if args.nproc is not None:
        if not args.profile:
            raise ValueError("--nproc plans local ranks on this machine: it needs --profile "
                             "(make one with ctxpar plan --calibrate --out profile.json)")
        cluster = ClusterSpec(1, args.nproc, args.tp)
    else:
        cluster = ClusterSpec(args.nodes, args.per_node, args.tp)
    rates = load_profile(args.profile) if args.profile else preset_rates(get_device(args.device))
    return model, run, cluster, rates, (args.nproc if args.nproc is not None else None)


def _only(args, model, cluster):
    """The one configuration of --method/--hcp/--layout, checked, or None."""
    from ctxpar.apps.plan.search import check_choice
    from ctxpar.apps.plan.work import CPChoice

    if not args.method:
        if args.hcp:
            raise ValueError("--hcp A2A P2P goes with --method hybrid")
        return None
    devices = args.cp or cluster.world // cluster.tp
    if args.method == "hybrid":
        if not args.hcp:
            raise ValueError("--method hybrid needs --hcp A2A P2P")
        a2a, p2p = args.hcp
    elif args.method == "ulysses":
        a2a, p2p = devices, 1
    else:
        a2a, p2p = 1, devices
    choice = CPChoice(args.method, a2a, p2p, args.layout or "zigzag")
    why = check_choice(model, cluster, choice)
    if why:
        raise ValueError(why)
    return choice


def _row(e) -> dict:
    c = e.choice
    return {"method": c.method, "a2a": c.a2a, "p2p": c.p2p, "layout": c.layout, "cp": c.size,
            "dp": e.dp, "tp": e.tp, "step_s": e.step_s, "fwd_s": e.fwd_s, "bwd_s": e.bwd_s,
            "attention_s": e.attn_s, "attention_comm_exposed_s": e.attn_comm_exposed_s,
            "linear_s": e.linear_s, "elementwise_s": e.other_s,
            "tokens_per_s_per_device": e.tokens_per_s_per_device, "mfu": e.mfu,
            "model_tflops_per_device": e.mfu * e.peak_flops / 1e12,
            "memory_bytes": e.memory, "peak_bytes": e.peak_bytes, "capacity_bytes": e.capacity,
            "fits_without_recomputation": e.fits}


def _table(ests, top: int) -> str:
    lines = ["| # | method | [a2a, p2p] | layout | CP | DP | step s | tok/s/dev | TFLOP/s/dev | MFU "
             "| mem/dev GiB | fits |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, e in enumerate(ests[:top]):
        c = e.choice
        fits = "yes" if e.fits else f"no (+{e.short_by / GIB:.1f} GiB)"
        lines.append(f"| {i + 1} | {c.method} | [{c.a2a}, {c.p2p}] | {c.layout} | {c.size} | {e.dp} | "
                     f"{e.step_s:.4g} | {e.tokens_per_s_per_device:,.0f} | {e.mfu * e.peak_flops / 1e12:.4g} | "
                     f"{e.mfu:.1%} | "
                     f"{e.peak_bytes / GIB:.2f} | {fits} |")
    return "\n".join(lines)


def recommendation(e, cluster, run) -> str:
    """The code and the launch command of estimate ``e``."""
    c = e.choice
    win = f", window=({run.window}, 0)" if run.window else ""
    if c.method == "hybrid":
        mesh = f"ctxpar.cp_mesh([{c.a2a}, {c.p2p}])"
        if e.dp > 1 or e.tp > 1:
            mesh = (f'init_device_mesh("cuda", ({e.dp}, {c.p2p}, {c.a2a}, {e.tp}), mesh_dim_names=("dp", '
                    f'"ring", "ulysses", "tp"))["ring", "ulysses"]')
    elif e.dp == 1 and e.tp == 1:
        mesh = f"None  # WORLD is the CP group of {c.size}"
    else:
        mesh = (f'init_device_mesh("cuda", ({e.dp}, {c.size}, {e.tp}), '
                f'mesh_dim_names=("dp", "cp", "tp"))["cp"]')
    nodes, per = cluster.nodes, cluster.per_node
    launch = (f"torchrun --nnodes {nodes} --nproc-per-node {per} train.py" if nodes > 1 or per > 1
              else "python train.py")
    tp = f"# tensor parallelism of {e.tp} on the mesh's \"tp\" axis is the model's own, not ctxpar's\n" if e.tp > 1 else ""
    return (f"group = {mesh}\n{tp}"
            f'out = ctxpar.attention(q, k, v, group=group, method="{c.method}", layout="{c.layout}", '
            f"causal={run.causal}{win})\n"
            f'# or HF: register("ctxpar_cp", group=group, method="{c.method}", layout="{c.layout}")\n'
            f"{launch}")


def _plan(args) -> int:
    from ctxpar.apps.plan.cost import estimate
    from ctxpar.apps.plan.search import search

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    model, run, cluster, rates, local = _inputs(args)
    only = _only(args, model, cluster)
    if only is not None:
        ests, rejected = [estimate(model, run, only, rates, cluster, local_ranks=local)], []
    else:
        methods = tuple(args.methods.split(","))
        layouts = tuple((args.layout or args.layouts).split(","))
        ests, rejected = search(model, run, cluster, rates, methods=methods, layouts=layouts,
                                local_ranks=local, cp=args.cp)
    single = None
    if local is not None and local > 1 and only is not None:  # the same step in one process
        from ctxpar.apps.plan.specs import ClusterSpec
        from ctxpar.apps.plan.work import CPChoice
        single = estimate(model, run, CPChoice("ring", 1, 1, only.layout), rates, ClusterSpec(1, 1),
                          local_ranks=1)
    if not ests:
        reasons = "; ".join(sorted({r.reason for r in rejected}))[:600]
        raise ValueError(f"no configuration can run: {reasons}")
    best = ests[0]
    if args.json:
        print(json.dumps({"model": dataclasses.asdict(model), "run": dataclasses.asdict(run),
                          "cluster": dataclasses.asdict(cluster), "rates": rates.name,
                          "ranked": [_row(e) for e in ests],
                          "single_process": _row(single) if single else None,
                          "rejected": [{"method": r.choice.method, "a2a": r.choice.a2a, "p2p": r.choice.p2p,
                                        "layout": r.choice.layout, "reason": r.reason} for r in rejected],
                          "recommended": _row(best)}, indent=1), flush=True)
    else:
        print(f"{model.name}: {model.params / 1e9:.2f} B params; {run.seq_len:,} tokens x {run.batch}, "
              f"{run.dtype}, {'prefill' if run.prefill else 'training step'}; {cluster.nodes} node(s) x "
              f"{cluster.per_node} {rates.name} (tp={cluster.tp}); "
              f"{'replicated weights' if run.prefill else run.sharding + ' parameters and optimizer'}\n")
        print(_table(ests, args.top))
        if single is not None:
            print(f"\nthe same step in one process: {single.step_s:.4g} s, "
                  f"{single.peak_bytes / GIB:.2f} GiB")
        if rejected:
            print(f"\n{len(rejected)} configuration(s) impossible, e.g.: {rejected[0].reason}")
        fit = "no recomputation" if best.fits else "does NOT fit without recomputation"
        print(f"\nrecommended: {best.choice.method} [a2a, p2p] = [{best.choice.a2a}, {best.choice.p2p}], "
              f"{best.choice.layout}: {best.step_s:.4g} s/step, {best.peak_bytes / GIB:.1f} GiB of "
              f"{best.capacity / GIB:.1f} GiB per device, {fit}\n")
        print(recommendation(best, cluster, run), flush=True)
    if not best.fits:
        print(f"\nctxpar plan: does not fit without recomputation: the leanest configuration needs "
              f"{min(e.peak_bytes for e in ests) / GIB:.1f} GiB per device, "
              f"{min(e.short_by for e in ests) / GIB:.1f} GiB over the {best.capacity / GIB:.1f} GiB usable "
              f"(try more devices, --sharding fsdp, a window, or --tp)", file=sys.stderr)
        return 3
    return 0


def _calibrate(args) -> int:
    from ctxpar.apps.cli import writable_dir
    from ctxpar.apps.plan.calibrate import calibrate, write_profile
    import os

    writable_dir(os.path.dirname(os.path.abspath(args.out)), "plan")
    worlds = parse_ints(args.worlds, "--worlds")
    if not worlds or min(worlds) < 2:
        raise ValueError(f"--worlds takes local rank counts >= 2 (the collectives need two ranks), "
                         f"got {args.worlds!r}")
    profile = calibrate(args.on, worlds=worlds)
    write_profile(profile, args.out)
    print(f"wrote {args.out} ({profile['seconds']:.0f} s; load average {profile['load_avg'][0]:.1f} "
          f"on {os.cpu_count()} CPUs)")
    return 0


def _validate(args) -> int:
    from ctxpar.apps.plan.rates import load_profile
    from ctxpar.apps.plan.validate import format_rows, run_bench, validate_rows

    if not args.profile:
        raise ValueError("--validate needs --profile (make one with ctxpar plan --calibrate --out profile.json)")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    rates = load_profile(args.profile)
    if args.bench_results:
        with open(args.bench_results) as f:
            results = json.load(f)
        rows = validate_rows(results, rates)
    elif args.static:
        rows = validate_rows(run_bench(args.bench_out), rates)
    else:
        from ctxpar.apps.plan.validate import default_cells, measure_tracked
        rows = measure_tracked(rates, default_cells(), repeats=args.repeats)
    print(json.dumps(rows, indent=1) if args.json else format_rows(rows))
    return 0


def run(args) -> int:
    """Entry point of ``ctxpar plan``."""
    try:
        if args.calibrate:
            return _calibrate(args)
        if args.validate:
            return _validate(args)
        return _plan(args)
    except ValueError as e:
        print(f"ctxpar plan: {e}", file=sys.stderr)
        return 2
