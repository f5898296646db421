"""Generation under CP (issue 12): prefill and decode of ``generate()`` on N ranks vs one process.

A tiny random Llama (``ctxpar.apps.train.task.build_model``: hidden 64, 2 layers, 4 query
and 2 KV heads of 16, vocab 256, fp32), one prompt of S tokens (B = 1), greedy decoding
of ``--new`` tokens through Hugging Face ``generate()``. One process: ``model.generate``
with transformers' SDPA attention (no ctxpar). N ranks: local gloo processes, one thread
each, :func:`ctxpar.integrations.transformers.generate` (``--method``, ``--layout``). The
one-process run is in this process, on one thread too.

    python benchmarks/bench_generate.py                       # S = 16k, 32k; N = 2, 4
    python benchmarks/bench_generate.py --seqs 4096 --worlds 2 --repeats 2   # a quick look

Each side runs one warm-up generation, then ``--repeats`` timed ones; the table gives
medians over them. *Prefill* is the time from the call to the first new token (the
slowest rank's), *decode* the time per new token after it (the slowest rank's). Speedup
= one process / N ranks; decode ratio = N ranks / one process (lower is better). As wall
times on a loaded machine mostly measure the load, CPU seconds are given too: prefill CPU
efficiency = one process's CPU time / (N x the largest rank's), and the decode CPU ratio
= the largest rank's CPU time per token / one process's.

Where the time goes, per phase, in CPU seconds of the process (prefill: the whole phase;
decode: per token; medians over rounds; the rank of the slowest wall time): the attention
function's time is measured by registering a timed wrapper of the attention
(``AttentionInterface``; ctxpar's, or transformers' SDPA for one process); *model* is the
rest of the model's forward (embeddings, projections, RoPE, MLPs, norms, lm_head: the
token-wise work, replicated in decode and split in prefill; in one process also HF's
causal mask); *loop* is ``generate()`` outside the forwards (HF's logits processing and
stopping criteria, ctxpar's per-token agreement check and the hooks). Under CP the decode
attention is split once more into this rank's *partial* against its shard (timed
afterwards on the real shards) and the *rest* (the all-gather of ``[out, lse]`` with its
gloo threads, the merge). A wait for another rank costs wall time, not CPU. KV bytes: per
rank (the largest) and of the one-process cache.

N = 4 on a 2-core machine oversubscribes it; times on a shared machine are noisy: read
the medians and ratios.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import warnings

import torch

from ctxpar.apps.launch import RankPool

_MODEL = dict(vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2)


class _Timer:
    """Wall and CPU seconds spent in the attention function and in the model's forward
    (forward hooks): ``attn``/``forward`` are ``[wall, cpu]``."""

    def __init__(self) -> None:
        self.attn, self.forward = [0.0, 0.0], [0.0, 0.0]
        self._t0 = (0.0, 0.0)

    def before(self, *args, **kwargs) -> None:
        self._t0 = _now()

    def after(self, *args, **kwargs) -> None:
        _add(self.forward, self._t0)


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _add(acc: list, t0: tuple[float, float]) -> None:
    t1 = _now()
    acc[0] += t1[0] - t0[0]
    acc[1] += t1[1] - t0[1]


def _timed_attention(timer_box: list, fn):
    """An attention function that adds ``fn``'s time to the current timer."""
    def timed(*args, **kwargs):
        t0 = _now()
        out = fn(*args, **kwargs)
        _add(timer_box[0].attn, t0)
        return out
    return timed


def _build(s: int, new: int, name: str):
    from ctxpar.apps.train.task import build_model

    return build_model(max_len=s + new, seed=0, dtype=torch.float32, device="cpu", attn=name,
                       **_MODEL).eval()


