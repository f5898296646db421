"""What one attention call of a CP configuration does on each rank: tiles, score
elements, bytes, and the bytes a decoder layer saves for backward.

Everything is derived from the library's own plans, never from a separate formula of the
schedule: the ring's steps from :func:`ctxpar.attn.tiles.ring_steps`, each step's tiles
from :func:`ctxpar.attn.tiles.plan_segments` over :class:`ctxpar.sequence.spec.ShardSpec`
shares (windows cut into sub-tiles), Ulysses' single pass over the whole sequence in
global order, all-gather's pairs of (rank, source). So causal skipping, zigzag balance,
windows and packed documents count exactly as they run (``tests/test_plan_work.py``
compares these numbers with ``ctxpar.comm_counters`` and the saved-tensor measurement).
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ctxpar.apps.plan.specs import ModelSpec, RunSpec
from ctxpar.attn.tiles import Tile, plan_segments, ring_steps
from ctxpar.attn.ulysses import kv_replication
from ctxpar.sequence.layouts import Segment
from ctxpar.sequence.spec import ShardSpec, cp_multiple, padded_length

__all__ = ["CPChoice", "StepWork", "shard_spec", "attention_work", "comm_bytes",
           "layer_saved_elements", "visible_pairs", "kernel_pairs", "KERNEL_BLOCKS", "device_kernel"]

METHODS = ("ring", "ulysses", "allgather", "hybrid")


@dataclasses.dataclass(frozen=True)
class CPChoice:
    """A CP configuration: ``method`` on a ``[a2a, p2p]`` mesh (ring and all-gather:
    ``a2a = 1``; Ulysses: ``p2p = 1``) with ``layout``."""

    method: str
    a2a: int
    p2p: int
    layout: str

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")
        if self.a2a < 1 or self.p2p < 1:
            raise ValueError(f"a2a and p2p must be >= 1, got [{self.a2a}, {self.p2p}]")
        if self.method in ("ring", "allgather") and self.a2a != 1:
            raise ValueError(f"method {self.method!r} runs on a 1-D group: a2a must be 1, got {self.a2a}")
        if self.method == "ulysses" and self.p2p != 1:
            raise ValueError(f"method 'ulysses' runs on a 1-D group: p2p must be 1, got {self.p2p}")

    @property
    def size(self) -> int:
        return self.a2a * self.p2p

    @property
    def spec_shape(self) -> tuple[int, int]:
        """``(p2p, a2a)`` of the ShardSpec the method uses (Ulysses: a 1-D group)."""
        return (self.size, 1) if self.method != "hybrid" else (self.p2p, self.a2a)


def shard_spec(run: RunSpec, choice: CPChoice) -> ShardSpec:
    """The ShardSpec of the run on the choice's group: packed documents padded as
    ``shard_packed`` pads them; a plain length that the layout cannot split is padded as
    ``pad_for_cp`` pads it (one document followed by padding)."""
    p2p, a2a = choice.spec_shape
    cu = run.cu_seqlens
    if cu is None and run.seq_len % cp_multiple(choice.layout, p2p, a2a):
        cu = (0, run.seq_len)
    if cu is None:
        return ShardSpec(choice.layout, p2p, a2a, run.seq_len)
    return ShardSpec(choice.layout, p2p, a2a, padded_length(cu, choice.layout, p2p, a2a), cu)


@dataclasses.dataclass(frozen=True)
class StepWork:
    """One rank's tiles of one step (a ring step, an all-gather source, Ulysses' pass)."""

    tiles: tuple[Tile, ...]

    @property
    def score_elements(self) -> int:
        return sum(t.score_elements for t in self.tiles)


def _global_segments(spec: ShardSpec) -> tuple[Segment, ...]:
    """The whole sequence in global order, one segment per run of a document, as
    Ulysses' local pass sees it after its all-to-all."""
    pos = torch.cat([spec.share_positions(r) for r in range(spec.p2p)])
    doc = torch.cat([spec.share_doc_ids(r) for r in range(spec.p2p)])[torch.argsort(pos)]
    cuts = (torch.nonzero(doc[1:] != doc[:-1]).flatten() + 1).tolist()
    bounds = [0] + cuts + [doc.numel()]
    return tuple(Segment(a, b - a, 1, int(doc[a])) for a, b in zip(bounds, bounds[1:]))


