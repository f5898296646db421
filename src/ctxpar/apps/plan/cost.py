"""Time and memory of one training step (or one prefill) of a decoder under CP, per rank.

Work comes from :mod:`ctxpar.apps.plan.work` (the library's own tile plans and byte
formulas), seconds from :class:`ctxpar.apps.plan.rates.Rates`:

- **attention**, per layer and rank: each step's tiles at the kernels' rate, counting the
  pairs the kernel computes (a causal tile skips only whole blocks of the kernel's
  blocking, :func:`~ctxpar.apps.plan.work.kernel_pairs`; a windowed sub-tile is its whole
  area under a dense mask, which costs per pair besides), plus a per-call and a per-tile
  overhead; backward 2.5x the forward's FLOPs (5 matmuls of the tile against 2).
- **overlap**: a ring step hides its transfer when its compute is at least as long
  (``max(compute, transfer)``), where the device can move data beside computing (GPUs;
  CPU ranks with a spare core); on CPU ranks that fill every core the transfer's own CPU
  work adds to the step. The backward's dK/dV partial sums ride with the K/V blocks,
  their last hop is exposed. All-gather overlaps its gather with the diagonal tiles;
  its reduce-scatter and Ulysses' all-to-alls are exposed, and the first collective
  after a kernel also waits for the group's ranks to arrive (measured by the
  calibration). Ranks sharing cores share them step by step; the slowest rank sets the
  time.
- **linear layers**: ``2·tokens·weights`` FLOPs forward, twice that backward, at the
  matmul rate; the LM head likewise; an In-Place TTT layer adds its chunk update and
  conv/projection FLOPs.
- **elementwise work** (norms, RoPE, activations, the loss): three passes over the saved
  activation bytes at the memory bandwidth (read and write forward, backward).
- **memory**: parameters, gradients and Adam state (replicated, or FSDP over dp x cp),
  activations saved for backward without recomputation, the largest transient of one
  layer (K/V blocks and dK/dV partial sums in flight, the MLP's gradients) and the
  logits' gradient.

Left out (stated in the CLI's output too): sequence-parallel norms under TP, pipeline
parallelism, the optimizer step's time, allocator fragmentation (5% of memory is kept
free), and the data-parallel gradient reduction beyond what overlaps the backward.
"""
from __future__ import annotations

import dataclasses
import functools
import operator

from ctxpar.apps.plan.rates import Rates
from ctxpar.apps.plan.specs import ClusterSpec, ModelSpec, RunSpec
from ctxpar.apps.plan.work import (CPChoice, attention_work, comm_bytes, kernel_pairs,
                                   layer_saved_elements, local_heads, shard_spec, visible_pairs)

__all__ = ["Estimate", "estimate", "attention_time", "USABLE_MEMORY", "static_bytes_per_param", "time_pairs"]

