"""What ``ctxpar bench`` runs: the per-rank timing cell, the single-process baseline, the
float64 reference, the theoretical bytes of each method, and the decoder layer used for
activation memory (see ``ctxpar.apps.bench.run`` for the definitions of every figure)."""
from __future__ import annotations

import time

import torch

from ctxpar.apps.launch import rank_device, sync_device
from ctxpar.numerics import rel_error

__all__ = ["theory_recv_bytes", "DecoderLayer", "rank_cell", "rank_layer_memory",
           "single_process", "reference", "rel_errors"]


def theory_recv_bytes(cell: dict) -> tuple[int, int] | None:
    """Bytes each rank receives (= sends) in one fwd and in one bwd call of ``cell``, by
    design: ctxpar's methods by the planner's formulas
    (:func:`ctxpar.apps.plan.work.comm_bytes`, which the tests check against
    ``comm_counters``); ``deepspeed-ulysses`` is Ulysses without K/V head replication,
    ``(N-1)/N`` of q, k, v, out each way; None for a peer without a formula."""
    from ctxpar.apps.plan.validate import cell_specs
    from ctxpar.apps.plan.work import comm_bytes

    n = cell["world"]
    if n == 1:
        return 0, 0
    if cell["method"] == "deepspeed-ulysses":
        elem = torch.empty(0, dtype=getattr(torch, cell["dtype"])).element_size()
        local = cell["seq_len"] // n * cell["batch"] * cell["head_dim"] * elem
        heads = (cell["heads"], cell["kv_heads"], cell["kv_heads"], cell["heads"])
        vol = sum((n - 1) * local * (h // n) for h in heads)
        return vol, vol
    if cell.get("peer"):
        return None
    by = comm_bytes(*cell_specs(cell))
    return sum(by["fwd"].values()), sum(by["bwd"].values())


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


def _timed_runs(fn, q, k, v, dout, device, warmup: int, repeats: int, distributed: bool = False):
    """``warmup + repeats`` fwd+bwd runs of ``fn(q, k, v)`` (``[B, S, H, D]`` each; ``dout``
    like the output). Returns the fwd and the fwd+bwd seconds of the timed runs, the last
    output, and (``distributed``: each run starts at a barrier) the last run's fwd and bwd
    ``ctxpar.comm_counters``, else None twice."""
    import contextlib

    import ctxpar

    counters = ctxpar.comm_counters if distributed else contextlib.nullcontext
    fwd, tot = [], []
    for i in range(warmup + repeats):
        q.grad = k.grad = v.grad = None
        if distributed:
            torch.distributed.barrier()
        sync_device(device)
        t0 = time.perf_counter()
        with counters() as cf:
            out = fn(q, k, v)
        sync_device(device)
        t1 = time.perf_counter()
        with counters() as cb:
            out.backward(dout)
        sync_device(device)
        if i >= warmup:
            fwd.append(t1 - t0)
            tot.append(time.perf_counter() - t0)
    return fwd, tot, out, cf, cb


def single_process(cell: dict, threads: int, warmup: int, repeats: int, device: str):
    """Fwd and fwd+bwd times of torch's fused attention on the whole sequence in this
    process with ``threads`` threads, and the last run's (out, dq, dk, dv)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, dout = make_inputs(cell, device)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        fwd, tot, out, _, _ = _timed_runs(lambda a, b, c: _sdpa(a, b, c, cell["causal"]),
                                          q, k, v, dout, device, warmup, repeats)
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
    """Max abs error relative to the reference's max abs value (floor 1e-30, i.e. purely
    relative, unlike verify's floor of 1): out, and the worst of dq, dk, dv."""
    e = [rel_error(g, r, floor=1e-30) for g, r in zip(got, ref)]
    return {"err_out": e[0], "err_grad": max(e[1:])}


# ------------------------------------------------------------------------ rank side


def _group(cell: dict, device: torch.device):
    if cell["method"] != "hybrid":
        return None
    from ctxpar.dist.mesh import cp_mesh
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
    from ctxpar.apps.bench.peers import make_peer
    from ctxpar.observe.memory import SavedTensors
    from ctxpar.observe.trace import ring_trace

    dev = rank_device(opts["device"])
    group = _group(cell, dev)
    layout = cell["layout"]
    q, k, v, dout = [ctxpar.shard(t, group=group, layout=layout).to(dev) for t in make_inputs(cell)]
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    if cell["peer"]:
        fn = make_peer(cell["method"], causal=cell["causal"])
    else:
        def fn(a, b, c):
            # The default configuration: the argument check runs once (warm-up), not per call.
            return ctxpar.attention(a, b, c, group=group, method=cell["method"], layout=layout,
                                    causal=cell["causal"])
    fwd, tot, out, cf, cb = _timed_runs(fn, q, k, v, dout, dev, opts["warmup"], opts["repeats"],
                                        distributed=True)
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
        sync_device(dev)
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
    from ctxpar.observe.memory import saved_tensor_bytes

    dev = rank_device(device)
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