@functools.lru_cache(maxsize=64)
def attention_work(run: RunSpec, choice: CPChoice, sub: int) -> tuple[tuple[StepWork, ...], ...]:
    """For every CP rank (``ring_rank * a2a + ulysses_rank``), the steps of one attention
    call, in order: the ring's steps (ring, hybrid), the sources with work, own block
    first (all-gather), or one whole-sequence pass (Ulysses). Forward and backward
    evaluate the same tiles. ``sub``: sub-tile rows of windowed bands (the device's)."""
    spec = shard_spec(run, choice)
    causal, window = run.causal, run.window_pair
    if choice.method == "ulysses":
        segs = _global_segments(spec) if spec.docs else (Segment(0, spec.seq_len, 1, 0),)
        one = (StepWork(tuple(plan_segments(segs, segs, causal=causal, window=window,
                                            diagonal=True, sub=sub))),)
        return tuple(one for _ in range(choice.size))
    n = spec.p2p
    sampled = _sampled_ranks(n, run)
    steps = n if (choice.method == "allgather" or len(sampled) < n) else ring_step_count(run, choice)
    per_ring = {}
    for r in sampled:
        if choice.method == "allgather":
            srcs = [r] + [s for s in range(n) if s != r]
        else:
            srcs = [(r - s) % n for s in range(steps)]
        work = tuple(StepWork(tuple(plan_segments(spec.share(r), spec.share(src), causal=causal,
                                                  window=window, diagonal=src == r, sub=sub)))
                     for src in srcs)
        if choice.method == "allgather":
            work = tuple(w for w in work if w.tiles)
        per_ring[r] = work
    near = [min(sampled, key=lambda s: abs(s - r)) for r in range(n)]
    return tuple(per_ring[near[q // choice.a2a]] for q in range(choice.size))


# Above this many ring ranks (plain sequences, no window) a few ranks stand for all: the
# first, second, middle and last two (zigzag's ranks are alike; contiguous work grows
# with the rank), so that a 1024-device search stays within seconds.
EXACT_RING_RANKS = 16


def _sampled_ranks(n: int, run: RunSpec) -> list[int]:
    if n <= EXACT_RING_RANKS or run.docs or run.window:
        return list(range(n))
    return sorted({0, 1, n // 2, n - 2, n - 1})


def ring_step_count(run: RunSpec, choice: CPChoice) -> int:
    """Ring steps of one call (``ctxpar.attn.tiles.ring_steps``; every rank without a
    window or documents)."""
    spec = shard_spec(run, choice)
    if spec.p2p > EXACT_RING_RANKS and not run.docs and not run.window:
        return spec.p2p
    return ring_steps(spec.share, spec.p2p, causal=run.causal, window=run.window_pair)


def local_heads(model: ModelSpec, choice: CPChoice, tp: int = 1) -> tuple[int, int]:
    """(query heads, K/V heads) one rank's attention kernels run on: Ulysses degrees
    divide the heads (K/V heads after GQA replication, ``kv_replication``), TP too."""
    hq, hkv = model.heads // tp, max(1, model.kv_heads // tp)
    deg = choice.size if choice.method == "ulysses" else (choice.a2a if choice.method == "hybrid" else 1)
    return hq // deg, hkv * kv_replication(hkv, deg) // deg


def comm_bytes(model: ModelSpec, run: RunSpec, choice: CPChoice, tp: int = 1) -> dict:
    """Bytes one rank receives (= sends) in one attention call, by operation, forward and
    backward: ``{"fwd": {op: bytes}, "bwd": {op: bytes}}`` with op among ``p2p``,
    ``all_to_all``, ``all_gather``, ``reduce_scatter``. Per design (the formulas of
    ``ctxpar.attn.ring``/``allgather``/``ulysses``): a K/V block ``b = 2·B·L·Hkv·D``
    elements; ring fwd ``(steps-1)·b·e``, bwd the same plus ``steps·b·acc`` (dK/dV partial
    sums in fp32/fp64) when ``steps > 1``; all-gather ``(N-1)·b·e`` and ``(N-1)·b·acc``;
    Ulysses ``(N-1)/N`` of q, k, v, out (k, v with replicated heads), and the mirror."""
    e, acc = run.elem, (8 if run.elem == 8 else 4)
    d, bsz = model.head_dim, run.batch
    hq, hkv = model.heads // tp, max(1, model.kv_heads // tp)
    spec = shard_spec(run, choice)
    fwd = {"p2p": 0, "all_to_all": 0, "all_gather": 0, "reduce_scatter": 0}
    bwd = dict(fwd)
    deg = choice.size if choice.method == "ulysses" else (choice.a2a if choice.method == "hybrid" else 1)
    if deg > 1:
        rep_kv = hkv * kv_replication(hkv, deg)
        local = spec.seq_len // choice.size
        vol = sum((deg - 1) * local * bsz * (h // deg) * d * e for h in (hq, rep_kv, rep_kv, hq))
        fwd["all_to_all"] = bwd["all_to_all"] = vol
    if choice.method in ("ring", "hybrid") and spec.p2p > 1:
        steps = ring_step_count(run, choice)
        kvh = local_heads(model, choice, tp)[1]
        blk = 2 * bsz * (spec.seq_len // spec.p2p) * kvh * d
        fwd["p2p"] = (steps - 1) * blk * e
        bwd["p2p"] = (steps - 1) * blk * e + (steps * blk * acc if steps > 1 else 0)
    if choice.method == "allgather" and spec.p2p > 1:
        blk = 2 * bsz * (spec.seq_len // spec.p2p) * hkv * d
        fwd["all_gather"] = (spec.p2p - 1) * blk * e
        bwd["reduce_scatter"] = (spec.p2p - 1) * blk * acc
    return {"fwd": fwd, "bwd": bwd}


def visible_pairs(tile: Tile) -> int:
    """Query-key pairs of ``tile`` its band lets through (what a fused causal kernel,
    which skips the masked part, actually computes). Closed form: the pairs on diagonal
    ``m = i - j`` number ``f(m) = min(lq, lk + m) - max(0, m)``, linear between the
    breakpoints 0 and ``lq - lk``, summed over the band's diagonals."""
    lq, lk, band = tile.q1 - tile.q0, tile.k1 - tile.k0, tile.band
    m0 = -(lk - 1) if band.lo is None else max(band.lo, -(lk - 1))
    m1 = lq - 1 if band.hi is None else min(band.hi, lq - 1)
    if m0 > m1:
        return 0

    def f(m: int) -> int:
        return min(lq, lk + m) - max(0, m)

    cuts = sorted({m0, m1 + 1} | {c for c in (0, lq - lk) if m0 < c <= m1})
    return sum((f(a) + f(b - 1)) * (b - a) // 2 for a, b in zip(cuts, cuts[1:]))


# How a fused kernel's causal flag skips work: per block of query rows it computes whole
# blocks of keys, up to the block holding the block's last visible key.
# - torch's CPU flash kernel splits queries into 256 rows from 768 rows on (64 from 192,
#   else 32) and keys into 512 (all of them below 512). So a causal 512 x 512 tile costs
#   a whole tile, 1024 three quarters, 2048 0.625: within 5% of the measured forward and
#   backward at 256-3072 rows (one thread, 8 heads of 64; benchmarks/bench_causal_blocks.py).
# - flash-attn's CUDA kernels work in 128 x 128 blocks: assumed, not measured here.
KERNEL_BLOCKS = {
    "cpu_flash": lambda lq, lk: (256 if lq >= 768 else 64 if lq >= 192 else 32, 512 if lk >= 512 else lk),
    "cuda": lambda lq, lk: (128, 128),
}


def device_kernel(device_type: str) -> str:
    """The :data:`KERNEL_BLOCKS` entry of the fused kernel ctxpar runs on ``device_type``."""
    return "cpu_flash" if device_type == "cpu" else "cuda"


def _causal_block_pairs(n: int, kernel: str) -> int:
    """Pairs a fused kernel computes for a square causal ``n x n`` block."""
    qb, kb = KERNEL_BLOCKS[kernel](n, n)
    total = 0
    for i0 in range(0, n, qb):
        rows = min(qb, n - i0)
        total += rows * min(n, -(-(i0 + rows) // kb) * kb)
    return total


def kernel_pairs(tile: Tile, kernel: str) -> tuple[int, int]:
    """``(pairs, masked)``: the pairs the ``kernel`` (:data:`KERNEL_BLOCKS`) computes for
    ``tile`` as ``ctxpar.attn.kernels.block_forward`` runs it, and how many of them lie
    under a dense mask it builds. A band ``lo >= 0`` open above drops its first ``lo``
    rows and runs the rest as a causal flag when that block is square
    (:func:`_causal_block_pairs`); every other banded tile is a dense mask over the whole
    tile; a full tile is the whole tile, unmasked."""
    lq, lk, band = tile.q1 - tile.q0, tile.k1 - tile.k0, tile.band
    if band.is_full:
        return lq * lk, 0
    if band.hi is not None or band.lo is None or band.lo < 0:
        return lq * lk, lq * lk
    rows = lq - band.lo
    if rows <= 0:
        return 0, 0
    keys = lk if band.lo == 0 else min(lk, rows)
    if keys == rows:
        return _causal_block_pairs(rows, kernel), 0
    return rows * keys, rows * keys


def layer_saved_elements(model: ModelSpec, choice: CPChoice, *, tp: int = 1,
                         ttt: bool = False) -> dict:
    """Elements one decoder layer saves for backward per local token, by dtype class:
    ``{"act": n, "fp32": n}`` (``act`` in the run's dtype), as eager PyTorch runs a
    Llama-style layer under ``ctxpar.attention`` (measured: the bench's DecoderLayer and
    HF Llama save exactly these):

    - each RMSNorm (replicated under TP): its input, the normalised input and the weighted output (3·hidden),
      and its fp32 reciprocal RMS (1);
    - attention: q, k, v, out of the method's kernels (k, v with Ulysses' replicated heads;
      all-gather saves the gathered K/V of every rank: N times the local k, v), plus its
      fp32 LSE (heads); Ulysses and hybrid also keep the all-to-all'd output for o_proj;
    - the gated MLP: gate and up outputs, silu(gate) and the product (4·ffn);
    - an In-Place TTT MLP in addition keeps its projection's input and its target V̂
      (2·hidden; ``ctxpar.ttt.ops.TTTApply`` saves z, the MLP's product, in place of
      down_proj's input; its per-block carries, hidden·ffn per 1024-token chunk block,
      are left out).
    RoPE's cos/sin tables (2·head_dim, shared by the layers in HF) are a model term."""
    h, d = model.hidden, model.head_dim
    hq, hkv = model.heads // tp, max(1, model.kv_heads // tp)
    hq_l, hkv_l = local_heads(model, choice, tp)
    deg = hq // hq_l
    # Per *local token*, the kernels' tensors hold the rank's heads over deg x more tokens.
    q_el, kv_el = hq * d, hkv_l * deg * d
    if choice.method == "allgather":
        kv_el *= choice.size
    act = 6 * h + 2 * q_el + 2 * kv_el + 4 * model.ffn // tp
    if deg > 1:
        act += q_el  # o_proj's input: the all-to-all'd output, besides the kernel's own out
    if ttt:
        act += 2 * h
    return {"act": act, "fp32": 2 + hq}