def _generate_once(call, box: list, model, ids: torch.Tensor, new: int) -> dict:
    """One timed greedy generation; the phases split at the first new token. ``wall``
    and ``cpu`` (this process's CPU seconds: what the phase cost it, whatever else the
    machine runs) per phase; decode figures are per new token after the first."""
    timer = _Timer()
    box[0] = timer
    marks: list[tuple] = []  # (wall, cpu, attn [wall, cpu], forward [wall, cpu]) per put

    class _Streamer:
        def put(self, value):
            marks.append((*_now(), tuple(timer.attn), tuple(timer.forward)))

        def end(self):
            pass

    hooks = [model.register_forward_pre_hook(timer.before),
             model.register_forward_hook(timer.after)]
    t0, c0 = _now()
    try:
        with torch.no_grad():
            out = call(ids, do_sample=False, pad_token_id=0, eos_token_id=None,
                       max_new_tokens=new, min_new_tokens=new, return_dict_in_generate=True,
                       streamer=_Streamer())
    finally:
        for h in hooks:
            h.remove()
    first, last = marks[1], marks[-1]
    start = (t0, c0, (0.0, 0.0), (0.0, 0.0))
    return {"prefill": _phase(start, first, 1), "decode": _phase(first, last, len(marks) - 2),
            "cache": out.cache}


def _phase(a: tuple, b: tuple, steps: int) -> dict:
    """Between two marks, per step: wall and CPU seconds, and the split into attention,
    the rest of the forward (``model``) and ``loop`` (outside the forwards), each
    ``[wall, cpu]``."""
    out = {"wall": (b[0] - a[0]) / steps, "cpu": (b[1] - a[1]) / steps}
    for i, key in enumerate(("wall_", "cpu_")):
        attn = b[2][i] - a[2][i]
        fwd = b[3][i] - a[3][i]
        total = b[i] - a[i]
        out[key + "attn"] = attn / steps
        out[key + "model"] = (fwd - attn) / steps
        out[key + "loop"] = (total - fwd) / steps
    return out


def _medians(rounds: list[dict]) -> dict:
    return {ph: {k: statistics.median(r[ph][k] for r in rounds) for k in rounds[0][ph]}
            for ph in ("prefill", "decode")}


def _prompt(s: int) -> torch.Tensor:
    return torch.randint(1, _MODEL["vocab_size"], (1, s), generator=torch.Generator().manual_seed(1))


