"""``ctxpar bench --million``: one training step (forward + backward + gradient all-reduce)
of the tiny Llama-like model of ``ctxpar train`` at S = 1,048,576 tokens, with a sliding
window and an In-Place TTT layer, on ``--nproc`` local ranks (gloo, one thread each on CPU),
then (if it fits) the same step in one process.

The model: ``ctxpar train``'s sizes (:class:`~ctxpar.apps.train.config.TrainConfig`: width
64, 2 layers, 4 heads, FFN 128, the recall task's 153-token vocabulary), built as a
``transformers.MistralForCausalLM``, which is the Llama architecture plus
``config.sliding_window``: HF Llama has no window, while Mistral's attention hands
``sliding_window`` to the attention function, which ctxpar maps to
``window=(sliding_window - 1, 0)`` (HF's convention: a query sees itself and the
``sliding_window - 1`` tokens before it). The last layer's MLP becomes an In-Place TTT layer
(``ctxpar.ttt.convert``, as ``ctxpar train --ttt`` does). Attention is ``method="ring"``
on the contiguous layout: a causal window no longer than a shard reaches only the previous
rank's block, so the ring stops after 2 steps whatever N (``ctxpar.attn.tiles.ring_steps``),
and the counters prove it: per layer and rank the forward receives one K/V block and the
backward one K/V block and two dK/dV partial sums, against N - 1 and 2N - 1 for a full ring.

Per rank it reports the wall time of the forward (model + loss), the backward and the
gradient all-reduce; where the forward time goes (attention, MLPs, TTT layer, the rest:
forward hooks) and the backward's attention share (the ring's own step timer,
``ctxpar.observe.trace``); the resident memory before the step and the process's peak
(``ru_maxrss``), the bytes saved for backward (``ctxpar.observe.memory``); the
query-key pairs evaluated (``comm_counters().score_elements``) and the ring bytes
received (point-to-point messages; the TTT scan all-gathers, the loss and gradients
all-reduce). ``--single auto`` runs the one-process step only when N times the largest
rank's growth during the step fits in 80% of the memory available now.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import sys
import time

import torch

from ctxpar.apps.train.config import TrainConfig

__all__ = ["MillionConfig", "add_arguments", "run_million", "rank_step", "build_model",
           "make_batch", "ATTN_NAME"]

ATTN_NAME = "ctxpar_million"
_GIB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class MillionConfig:
    """One measured step. ``window`` is HF's ``sliding_window`` (ctxpar window
    ``(window - 1, 0)``). No padding: ``seq_len`` must split into whole TTT chunks on every
    rank. Checked in the launcher, before any rank starts."""

    seq_len: int = 1 << 20
    window: int = 4096
    nproc: int = 4
    ttt_chunk: int = 1024
    method: str = "ring"
    layout: str = "contiguous"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        import ctxpar

        if self.nproc < 1 or self.window < 1 or self.ttt_chunk < 1:
            raise ValueError(f"nproc, window and ttt_chunk must be >= 1; got nproc={self.nproc}, "
                             f"window={self.window}, ttt_chunk={self.ttt_chunk}")
        if self.seq_len < 64 or self.seq_len % (self.nproc * self.ttt_chunk):
            raise ValueError(f"seq_len {self.seq_len} must be >= 64 and a multiple of nproc x "
                             f"ttt_chunk = {self.nproc} x {self.ttt_chunk} (whole TTT chunks "
                             f"on every rank)")
        if self.method not in ctxpar.METHODS or self.method == "hybrid":
            raise ValueError(f"method must be one of {[m for m in ctxpar.METHODS if m != 'hybrid']}; "
                             f"got {self.method!r}")
        if self.layout not in ("contiguous", "zigzag"):
            raise ValueError(f"layout must be 'contiguous' or 'zigzag' (the TTT layer needs runs "
                             f"of consecutive tokens); got {self.layout!r}")
        if self.dtype not in ("float32", "float64", "bfloat16"):
            raise ValueError(f"dtype must be float32, float64 or bfloat16; got {self.dtype!r}")

    @property
    def train(self) -> TrainConfig:
        """``ctxpar train``'s model sizes, with this step's layout and seed."""
        return TrainConfig(seq_len=self.seq_len, layout=self.layout, seed=self.seed,
                           dtype=self.dtype, ttt=True)


def make_batch(cfg: MillionConfig):
    """The recall task's batch (one sequence, ``[1, S]`` ids and unshifted labels)."""
    from ctxpar.apps.train.task import RecallTask

    t = cfg.train
    return RecallTask(cfg.seq_len, t.n_keys, t.n_values).batch(cfg.seed, 0, 1)