USABLE_MEMORY = 0.95  # of the device's memory; the rest for fragmentation and workspaces
BWD_FLOP_RATIO = 2.5  # a tile's backward: 5 matmuls (S, dP, dV, dQ, dK) against the forward's 2


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Predicted figures of one configuration (seconds and bytes, per rank)."""

    choice: CPChoice
    dp: int
    tp: int
    step_s: float
    fwd_s: float
    bwd_s: float
    attn_s: float
    attn_comm_exposed_s: float
    linear_s: float
    other_s: float
    memory: dict
    peak_bytes: float
    capacity: float
    tokens_per_s_per_device: float
    mfu: float
    peak_flops: float

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity

    @property
    def short_by(self) -> float:
        return max(0.0, self.peak_bytes - self.capacity)


def static_bytes_per_param(run: RunSpec) -> int:
    """Bytes per parameter held for training: weights, gradients, Adam's two moments, and
    an fp32 master copy for half types (bf16: 2 + 4 + 4 + 4 + 4 = 18, fp32: 16, fp64: 32).
    A prefill holds the weights only."""
    e = run.elem
    if run.prefill:
        return e
    if e == 8:
        return 32
    return 16 if e == 4 else 18


def time_pairs(tiles, kernel: str) -> tuple[int, int]:
    """``(pairs, masked)`` the fused ``kernel`` computes for ``tiles``, summed
    (:func:`~ctxpar.apps.plan.work.kernel_pairs`)."""
    both = [kernel_pairs(t, kernel) for t in tiles]
    return sum(p for p, _ in both), sum(m for _, m in both)


def _cross_node(group_span: int, cluster: ClusterSpec | None) -> bool:
    return cluster is not None and group_span > cluster.per_node


def shared_finish(alone: list[float], factor) -> float:
    """When the last of jobs started together ends, if each job alone takes ``alone[i]``
    seconds and the active ones share the cores (``factor(active)``: slowdown of each):
    processor sharing, phase by phase as the shorter jobs end."""
    t, done, n = 0.0, 0.0, len(alone)
    for i, a in enumerate(sorted(alone)):
        t += (a - done) * factor(n - i)
        done = a
    return t


def _step_times(work, kind: str, flop_pair: float, rates: Rates, d: int, allgather: bool):
    """Each rank's compute alone per step (``[rank][step]``; the call's fixed cost in its
    first); the all-gather's sources after its own block run as one pass (it computes
    them back to back)."""
    mult = BWD_FLOP_RATIO if kind == "bwd" else 1.0

    def one(w, first):
        pairs, masked = time_pairs(w.tiles, rates.kernel)
        return rates.attention(kind, mult * flop_pair * pairs, len(w.tiles), d, masked_pairs=masked,
                               calls=int(first))

    per = [[one(w, s == 0) for s, w in enumerate(steps)] for steps in work]
    return [p[:1] + [sum(p[1:])] if allgather and len(p) > 1 else p for p in per]


def _attention_times(model, run, choice, rates: Rates, cluster, tp: int, local_ranks: int):
    """(fwd seconds, bwd seconds, exposed comm seconds) of one layer's attention on the
    slowest rank. Ranks sharing cores (a CPU profile) compute each step together: a step
    lasts until its longest rank's work ends, the others' cores freed as they finish."""
    d = model.head_dim
    hq_l, _ = local_heads(model, choice, tp)
    flop_pair = 4 * d * hq_l * run.batch
    work = attention_work(run, choice, rates.sub_tile_rows)
    by = comm_bytes(model, run, choice, tp)
    spec = shard_spec(run, choice)
    acc = 8 if run.elem == 8 else 4
    a2a_deg = choice.size if choice.method == "ulysses" else (choice.a2a if choice.method == "hybrid" else 1)
    a2a_x = _cross_node(a2a_deg * tp, cluster)
    ring_x = _cross_node(choice.size * tp, cluster)
    a2a_t = 0.0
    if a2a_deg > 1:
        # Four all-to-alls each way, exposed: q (after the caller's compute), k, v, then
        # out after the kernel; dout, then dq after the kernel, dk, dv.
        one = by["fwd"]["all_to_all"] / 4
        a2a_t = 2 * sum(rates.comm_time("all_to_all", one, a2a_deg, a2a_x, after_compute=after,
                                        local_ranks=local_ranks)
                        for after in (True, False))
    factor = functools.partial(rates.sharing, local_ranks=local_ranks)
    gathered = choice.method == "allgather"
    overlap = max if rates.hides_transfers(local_ranks) else operator.add

    def per_step(kind):
        per = _step_times(work, kind, flop_pair, rates, d, gathered)
        steps = max(len(p) for p in per)
        return [shared_finish([p[s] for p in per if s < len(p)], factor) for s in range(steps)]

    fwd_c, bwd_c = per_step("fwd"), per_step("bwd")
    fwd, bwd, exposed = sum(fwd_c), sum(bwd_c), 2 * a2a_t
    if choice.method in ("ring", "hybrid") and len(fwd_c) > 1:
        n = spec.p2p
        blk = by["fwd"]["p2p"] / (len(fwd_c) - 1)  # one K/V block, bytes
        dkv = blk / run.elem * acc
        x_kv, x_both, x_dkv = (rates.comm_time("p2p", nb, n, ring_x, local_ranks=local_ranks)
                               for nb in (blk, blk + dkv, dkv))
        f = sum(overlap(c, x_kv) for c in fwd_c[:-1]) + fwd_c[-1]
        b = sum(overlap(c, x_both) for c in bwd_c[:-1]) + overlap(bwd_c[-1], x_dkv) + x_dkv
        exposed += (f - fwd) + (b - bwd)
        fwd, bwd = f, b
    elif gathered and choice.size > 1:
        t_ag = rates.comm_time("all_gather", by["fwd"]["all_gather"], choice.size, ring_x,
                               local_ranks=local_ranks)
        t_rs = rates.comm_time("reduce_scatter", by["bwd"]["reduce_scatter"], choice.size, ring_x,
                               after_compute=True, local_ranks=local_ranks)
        f = overlap(fwd_c[0], t_ag) + sum(fwd_c[1:])
        exposed += (f - fwd) + t_rs
        fwd, bwd = f, bwd + t_rs
    return fwd + a2a_t, bwd + a2a_t, exposed


def _linear_flops(model: ModelSpec, run: RunSpec, tokens: float, tp: int) -> tuple[float, float]:
    """Forward FLOPs of one layer's projections and of the LM head, for ``tokens``."""
    h, d = model.hidden, model.head_dim
    per_tok = 2 * (h * (model.heads + 2 * model.kv_heads) * d + model.heads * d * h + 3 * h * model.ffn)
    ttt = 2 * (3 * h * model.ffn + h * h)  # chunk update, apply, summary; conv + projection
    return tokens * per_tok / tp, tokens * (2 * h * model.vocab / tp), tokens * ttt / tp


