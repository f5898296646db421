"""``ctxpar bench``: speed, communication and memory of every CP method, against the ideal
and against peer libraries, with plots.

For every cell of the matrix method × layout × world size × sequence length × dtype ×
causal (plus each installed peer, see ``ctxpar.bench_peers``) it measures, on local ranks
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
  ``ctxpar.trace.ring_trace`` (the timeline plot).
- activation memory per rank: bytes saved for backward (``ctxpar.memory``), and the CUDA
  peak allocation on CUDA; plus, separately, the saved bytes per rank of a whole decoder
  layer (:class:`DecoderLayer`) at a fixed global length for N = 1, 2, 4.
- error vs the float64 reference (out, and the worst of dq/dk/dv), max abs error relative
  to the reference's max abs value.

Outputs: a Markdown table on stdout, ``OUT/results.json``, ``OUT/timeline.png`` and
``OUT/scaling.png`` (``ctxpar.bench_plots``; needs matplotlib, the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import torch

__all__ = ["add_arguments", "run", "theory_recv_bytes", "DecoderLayer"]

_QUICK = dict(methods="ring,ulysses,allgather", layouts="zigzag", worlds="2", seq_lens="512",
              dtypes="float32", causal="yes", warmup=1, repeats=2, layer_seq_len=256,
              layer_worlds="1,2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--methods", default="ring,ulysses,allgather,hybrid", help="comma list of ctxpar methods")
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
    a("--peers", default="auto", help="comma list of peers (ctxpar.bench_peers.PEERS), 'auto' = all, 'none'")
    a("--no-errors", dest="errors", action="store_false", help="skip the float64 reference checks")
    a("--layer-seq-len", type=int, default=2048, help="global length for the decoder-layer memory")
    a("--layer-worlds", default="1,2,4", help="world sizes for the decoder-layer memory ('' = skip)")
    a("--device", default="cpu", choices=("cpu", "cuda"))
    a("--out", default="bench-results", help="folder for results.json and the plots")
    a("--no-plots", dest="plots", action="store_false")
    a("--timeout", type=float, default=3600.0, help="seconds per cell before a hang is declared")
    a("--quick", action="store_true", help="tiny CI configuration (well under a minute): "
      + ", ".join(f"{k}={v}" for k, v in _QUICK.items()) + ", no peers unless --peers names some")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


# ------------------------------------------------------------------------------ theory


def theory_recv_bytes(method: str, world: int, *, batch: int, seq_len: int, hq: int, hkv: int,
                      head_dim: int, elem: int, hybrid: tuple[int, int] | None = None) -> tuple[int, int]:
    """Bytes each rank receives (= sends) in one fwd and in one bwd call, by design.

    ``b`` = one local K/V pair block ``2·B·S_local·Hkv·D·e``; ``acc`` = 4 (8 for fp64):
    ring fwd ``(N-1)·b``, bwd ``(N-1)·b + N·b_acc`` (dK/dV partials travel N hops in fp32);
    allgather fwd ``(N-1)·b`` (one all-gather), bwd ``(N-1)·b_acc`` (one reduce-scatter);
    ulysses fwd = bwd = ``(N-1)/N·B·S_local·D·e·(2·Hq + 2·Hkv')`` (q, k, v, out; dout, dq,
    dk, dv), ``Hkv'`` the K/V heads after replication (``ctxpar.ulysses.kv_replication``);
    hybrid [a2a, p2p]: Ulysses over a2a, then the ring over p2p on ``S/p2p`` tokens and
    ``Hkv'/a2a`` heads. ``deepspeed-ulysses`` is Ulysses without replication."""
    from .ulysses import kv_replication

    acc = 8 if elem == 8 else 4

    def ring(n, sl, h):
        b = 2 * batch * sl * h * head_dim
        return (n - 1) * b * elem, (n - 1) * b * elem + n * b * acc

    def uly(n, sl, heads_total):  # (N-1) chunks of [Sl, B, H/N, D] per tensor
        v = sum((n - 1) * sl * batch * (h // n) * head_dim * elem for h in heads_total)
        return v, v

    if world == 1:
        return 0, 0
    sl = seq_len // world
    if method == "ring":
        return ring(world, sl, hkv)
    if method == "allgather":
        b = 2 * batch * sl * hkv * head_dim
        return (world - 1) * b * elem, (world - 1) * b * acc
    if method in ("ulysses", "deepspeed-ulysses"):
        h2 = hkv * (kv_replication(hkv, world) if method == "ulysses" else 1)
        return uly(world, sl, (hq, h2, h2, hq))
    if method == "hybrid":
        a2a, p2p = hybrid
        h2 = hkv * kv_replication(hkv, a2a)
        u = uly(a2a, sl, (hq, h2, h2, hq)) if a2a > 1 else (0, 0)
        r = ring(p2p, seq_len // p2p, h2 // a2a) if p2p > 1 else (0, 0)
        return u[0] + r[0], u[1] + r[1]
    raise ValueError(f"no theory for method {method!r}")


# ------------------------------------------------------------------------------ inputs


def make_inputs(cell: dict, device="cpu"):
    """q, k, v, dout ``[B, S, H, D]`` of the cell's dtype, the same on every rank."""
    g = torch.Generator().manual_seed(1234 + cell["seq_len"])
    b, s, d = cell["batch"], cell["seq_len"], cell["head_dim"]
    return [torch.randn(b, s, h, d, generator=g).to(device=device, dtype=getattr(torch, cell["dtype"]))
            for h in (cell["heads"], cell["kv_heads"], cell["kv_heads"], cell["heads"])]


def _sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
        enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def single_process(cell: dict, threads: int, warmup: int, repeats: int, device: str):
    """Fwd and fwd+bwd times of torch's fused attention on the whole sequence in this
    process with ``threads`` threads, and the last run's (out, dq, dk, dv)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, dout = make_inputs(cell, device)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        fwd, tot = [], []
        for i in range(warmup + repeats):
            q.grad = k.grad = v.grad = None
            _sync(device)
            t0 = time.perf_counter()
            out = _sdpa(q, k, v, cell["causal"])
            _sync(device)
            t1 = time.perf_counter()
            out.backward(dout)
            _sync(device)
            if i >= warmup:
                fwd.append(t1 - t0)
                tot.append(time.perf_counter() - t0)
        return fwd, tot, [t.detach().cpu() for t in (out, q.grad, k.grad, v.grad)]
    finally:
        torch.set_num_threads(old)


def reference(cell: dict):
    """float64 (out, dq, dk, dv) of the cell's inputs (rounded to its dtype first), on CPU."""
    q, k, v, dout = [t.cpu().double() for t in make_inputs(cell)]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = _sdpa(q, k, v, cell["causal"])
    out.backward(dout)
    return [t.detach() for t in (out, q.grad, k.grad, v.grad)]


def rel_errors(got, ref) -> dict:
    """Max abs error relative to the reference's max abs value: out, and worst grad."""
    e = [float((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(got, ref)]
    return {"err_out": e[0], "err_grad": max(e[1:])}


# ------------------------------------------------------------------------ rank side


def _device(kind: str) -> torch.device:
    import torch.distributed as dist

    if kind == "cuda":
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group(cell: dict, device: torch.device):
    if cell["method"] != "hybrid":
        return None
    from .mesh import cp_mesh
    return cp_mesh(hierarchical_context_parallel_sizes=list(cell["hybrid"]), device_type=device.type)


def _compute_seconds(prof) -> float:
    """Time in top-level aten ops (local work), from a torch.profiler run."""
    total = 0.0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        p, top = e.cpu_parent, True
        while p is not None:
            if p.name.startswith(("aten::", "c10d::")):
                top = False
                break
            p = p.cpu_parent
        if top:
            total += (e.time_range.end - e.time_range.start) / 1e6
    return total


def rank_cell(cell: dict, opts: dict) -> dict:
    """One cell on this rank: timed runs, comm counters, then one traced, profiled run."""
    import torch.distributed as dist

    import ctxpar
    from .bench_peers import make_peer
    from .memory import SavedTensors
    from .trace import ring_trace

    dev = _device(opts["device"])
    group = _group(cell, dev)
    layout = cell["layout"]
    q, k, v, dout = [ctxpar.shard(t, group=group, layout=layout).to(dev) for t in make_inputs(cell)]
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    if cell["peer"]:
        fn = make_peer(cell["method"], causal=cell["causal"])
    else:
        def fn(a, b, c):
            return ctxpar.attention(a, b, c, group=group, method=cell["method"], layout=layout,
                                    causal=cell["causal"], check_args=False)
    fwd, tot = [], []
    for i in range(opts["warmup"] + opts["repeats"]):
        q.grad = k.grad = v.grad = None
        dist.barrier()
        _sync(dev)
        t0 = time.perf_counter()
        with ctxpar.comm_counters() as cf:
            out = fn(q, k, v)
        _sync(dev)
        t1 = time.perf_counter()
        with ctxpar.comm_counters() as cb:
            out.backward(dout)
        _sync(dev)
        if i >= opts["warmup"]:
            fwd.append(t1 - t0)
            tot.append(time.perf_counter() - t0)
    q.grad = k.grad = v.grad = None
    del out
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with ring_trace() as events, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        dist.barrier()  # after the profiler's start, so that the ranks begin together
        t0 = time.perf_counter()
        with SavedTensors() as saved:
            out = fn(q, k, v)
        out.backward(dout)
        _sync(dev)
        wall = time.perf_counter() - t0
    # On CUDA the profiler's CPU times are launch times: use the (synchronised) ring trace.
    compute = _compute_seconds(prof) if dev.type == "cpu" else (
        sum(e.t1 - e.t0 for e in events if e.kind == "compute") if events else None)
    res = {"fwd": fwd, "tot": tot, "fwd_recv": cf.bytes_recv, "fwd_sent": cf.bytes_sent,
           "bwd_recv": cb.bytes_recv, "bwd_sent": cb.bytes_sent, "ops": dict(cf.ops + cb.ops),
           "traced_wall": wall, "compute": compute, "saved_bytes": saved.nbytes,
           "events": [(e.phase, e.step, e.kind, e.t0, e.t1) for e in events],
           "cuda_peak": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None}
    if opts["errors"]:
        res["positions"] = ctxpar.position_ids(cell["seq_len"], group=group, layout=layout)
        res["tensors"] = [t.detach().cpu() for t in (out, q.grad, k.grad, v.grad)]
    return res


# ---------------------------------------------------------------- decoder-layer memory


class DecoderLayer(torch.nn.Module):
    """A small self-contained pre-norm decoder layer run on this rank's shard: RMSNorm,
    q/k/v/o projections, RoPE at the global positions (``ctxpar.position_ids``),
    ``ctxpar.attention`` (causal), RMSNorm, gated (SwiGLU) MLP."""

    def __init__(self, hidden=256, heads=8, kv_heads=2, mlp=1024, *, method="ring",
                 layout="zigzag", group=None):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, hidden // heads
        self.method, self.layout, self.group = method, layout, group
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.norm1, self.norm2 = torch.nn.RMSNorm(hidden), torch.nn.RMSNorm(hidden)
        self.q, self.k, self.v = lin(hidden, hidden), lin(hidden, kv_heads * self.d), lin(hidden, kv_heads * self.d)
        self.o, self.gate, self.up, self.down = lin(hidden, hidden), lin(hidden, mlp), lin(hidden, mlp), lin(mlp, hidden)

    def _rope(self, x, pos):
        inv = 1.0 / 10000 ** (torch.arange(0, self.d, 2, dtype=torch.float32, device=x.device) / self.d)
        ang = pos.to(x.device, torch.float32)[:, None] * inv  # [S_local, D/2]
        cos, sin = ang.cos().repeat(1, 2)[:, None], ang.sin().repeat(1, 2)[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, x, pos):
        import ctxpar

        b, s, _ = x.shape
        h = self.norm1(x)
        q = self._rope(self.q(h).view(b, s, self.h, self.d), pos)
        k = self._rope(self.k(h).view(b, s, self.hkv, self.d), pos)
        v = self.v(h).view(b, s, self.hkv, self.d)
        a = ctxpar.attention(q, k, v, group=self.group, method=self.method, layout=self.layout,
                             causal=True, check_args=False)
        x = x + self.o(a.flatten(2))
        h = self.norm2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def rank_layer_memory(method: str, seq_len: int, device: str, hybrid=None) -> dict:
    """Saved-for-backward bytes (parameters excluded) of one decoder layer on this rank's
    shard of a global ``seq_len``; with the CUDA peak of its fwd+bwd on CUDA."""
    import ctxpar
    from .memory import saved_tensor_bytes

    dev = _device(device)
    group = _group({"method": method, "hybrid": hybrid}, dev)
    torch.manual_seed(0)
    layer = DecoderLayer(method=method, group=group).to(dev)
    x = ctxpar.shard(torch.randn(1, seq_len, 256, generator=torch.Generator().manual_seed(1)),
                     group=group).to(dev).requires_grad_()
    pos = ctxpar.position_ids(seq_len, group=group)
    nbytes = saved_tensor_bytes(lambda: layer(x, pos), exclude=layer.parameters())
    peak = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        layer(x, pos).sum().backward()
        peak = torch.cuda.max_memory_allocated()
    return {"saved_bytes": nbytes, "cuda_peak": peak}


# --------------------------------------------------------------------------- driver


def _resolve(args) -> argparse.Namespace:
    cfg = argparse.Namespace(**vars(args))
    if args.quick:
        for key, val in _QUICK.items():
            setattr(cfg, key, val)
        if args.peers == "auto":
            cfg.peers = "none"
    return cfg


def _cells(cfg, notes: list[str]):
    """Every cell of the matrix (ctxpar methods, then runnable peers), in run order."""
    from . import LAYOUTS
    from .bench_peers import PEERS, peer_layout, peer_status

    layouts = list(LAYOUTS) if cfg.layouts == "all" else cfg.layouts.split(",")
    causals = {"both": (True, False), "yes": (True,), "no": (False,)}[cfg.causal]
    peers = [] if cfg.peers == "none" else (list(PEERS) if cfg.peers == "auto" else cfg.peers.split(","))
    shape = dict(batch=cfg.batch, heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim)
    for w, s, dt, causal in itertools.product(_ints(cfg.worlds), _ints(cfg.seq_lens),
                                              cfg.dtypes.split(","), causals):
        base = dict(shape, world=w, seq_len=s, dtype=dt, causal=causal, peer=False, hybrid=None)
        if w == 1:  # every method and layout is the same local computation on one rank
            notes.append("N=1: one cell per case (every method and layout is the same local kernel call)")
            yield dict(base, method="ring", layout="contiguous")
            continue
        for m in cfg.methods.split(","):
            hyb = None
            if m == "hybrid":
                hyb = tuple(_ints(cfg.hybrid_sizes)) if cfg.hybrid_sizes else ((2, w // 2) if w >= 4 and w % 2 == 0 else None)
                if hyb is None or hyb[0] * hyb[1] != w:
                    notes.append(f"hybrid skipped at N={w}: needs --hybrid-sizes a2a,p2p with a2a*p2p={w}")
                    continue
            if m in ("ulysses", "hybrid") and cfg.heads % (w if m == "ulysses" else hyb[0]):
                notes.append(f"{m} skipped at N={w}: {cfg.heads} heads do not split")
                continue
            for lay in layouts:
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
    th = theory_recv_bytes(cell["method"], n, batch=cell["batch"], seq_len=cell["seq_len"],
                           hq=cell["heads"], hkv=cell["kv_heads"], head_dim=cell["head_dim"],
                           elem=torch.empty(0, dtype=getattr(torch, cell["dtype"])).element_size(),
                           hybrid=cell["hybrid"])
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


def run(args) -> int:
    from .bench_plots import markdown_table, plot_scaling, plot_timeline
    from .launch import RankPool

    cfg = _resolve(args)
    os.makedirs(cfg.out, exist_ok=True)
    notes: list[str] = []
    cells = list(_cells(cfg, notes))
    layer_worlds = _ints(cfg.layer_worlds)
    opts = dict(device=cfg.device, warmup=cfg.warmup, repeats=cfg.repeats, errors=cfg.errors)
    singles: dict = {}  # (S, dtype, causal) -> {threads: (fwd times, tot times, tensors)}
    refs: dict = {}
    rows, layer_rows = [], []
    t_start = time.perf_counter()
    ngpu = torch.cuda.device_count() if cfg.device == "cuda" else 0
    for w in sorted({c["world"] for c in cells} | {x for x in layer_worlds if x > 1}):
        if cfg.device == "cuda" and w > ngpu:
            notes.append(f"N={w} skipped: needs one GPU per rank ({ngpu} GPU(s))")
            continue
        w_cells = [c for c in cells if c["world"] == w]
        for c in w_cells:  # single-process baselines first, while no rank is busy
            key = (c["seq_len"], c["dtype"], c["causal"])
            single = singles.setdefault(key, {})
            for t in sorted({1, _cores(cfg, w)} if cfg.device == "cpu" else {1}):
                if t not in single:
                    single[t] = single_process(c, t, cfg.warmup, cfg.repeats, cfg.device)
            if cfg.errors and key not in refs:
                refs[key] = reference(c)
        backend = "nccl" if cfg.device == "cuda" else "gloo"
        with RankPool(w, backend=backend, threads=1, collective_timeout_s=cfg.timeout) as pool:
            for c in w_cells:
                key = (c["seq_len"], c["dtype"], c["causal"])
                res = pool.run(rank_cell, c, opts, timeout=cfg.timeout)
                rows.append(_summary(c, res, singles[key], refs.get(key), cfg))
                print(f"[{time.perf_counter() - t_start:6.1f}s] N={w} S={c['seq_len']} {c['method']}/"
                      f"{c['layout']} {c['dtype']} causal={c['causal']}: fwd+bwd {rows[-1]['tot_s']:.4f}s "
                      f"eff {rows[-1]['eff_tot']:.3f}", flush=True)
            if w in layer_worlds and w > 1:
                for m in cfg.methods.split(","):
                    hyb = (2, w // 2) if m == "hybrid" and w >= 4 and w % 2 == 0 else None
                    if m == "hybrid" and hyb is None:
                        continue
                    res = pool.run(rank_layer_memory, m, cfg.layer_seq_len, cfg.device, hyb, timeout=cfg.timeout)
                    layer_rows.append(dict(method=m, world=w, seq_len=cfg.layer_seq_len,
                                           saved_bytes=max(r["saved_bytes"] for r in res),
                                           cuda_peak=res[0]["cuda_peak"]))
    if 1 in layer_worlds:  # a world of one, in this process (no torch.distributed needed)
        r1 = rank_layer_memory("ring", cfg.layer_seq_len, cfg.device)
        layer_rows.insert(0, dict(method="(any)", world=1, seq_len=cfg.layer_seq_len, **r1))
    base = {}
    for key, single in singles.items():
        base[f"S={key[0]} {key[1]} causal={key[2]}"] = {
            f"{t}_threads": {"fwd_s": statistics.median(v[0]), "tot_s": statistics.median(v[1]),
                             **(rel_errors(v[2], refs[key]) if key in refs else {})}
            for t, v in single.items()}
    result = {"config": {k: v for k, v in vars(cfg).items()}, "machine": _machine(cfg),
              "single_process": base, "cells": rows, "layer_memory": layer_rows, "notes": notes,
              "elapsed_s": time.perf_counter() - t_start}
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(markdown_table(result))
    if cfg.plots:
        for path in (plot_timeline(result, os.path.join(cfg.out, "timeline.png")),
                     plot_scaling(result, os.path.join(cfg.out, "scaling.png"))):
            print(f"wrote {path}")
    print(f"wrote {os.path.join(cfg.out, 'results.json')} ({result['elapsed_s']:.0f} s)")
    return 0


def _machine(cfg) -> dict:
    info = {"cpus": os.cpu_count(), "torch": torch.__version__, "device": cfg.device}
    if cfg.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info