def build_model(cfg: MillionConfig, attn: str, group=None):
    """``ctxpar train``'s tiny model as a ``MistralForCausalLM`` with ``sliding_window =
    cfg.window``, attention implementation ``attn``, its last MLP an In-Place TTT layer
    for ``group`` (seeded: identical on every rank and in the one-process reference)."""
    from transformers import MistralConfig, MistralForCausalLM

    from ctxpar.apps.train.task import RecallTask
    from ctxpar.apps.train.worker import ttt_convert

    t = cfg.train
    config = MistralConfig(
        vocab_size=RecallTask(cfg.seq_len, t.n_keys, t.n_values).vocab_size,
        hidden_size=t.hidden, intermediate_size=2 * t.hidden, num_hidden_layers=t.layers,
        num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, head_dim=t.hidden // t.heads,
        max_position_embeddings=cfg.seq_len, rope_theta=10000.0, attention_dropout=0.0,
        tie_word_embeddings=False, sliding_window=cfg.window)
    torch.manual_seed(cfg.seed)
    model = MistralForCausalLM(config).to(dtype=getattr(torch, cfg.dtype))
    model.set_attn_implementation(attn)
    return ttt_convert(model, t, group, cfg.ttt_chunk)


# ------------------------------------------------------------------------ on every rank


def _rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class _ForwardTimes:
    """Forward seconds spent inside each decoder layer's ``self_attn`` and ``mlp`` (the TTT
    layer's apart), from forward pre/post hooks on this model instance."""

    def __init__(self, model) -> None:
        from ctxpar.ttt.layer import InPlaceTTTMLP

        self.seconds = {"attention": 0.0, "mlp": 0.0, "ttt": 0.0}
        self._t0: dict[int, float] = {}
        self.handles = []
        for layer in model.model.layers:
            for mod, key in ((layer.self_attn, "attention"),
                             (layer.mlp, "ttt" if isinstance(layer.mlp, InPlaceTTTMLP) else "mlp")):
                self.handles.append(mod.register_forward_pre_hook(self._enter))
                self.handles.append(mod.register_forward_hook(self._leave(key)))

    def _enter(self, mod, args) -> None:
        self._t0[id(mod)] = time.perf_counter()

    def _leave(self, key: str):
        def hook(mod, args, out) -> None:
            self.seconds[key] += time.perf_counter() - self._t0.pop(id(mod))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _counts(c) -> dict:
    return {"ring_recv_bytes": int(c.bytes_by_op["recv"]), "recv_bytes": int(c.bytes_recv),
            "score_elements": int(sum(c.score_elements.values())), "kernel_calls": int(sum(c.compute_ops.values()))}