def _memory(model, run, choice, cluster, tp: int, dp: int, tokens: float, rates: Rates) -> dict:
    e, acc = run.elem, (8 if run.elem == 8 else 4)
    # FSDP shards training state; a prefill holds its (replicated) weights on every rank.
    shard = dp * choice.size if run.sharding == "fsdp" and not run.prefill else 1
    params = model.params / tp
    layer_params = params / model.layers
    mem = {"params+grads+optimizer": params * static_bytes_per_param(run) / shard}
    if shard > 1:  # two layers' weights and gradients gathered (prefetch)
        mem["params+grads+optimizer"] += 2 * layer_params * e * 2
    hq_l, hkv_l = local_heads(model, choice, tp)
    d = model.head_dim
    spec = shard_spec(run, choice)
    n_ttt = len(run.ttt_layers)
    if run.prefill:
        mem["kv_cache"] = model.layers * tokens * 2 * (model.kv_heads // tp or 1) * d * e
        per = layer_saved_elements(model, choice, tp=tp)
        mem["activations"] = tokens * (per["act"] * e + per["fp32"] * 4)  # one layer live
        mem["transient"] = tokens * model.vocab * 4 / tp
        return mem
    saved = 0.0
    for i in range(model.layers):
        per = layer_saved_elements(model, choice, tp=tp, ttt=i in run.ttt_layers)
        saved += per["act"] * e + per["fp32"] * 4
    model_terms = 8 + 2 * d * e + 3 * model.hidden * e + 4 + model.vocab * (e + 4) / tp
    mem["activations"] = tokens * (saved + model_terms)
    blk = 2 * run.batch * (spec.seq_len // spec.p2p) * hkv_l * d
    in_flight = 0.0
    if choice.method in ("ring", "hybrid") and spec.p2p > 1:
        in_flight = 2 * blk * e + 3 * blk * acc + tokens * hq_l * (choice.size // spec.p2p) * d * acc
    elif choice.method == "allgather" and choice.size > 1:
        in_flight = 2 * choice.size * blk * acc
    mlp = 3 * tokens * model.ffn / tp * e
    mem["transient"] = max(in_flight, mlp) + tokens * model.vocab * 4 / tp
    if n_ttt:
        mem["ttt_state"] = n_ttt * (2 * run.batch * model.hidden * model.ffn * 4 / tp)
    return mem


def attention_time(model: ModelSpec, run: RunSpec, choice: CPChoice, rates: Rates,
                   cluster: ClusterSpec | None = None, *, local_ranks: int | None = None):
    """(forward, backward) seconds of one ``ctxpar.attention`` call with ``choice`` on its
    slowest rank (what ``ctxpar bench`` times); ``local_ranks`` as in :func:`estimate`."""
    tp = cluster.tp if cluster else 1
    fwd, bwd, _ = _attention_times(model, run, choice, rates, cluster, tp, local_ranks or choice.size * tp)
    return fwd, bwd


def estimate(model: ModelSpec, run: RunSpec, choice: CPChoice, rates: Rates,
             cluster: ClusterSpec | None = None, *, local_ranks: int | None = None) -> Estimate:
    """Predicted step (or prefill) of ``model`` on ``run`` with ``choice`` for CP; the
    rest of the cluster's devices (after TP) is data parallelism. ``local_ranks``: ranks
    sharing this machine's cores (a CPU profile; default: the CP degree)."""
    tp = cluster.tp if cluster else 1
    world = cluster.world if cluster else choice.size
    dp = max(1, world // (choice.size * tp))
    slow = rates.oversubscription(local_ranks or choice.size * tp)
    spec = shard_spec(run, choice)
    tokens = run.batch * spec.seq_len / choice.size
    a_f, a_b, exposed = _attention_times(model, run, choice, rates, cluster, tp, local_ranks or choice.size * tp)
    lin, head, ttt = _linear_flops(model, run, tokens, tp)
    k = model.hidden
    lin_f = slow * rates.matmul_time(lin, k)
    head_f = slow * rates.matmul_time(head, k)
    ttt_f = slow * rates.matmul_time(ttt, k) * len(run.ttt_layers)
    mem = _memory(model, run, choice, cluster, tp, dp, tokens, rates)
    act_bytes = mem["activations"]
    n_pass = 1 if run.prefill else 3
    other = slow * n_pass * rates.elementwise(act_bytes)
    L = model.layers
    if run.prefill:
        fwd = L * (a_f + lin_f) + head_f + ttt_f + other
        bwd = 0.0
    else:
        fwd = L * (a_f + lin_f) + head_f + ttt_f + other / 3
        bwd = L * (a_b + 2 * lin_f) + 2 * head_f + 2 * ttt_f + 2 * other / 3
    step = fwd + bwd
    peak = sum(mem.values())
    # Model FLOPs: the linear work and the visible attention pairs (not what a kernel's
    # blocking or a dense mask computes beyond them).
    work = attention_work(run, choice, rates.sub_tile_rows)
    pairs = sum(visible_pairs(t) for steps in work for w in steps for t in w.tiles)
    hq_l = local_heads(model, choice, tp)[0]
    attn_flops = 4 * model.head_dim * hq_l * run.batch * pairs * L  # all ranks of the group
    dense = (lin * L + head + ttt * len(run.ttt_layers)) * choice.size
    mult = 1 if run.prefill else 3
    amult = 1 if run.prefill else 1 + BWD_FLOP_RATIO
    flops = (dense * mult + attn_flops * amult) / choice.size
    mfu = flops / (step * rates.peak_flops) if step > 0 else 0.0
    tps = run.batch * run.seq_len / (step * choice.size * tp)
    return Estimate(choice, dp, tp, step, fwd, bwd, L * (a_f + a_b), L * exposed,
                    L * 3 * lin_f + 3 * head_f, other, mem, peak, USABLE_MEMORY * rates.memory, tps, mfu,
                    rates.peak_flops)