def one_process(s: int, new: int, repeats: int) -> dict:
    """One process, SDPA: medians of the phases, and the cache's KV bytes."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    torch.set_num_threads(1)
    box = [_Timer()]
    AttentionInterface.register("bench_sdpa", _timed_attention(box, ALL_ATTENTION_FUNCTIONS["sdpa"]))
    AttentionMaskInterface.register("bench_sdpa", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model = _build(s, new, "bench_sdpa")
    ids = _prompt(s)
    _generate_once(model.generate, box, model, ids, new)
    rounds = [_generate_once(model.generate, box, model, ids, new) for _ in range(repeats)]
    cache = rounds[-1]["cache"]
    kv = sum(t.numel() * t.element_size() for layer in cache.layers
             for t in (layer.keys, layer.values))
    return {**_medians(rounds), "kv_bytes": kv}


def _partial_time(cache, s_total: int, repeats: int = 20) -> float:
    """CPU seconds of this rank's decode partials (every layer) against its real shards:
    one query at the next slot, the median of ``repeats`` calls."""
    from ctxpar.attn.decode import shard_partial
    from ctxpar.attn.options import AttnOptions

    shards = [layer.shard for layer in cache.layers]
    q = torch.randn(1, 1, _MODEL["heads"], _MODEL["hidden"] // _MODEL["heads"])
    opts = AttnOptions(True, (-1, -1), q.shape[-1] ** -0.5, "auto")
    slot = torch.tensor([s_total])
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for sh in shards:
            shard_partial(q, slot, sh.k, sh.v, sh.slots, sh.valid, opts)
        times.append(time.process_time() - t0)
    return statistics.median(times)


def rank_side(s: int, new: int, repeats: int, method: str, layout: str) -> dict:
    """On every CP rank: medians of the phases (this rank's), the local decode partial
    time and this rank's KV bytes."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from ctxpar.dist.collectives import all_reduce
    from ctxpar.dist.topology import resolve
    from ctxpar.integrations.transformers import (generate, make_attention_function,
                                                  refuse_padding_mask)

    warnings.filterwarnings("ignore")
    box = [_Timer()]
    fn = make_attention_function(layout=layout, check_args=False)
    AttentionInterface.register("bench_ctxpar", _timed_attention(box, fn))
    AttentionMaskInterface.register("bench_ctxpar", refuse_padding_mask)
    model = _build(s, new, "bench_ctxpar")
    ids = _prompt(s)
    grp = resolve(None).ring
    call = functools.partial(generate, model, method=method, layout=layout)

    def once():
        all_reduce(grp, torch.zeros(1))  # the ranks start together
        return _generate_once(call, box, model, ids, new)

    once()
    rounds = [once() for _ in range(repeats)]
    cache = rounds[-1]["cache"]
    return {**_medians(rounds), "kv_bytes": cache.kv_bytes,
            "partial": _partial_time(cache, s + new)}


def _slowest(per_rank: list[dict]) -> dict:
    """Per phase: the slowest rank's wall time, with that rank's breakdown, and the
    largest CPU time of any rank."""
    out = {}
    for ph in ("prefill", "decode"):
        out[ph] = dict(max((r[ph] for r in per_rank), key=lambda x: x["wall"]))
        out[ph]["cpu"] = max(r[ph]["cpu"] for r in per_rank)
    out["kv_bytes"] = max(r["kv_bytes"] for r in per_rank)
    out["partial"] = max(r["partial"] for r in per_rank)
    return out


def _fmt_phase(p: dict, scale: float = 1.0) -> str:
    return " / ".join(f"{p['cpu_' + k] * scale:.3g}" for k in ("attn", "model", "loop"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="16384,32768")
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--new", type=int, default=16, help="new tokens per generation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--layout", default="zigzag")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args(argv)
    seqs = [int(x) for x in args.seqs.split(",")]
    worlds = [int(x) for x in args.worlds.split(",")]
    cores = len(os.sched_getaffinity(0))
    rows = []
    print("| S | N | prefill s | speedup | CPU eff. | decode ms/token | decode vs 1 | "
          "decode CPU vs 1 | KV MB/rank (of 1) | prefill CPU attn / model / loop s | "
          "decode CPU attn / model / loop ms | decode CPU partial / rest of attn ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in seqs:
        one = one_process(s, args.new, args.repeats)
        rows.append({"S": s, "N": 1, **one})
        _print_row(s, 1, one, one)
        for n in worlds:
            with RankPool(n, threads=1) as pool:
                res = pool.run(rank_side, s, args.new, args.repeats, args.method, args.layout,
                               timeout=3600)
            cp = _slowest(res)
            rows.append({"S": s, "N": n, **cp})
            _print_row(s, n, cp, one)
    print(f"(one thread per process; {cores} cores available; N > {cores} oversubscribes them)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1, default=str)
    return 0


def _print_row(s: int, n: int, r: dict, one: dict) -> None:
    """One table row. CPU efficiency: one process's prefill CPU seconds over N x the
    largest rank's (1.0: the work split evenly with nothing added)."""
    pre, dec = r["prefill"], r["decode"]
    mb = r["kv_bytes"] / 2 ** 20
    split = "" if n == 1 else (f"{1e3 * r['partial']:.3g} / "
                               f"{1e3 * (dec['cpu_attn'] - r['partial']):.3g}")
    print(f"| {s} | {n} | {pre['wall']:.3f} | {one['prefill']['wall'] / pre['wall']:.2f} | "
          f"{one['prefill']['cpu'] / (n * pre['cpu']):.2f} | {1e3 * dec['wall']:.2f} | "
          f"{dec['wall'] / one['decode']['wall']:.2f} | {dec['cpu'] / one['decode']['cpu']:.2f} | "
          f"{mb:.2f} ({one['kv_bytes'] / 2 ** 20:.2f}) | {_fmt_phase(pre)} | "
          f"{_fmt_phase(dec, 1e3)} | {split} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