def _warm_up(cfg: MillionConfig, model, params) -> None:
    """One untimed step at a short length (at most 8192 tokens, whole TTT chunks per rank),
    so that one-time costs (lazy imports, first kernel calls) stay out of the measurement."""
    from ctxpar.integrations.transformers import shard_batch
    from ctxpar.loss import cp_cross_entropy

    unit = cfg.nproc * cfg.ttt_chunk
    short = dataclasses.replace(cfg, seq_len=min(cfg.seq_len, unit * max(1, 8192 // unit)))
    b = make_batch(short)
    cp = shard_batch(b.input_ids, b.labels, group=None, layout=cfg.layout, multiple_of=cfg.ttt_chunk)
    cp_cross_entropy(model(**cp.model_inputs()).logits, cp.labels, group=None).backward()
    for p in params:
        p.grad = None


def rank_step(cfg: MillionConfig, return_grads: bool = False, warmup: bool = True) -> dict:
    """One training step on this rank (every rank of the default group calls it; without
    torch.distributed a world of one), after an untimed short one (``warmup``). Returns
    times (s), memory (bytes), counts and, with ``return_grads``, the loss's gradients
    (all-reduced: every rank holds the full ones)."""
    from ctxpar.dist.topology import resolve
    from ctxpar.integrations.transformers import register, shard_batch
    from ctxpar.loss import allreduce_gradients, cp_cross_entropy
    from ctxpar.observe.counters import comm_counters
    from ctxpar.observe.memory import SavedTensors
    from ctxpar.observe.trace import ring_trace

    topo = resolve(None)
    name = register(ATTN_NAME, group=None, method=cfg.method, layout=cfg.layout)
    model = build_model(cfg, name, None)
    params = [p for p in model.parameters() if p.requires_grad]
    b = make_batch(cfg)
    cp = shard_batch(b.input_ids, b.labels, group=None, layout=cfg.layout, multiple_of=cfg.ttt_chunk)
    del b
    if warmup:
        _warm_up(cfg, model, params)
    timer = _ForwardTimes(model)
    rss0 = _rss_bytes()
    with ring_trace() as events:
        with comm_counters() as cf, SavedTensors(exclude=params) as saved:
            c0, t0 = time.process_time(), time.perf_counter()
            logits = model(**cp.model_inputs()).logits
            loss = cp_cross_entropy(logits, cp.labels, group=None)
            c1, t1 = time.process_time(), time.perf_counter()
        del logits
        with comm_counters() as cb:
            loss.backward()
            c2, t2 = time.process_time(), time.perf_counter()
        allreduce_gradients(params, group=None)
        c3, t3 = time.process_time(), time.perf_counter()
    timer.remove()
    ring = {ph: sum(e.t1 - e.t0 for e in events if e.phase == ph) for ph in ("fwd", "bwd")}
    out = {"rank": topo.rank, "world": topo.size, "loss": float(loss.detach()),
           "fwd_s": t1 - t0, "bwd_s": t2 - t1, "allreduce_s": t3 - t2, "step_s": t3 - t0,
           "fwd_cpu_s": c1 - c0, "bwd_cpu_s": c2 - c1, "step_cpu_s": c3 - c0,
           "fwd_split_s": dict(timer.seconds, other=(t1 - t0) - sum(timer.seconds.values())),
           "attn_bwd_s": ring["bwd"], "attn_fwd_ring_s": ring["fwd"],
           "rss_before_bytes": rss0, "peak_rss_bytes": _peak_rss_bytes(),
           "saved_bytes": saved.nbytes, "fwd": _counts(cf), "bwd": _counts(cb),
           "local_tokens": int(cp.input_ids.shape[1])}
    if return_grads:
        out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                        if p.grad is not None}
    return out


# ------------------------------------------------------------------------- the launcher


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--million`` options of ``ctxpar bench`` (its ``--device``, ``--timeout`` too)."""
    d = MillionConfig()
    g = p.add_argument_group("--million (one training step at a million tokens; "
                             "see ctxpar.apps.bench.million)")
    g.add_argument("--million", action="store_true",
                   help="measure one fwd+bwd training step of ctxpar train's tiny model with a "
                        "sliding window and an In-Place TTT layer (default S = 1,048,576 on 4 "
                        "ranks; minutes on CPU), then the same step in one process if it fits")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens in the sequence")
    g.add_argument("--window", type=int, default=d.window,
                   help="sliding window (HF sliding_window: a query sees itself and window-1 earlier tokens)")
    g.add_argument("--nproc", type=int, default=d.nproc, help="local CP ranks")
    g.add_argument("--ttt-chunk", type=int, default=d.ttt_chunk, help="In-Place TTT chunk size")
    g.add_argument("--million-method", default=d.method, help="ctxpar.attention method")
    g.add_argument("--million-layout", default=d.layout, help="contiguous or zigzag")
    g.add_argument("--million-dtype", default=d.dtype, help="float32, float64 or bfloat16")
    g.add_argument("--single", default="auto", choices=("auto", "yes", "no"),
                   help="also run the step in one process: auto = if it fits in memory")
    g.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON ('-': stdout)")


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _in_pool(cfg: MillionConfig, world: int, timeout: float) -> list[dict]:
    from ctxpar.apps.launch import RankPool

    with RankPool(world, threads=1, collective_timeout_s=timeout) as pool:
        return pool.run(rank_step, cfg, timeout=timeout)


def _single_decision(mode: str, ranks: list[dict]) -> tuple[bool, str]:
    """Whether to run the one-process step, and why (``auto``: N x the largest rank's growth
    during the step plus one rank's baseline must fit in 80% of MemAvailable)."""
    need = len(ranks) * max(r["peak_rss_bytes"] - r["rss_before_bytes"] for r in ranks) + \
        max(r["rss_before_bytes"] for r in ranks)
    avail = _mem_available()
    why = f"estimated {need / _GIB:.1f} GiB (N x the CP step's growth + baseline); {avail / _GIB:.1f} GiB available"
    if len(ranks) == 1:
        return False, "N = 1: the step above is the one-process step"
    if mode == "no":
        return False, "--single no"
    if mode == "yes":
        return True, why
    return (avail == 0 or need < 0.8 * avail), why


def _row(label: str, r: dict) -> str:
    f = r["fwd_split_s"]
    cells = [label, f"{r['fwd_s']:.3g}", f"{r['bwd_s']:.3g}", f"{r['step_s']:.3g}",
             f"{r['fwd_cpu_s']:.3g} / {r['bwd_cpu_s']:.3g}",
             " / ".join(f"{f[k]:.3g}" for k in ("attention", "mlp", "ttt", "other")),
             f"{r['attn_bwd_s']:.3g}", f"{r['allreduce_s']:.2g}",
             f"{r['rss_before_bytes'] / _GIB:.2f}", f"{r['peak_rss_bytes'] / _GIB:.2f}",
             f"{r['saved_bytes'] / _GIB:.2f}", f"{r['fwd']['score_elements'] / 1e9:.3f}",
             f"{r['fwd']['ring_recv_bytes'] / 2**20:.0f} / {r['bwd']['ring_recv_bytes'] / 2**20:.0f}"]
    return "| " + " | ".join(cells) + " |"


_HEAD = ("run", "fwd s", "bwd s", "step s", "CPU s fwd / bwd", "fwd split s (attn / mlp / ttt / other)",
         "attn bwd s", "all-reduce s", "RSS before GiB", "peak RSS GiB", "saved GiB",
         "fwd pairs 1e9", "ring MiB recv fwd / bwd")


def table(result: dict) -> str:
    """The Markdown table of a result: one row per CP rank, then the one-process row
    (times are wall seconds of this rank; CPU s its process's CPU time)."""
    rows = ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    rows += [_row(f"rank {r['rank']}/{r['world']}", r) for r in result["ranks"]]
    if result.get("single"):
        rows.append(_row("one process", result["single"]))
    return "\n".join(rows)


def run_million(args) -> int:
    """``ctxpar bench --million``: the CP step on ``--nproc`` ranks, then maybe one process."""
    if args.device != "cpu":
        raise SystemExit("ctxpar bench --million: runs on CPU ranks only (--device cpu)")
    try:
        cfg = MillionConfig(seq_len=args.seq_len, window=args.window, nproc=args.nproc,
                            ttt_chunk=args.ttt_chunk, method=args.million_method,
                            layout=args.million_layout, dtype=args.million_dtype)
    except ValueError as e:
        raise SystemExit(f"ctxpar bench --million: {e}") from None
    if args.json and args.json != "-":  # fail now, not after minutes of work
        from ctxpar.apps.cli import writable_dir

        writable_dir(os.path.dirname(os.path.abspath(args.json)), "bench --million", "--json")
    log = sys.stderr if args.json == "-" else sys.stdout  # keep stdout pure JSON then
    t0 = time.perf_counter()
    print(f"ctxpar bench --million: S={cfg.seq_len} window={cfg.window} N={cfg.nproc} "
          f"{cfg.method}/{cfg.layout} {cfg.dtype}, TTT chunk {cfg.ttt_chunk}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", file=log, flush=True)
    ranks = _in_pool(cfg, cfg.nproc, args.timeout)
    print(f"[{time.perf_counter() - t0:.0f}s] CP step done", file=log, flush=True)
    go, why = _single_decision(args.single, ranks)
    single = None
    if go:
        single = _in_pool(dataclasses.replace(cfg, nproc=1), 1, args.timeout)[0]
        print(f"[{time.perf_counter() - t0:.0f}s] one-process step done", file=log, flush=True)
    result = {"config": dataclasses.asdict(cfg), "ranks": ranks, "single": single,
              "single_note": why if not go else "", "machine": {
                  "cpus": os.cpu_count(), "torch": torch.__version__,
                  "load_avg_1m_end": os.getloadavg()[0]},
              "elapsed_s": time.perf_counter() - t0}
    print(table(result), file=log)
    if not go:
        print(f"one process not run: {why}", file=log)
    if args.json:
        with (contextlib.nullcontext(sys.stdout) if args.json == "-" else open(args.json, "w")) as f:
            json.dump(result, f, indent=1)
    return 0
