"""``ctxpar plan --calibrate --out profile.json``: measure this machine for the cost model.

What it measures (one thread per process on CPU, as ``ctxpar bench`` runs its ranks; one
GPU per rank on CUDA), each a median over a few repeats after a warm-up:

- **attention**: ``ctxpar.attention`` forward and backward in one process, causal at a few
  lengths, full, packed documents (many tiles) and windowed (dense-masked sub-tiles), at
  two head shapes; a least-squares fit
  ``seconds = fixed + per_tile · tiles + FLOPs / rate + per_masked · masked pairs`` per
  head dim and direction (the FLOPs those of the pairs the kernels compute, their causal
  blocking included, as :mod:`ctxpar.apps.plan.cost` counts);
- **matmul**: FLOP/s of ``[m, k] @ [k, k]`` for k = 64, 256, 1024;
- **memory bandwidth**: an elementwise add over 64 MB;
- **contention**: the same attention fwd+bwd run by N ranks at once against one process
  alone (CPU: the ranks share the cores, and other users' load shows here);
- **communication** over N local ranks (``ctxpar.apps.launch.RankPool``; N = 2 and 4 by
  default): a ring step's exchange, all-to-all, all-gather and reduce-scatter through the
  counted wrappers of ``ctxpar.dist.collectives``, at three sizes, each timed back to
  back and by what it adds to a loop that computes between calls (a collective after a
  kernel); latency and bandwidth fitted to the points (bytes = what each rank receives,
  as ``comm_counters`` counts).

The profile is JSON (``ctxpar.apps.plan.rates.profile_rates`` reads it).
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

from ctxpar.apps.launch import sync_device

__all__ = ["calibrate", "attention_samples", "fit_linear", "fit_affine", "write_profile", "probe",
           "rank_probe"]

ATTN_SHAPES = ((8, 64), (4, 16))  # (heads, head_dim): the bench's default, ctxpar train's model
# (S, window, causal, document length): causal blocks of three sizes, a full one, packed
# documents (many unmasked causal tiles: the per-tile cost), a window (dense-masked
# sub-tiles: the cost of building and applying masks).
ATTN_CASES = ((512, 0, True, 0), (1024, 0, True, 0), (2048, 0, True, 0), (512, 0, False, 0),
              (2048, 0, True, 128), (4096, 256, True, 0))
COMM_SIZES = (1 << 12, 1 << 20, 1 << 22)  # bytes per message (or per rank's share)
LOAD_CASE = (1024, 8, 64)  # (S, heads, head_dim): the compute each rank runs for the slowdown


def _median_time(fn, dev, repeats: int, warmup: int = 1, before=None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup``; ``before`` (e.g.
    a barrier) runs ahead of each, untimed."""
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        sync_device(dev)
        t0 = time.perf_counter()
        fn()
        sync_device(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_samples(heads: int, head_dim: int, dev: torch.device, dtype, repeats: int):
    """``[(pairs, masked, tiles, fwd_s, bwd_s)]`` for :data:`ATTN_CASES` in one process:
    the pairs the kernels compute and those under dense masks (as
    :func:`ctxpar.apps.plan.cost.time_pairs` counts them), and the kernel calls."""
    import ctxpar
    from ctxpar.apps.plan.cost import time_pairs
    from ctxpar.apps.plan.specs import RunSpec
    from ctxpar.apps.plan.work import CPChoice, attention_work, device_kernel
    from ctxpar.attn.kernels import sub_tile_rows

    kernel = device_kernel(dev.type)
    out = []
    for seq_len, window, causal, doc in ATTN_CASES:
        g = torch.Generator().manual_seed(seq_len)
        q, k, v, dout = (torch.randn(1, seq_len, heads, head_dim, generator=g).to(dev, dtype)
                         for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        run = RunSpec(seq_len, dtype="float32", causal=causal, window=window,
                      docs=(doc,) * (seq_len // doc) if doc else ())
        cu = None if run.cu_seqlens is None else torch.tensor(run.cu_seqlens, dtype=torch.int32)
        state = {}

        def fwd():
            state["out"] = ctxpar.attention(q, k, v, causal=causal, window=run.window_pair, cu_seqlens=cu,
                                            check_args=False)

        def bwd():
            q.grad = k.grad = v.grad = None
            state["out"].backward(dout, retain_graph=True)

        t_f = _median_time(fwd, dev, repeats)
        t_b = _median_time(bwd, dev, repeats)
        work = attention_work(run, CPChoice("ring", 1, 1, "contiguous"), sub_tile_rows(dev))[0]
        tiles = [t for w in work for t in w.tiles]
        out.append((*time_pairs(tiles, kernel), len(tiles), t_f, t_b))
    return out


def fit_linear(rows: list[tuple[float, ...]], ys: list[float]) -> tuple[float, ...]:
    """Least squares ``y = a + b·x1 + c·x2 + ...`` with every coefficient ``>= 0`` (a
    negative one is dropped and the rest refitted); returns ``(a, b, c, ...)``."""
    width = 1 + len(rows[0])
    cols = list(range(width))
    while True:
        a = torch.tensor([[1.0, *x] for x in rows], dtype=torch.float64)[:, cols]
        sol = torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64)[:, None]).solution.flatten()
        coef = [0.0] * width
        for i, c in zip(cols, sol.tolist()):
            coef[i] = c
        neg = [i for i in cols if coef[i] < 0]
        if not neg or len(cols) == 1:
            return tuple(max(0.0, c) for c in coef)
        cols.remove(min(neg, key=lambda i: coef[i]))


def fit_affine(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b·x`` with ``a, b >= 0``; returns ``(a, b)``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    a = my - b * mx
    if a < 0:  # through the origin
        a, b = 0.0, sum(x * y for x, y in zip(xs, ys)) / max(sum(x * x for x in xs), 1e-30)
    return a, b


def _attention_profile(dev, dtype, repeats: int) -> dict:
    prof = {}
    for heads, d in ATTN_SHAPES:
        samples = attention_samples(heads, d, dev, dtype, repeats)
        entry = {}
        for kind, idx, mult in (("fwd", 3, 1.0), ("bwd", 4, 2.5)):
            rows = [(tiles, 4 * d * heads * pairs * mult, masked) for pairs, masked, tiles, *_ in samples]
            fixed, per_tile, per_flop, per_masked = fit_linear(rows, [s[idx] for s in samples])
            entry[kind] = [fixed, per_tile, 1.0 / per_flop if per_flop > 0 else 1e30, per_masked]
        prof[str(d)] = entry
    return prof


def _matmul_profile(dev, dtype, repeats: int) -> dict:
    out = {}
    for k in (64, 256, 1024):
        m = 8192
        a, b = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(k, k, device=dev, dtype=dtype)
        out[str(k)] = 2 * m * k * k / _median_time(lambda: a @ b, dev, repeats)
    return out


def _mem_bw(dev, dtype, repeats: int) -> float:
    n = (64 << 20) // 4
    a, b = torch.randn(n, device=dev), torch.randn(n, device=dev)
    return 3 * n * 4 / _median_time(lambda: a + b, dev, repeats)


def probe(repeats: int = 3, device: str = "cpu") -> float:
    """:func:`_compute_load` on one thread in this process: the machine's speed right now."""
    from ctxpar.apps.launch import rank_device

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compute_load(rank_device(device, 0), repeats)
    finally:
        torch.set_num_threads(threads)


def rank_probe(repeats: int = 3, device: str = "cpu") -> float:
    """:func:`_compute_load` on a pool rank, every rank at once (after a barrier)."""
    import torch.distributed as dist

    from ctxpar.apps.launch import rank_device

    return _compute_load(rank_device(device), repeats, dist.barrier)


def _compute_load(dev, repeats: int, barrier=None) -> float:
    """Median seconds of :data:`LOAD_CASE`'s causal attention fwd+bwd in torch's SDPA (a
    fixed local workload: never a CP call, even on a pool rank); with ``barrier``, every
    run starts after one (the wait itself is not timed, only the compute)."""
    s, h, d = LOAD_CASE
    q, k, v = (torch.randn(1, h, s, d, device=dev, requires_grad=True) for _ in range(3))
    return _median_time(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward(),
        dev, repeats, before=barrier)


# The compute between two collectives while they are timed: 12 matmuls of 256^3, about
# 4 ms alone on one CPU thread (CP calls put a ring step's or a kernel's work there).
SEGMENT = (12, 256)


def _marginal_time(fn, segment, dev, repeats: int) -> float:
    """Seconds that ``fn()`` adds to a loop of ``segment(); fn()`` (against ``segment()``
    alone), each loop after a barrier. Measured so, a collective pays what it costs inside
    a computing program: on CPU ranks that share cores, the ranks reach it at different
    times (the scheduler's slices), which back-to-back calls never show."""
    import torch.distributed as dist

    def loop(with_op: bool) -> float:
        dist.barrier()
        sync_device(dev)
        t0 = time.perf_counter()
        for _ in range(4 * repeats):
            segment()
            if with_op:
                fn()
        sync_device(dev)
        return (time.perf_counter() - t0) / (4 * repeats)

    loop(True)  # warm-up
    return max(0.0, statistics.median(loop(True) - loop(False) for _ in range(3)))


SYNC = "@sync"  # suffix of an op timed after compute (:func:`_marginal_time`)


def _rank_comm(device: str, sizes, repeats: int) -> dict:
    """On every rank of a pool, at each size (bytes per rank received, as counted): each
    op's median seconds back to back, and (key ``op`` + :data:`SYNC`) what it adds to a
    computing loop (:func:`_marginal_time`); and :func:`_compute_load` run by every rank
    at once."""
    import torch.distributed as dist

    from ctxpar.apps.launch import rank_device
    from ctxpar.dist import collectives as comms
    from ctxpar.dist.topology import resolve

    dev = rank_device(device)
    grp = resolve(None).ring
    n, r = grp.size, grp.rank
    res = {"compute": _compute_load(dev, repeats, dist.barrier)}
    count, dim = SEGMENT
    a = torch.randn(dim, dim, device=dev)
    segment = lambda: [a @ a for _ in range(count)]  # noqa: E731
    for nbytes in sizes:
        e = max(1, nbytes // 4)
        x = torch.ones(e, device=dev)
        buf = torch.empty_like(x)
        chunks = torch.ones(n, e, device=dev)
        ops = {
            "p2p": (lambda: comms.exchange(grp, [(x, (r + 1) % n)], [(buf, (r - 1) % n)]).wait(), e * 4),
            "all_to_all": (lambda: comms.all_to_all_single(grp, chunks), (n - 1) * e * 4),
            "all_gather": (lambda: comms.all_gather(grp, x), (n - 1) * e * 4),
            "reduce_scatter": (lambda: comms.reduce_scatter(grp, chunks), (n - 1) * e * 4),
        }
        for op, (fn, recv) in ops.items():
            dist.barrier()
            res.setdefault(op, []).append((recv, _median_time(fn, dev, repeats)))
            res.setdefault(op + SYNC, []).append((recv, _marginal_time(fn, segment, dev, repeats)))
    return res


def _comm_profile(device: str, worlds, repeats: int) -> dict:
    from ctxpar.apps.launch import RankPool

    """``({n: {op: [latency_s, bytes_per_s]}}`` back to back, the same after compute,
    ``{n: compute seconds}``) over each of ``worlds`` local ranks."""
    from ctxpar.apps.launch import RankPool

    out, after, compute = {}, {}, {}
    for n in worlds:
        with RankPool(n, backend="nccl" if device == "cuda" else "gloo", threads=1) as pool:
            per_rank = pool.run(_rank_comm, device, COMM_SIZES, repeats, timeout=300)
        compute[str(n)] = max(r.pop("compute") for r in per_rank)
        for key in per_rank[0]:
            pts = [(per_rank[0][key][i][0], max(r[key][i][1] for r in per_rank)) for i in range(len(COMM_SIZES))]
            lat, per_byte = fit_affine([b for b, _ in pts], [t for _, t in pts])
            op, sync = key.removesuffix(SYNC), key.endswith(SYNC)
            (after if sync else out).setdefault(str(n), {})[op] = [lat, 1.0 / per_byte if per_byte > 0 else 1e30]
    return out, after, compute


def calibrate(device: str = "cpu", worlds=(2, 4), repeats: int = 3) -> dict:
    """Measure this machine (see the module docstring); returns the profile dict."""
    from ctxpar.apps.launch import rank_device
    from ctxpar.attn.kernels import sub_tile_rows

    dev = rank_device(device, 0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        if dev.type == "cpu":
            torch.set_num_threads(1)  # as each bench/train rank runs
        alone = _compute_load(dev, repeats)
        attn = _attention_profile(dev, dtype, repeats)
        matmul = _matmul_profile(dev, dtype, repeats)
        mem_bw = _mem_bw(dev, dtype, repeats)
    finally:
        torch.set_num_threads(threads)
    comm, comm_sync, together = _comm_profile(device, worlds, repeats)
    slowdown = {n: t / alone for n, t in together.items()} if dev.type == "cpu" else {}
    if dev.type == "cuda":
        memory, name = torch.cuda.get_device_properties(dev).total_memory, torch.cuda.get_device_name(dev)
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        name = f"cpu ({os.cpu_count()} cores, 1 thread per rank)"
    return {"device": dev.type, "name": name, "dtype": str(dtype).replace("torch.", ""),
            "cores": (os.cpu_count() or 1) if dev.type == "cpu" else 0, "memory": memory,
            "sub_tile_rows": sub_tile_rows(dev), "attn": attn, "matmul": matmul, "mem_bw": mem_bw,
            "comm": comm, "comm_sync": comm_sync, "slowdown": slowdown, "probe_s": alone, "torch": torch.__version__, "load_avg": list(os.getloadavg()),
            "seconds": time.perf_counter() - t0}


def write_profile(profile: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(profile, f, indent=1)
