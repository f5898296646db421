"""The TTT plan of one rank: its blocks of whole chunks (one per run of consecutive tokens
of its shard, :meth:`ctxpar.sequence.spec.ShardSpec.runs`), their document-reset flags and
the scan's element map. Built once per call by :func:`build_plan`; read by
:class:`ctxpar.ttt.ops.TTTApply`."""
from __future__ import annotations

import bisect
import dataclasses

import torch

from ctxpar.dist.topology import CPTopology
from ctxpar.scan import owners_of_runs
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.spec import ShardSpec, cp_multiple

__all__ = ["Block", "Plan", "build_plan", "chunk_resets", "extend_last_document"]


@dataclasses.dataclass(frozen=True)
class Block:
    """A run of consecutive global chunks held by this rank (one for contiguous, two for
    zigzag). ``flags[i]``: a document starts inside chunk i, so the prefix restarts
    before it (chunk i sees W_0 plus nothing)."""

    row0: int
    rows: int
    elem: int
    flags: tuple[bool, ...]

    @property
    def first_reset(self) -> int:
        """Chunks before this index receive the carry from earlier blocks."""
        return next((i for i, f in enumerate(self.flags) if f), len(self.flags))

    @property
    def last_reset(self) -> int:
        """The block's summary (its state when it ends) starts at this chunk."""
        return max((i for i, f in enumerate(self.flags) if f), default=0)


@dataclasses.dataclass(frozen=True)
class Plan:
    chunk: int
    blocks: tuple[Block, ...]
    held: tuple[tuple[int, ...], ...]  # element (block) indices of every CP rank, see ctxpar.scan
    grp: CPTopology  # the CP group (a mesh's ring x ulysses, or a 1-D group)
    layout: str
    algorithm: str
    clip: float | None
    segmented: bool  # document resets are on (every rank agrees: cu_seqlens is global)
    overlap: bool = True  # forward: summaries first, gather in flight during the chunk loop

    @property
    def n_elems(self) -> int:
        """Blocks of the whole sequence, over all ranks."""
        return sum(len(h) for h in self.held)

    def resets(self, device) -> torch.Tensor | None:
        """Per-block scan reset flags, bool ``[m]``: True if a document starts in the block
        (the state restarts there; the scan selects, so a non-finite earlier document never
        reaches it). None without documents."""
        if not self.segmented:
            return None
        return torch.tensor([any(b.flags) for b in self.blocks], dtype=torch.bool, device=device)


def chunk_resets(cu_seqlens, seq_len: int, chunk: int, start: int, n_chunks: int) -> tuple[bool, ...]:
    """Reset flags of global chunks ``start .. start+n_chunks-1``: True where a document
    starts inside the chunk. ``cu_seqlens``: ``[0, ..., seq_len]``, non-decreasing."""
    cu = [int(x) for x in torch.as_tensor(cu_seqlens).reshape(-1).tolist()]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != seq_len or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must run non-decreasing from 0 to the global length {seq_len}; got {cu}")
    starts = sorted(set(cu[:-1]))
    flags = []
    for i in range(start, start + n_chunks):
        k = bisect.bisect_left(starts, i * chunk)
        flags.append(k < len(starts) and starts[k] < (i + 1) * chunk)
    return tuple(flags)



def _padding_hint(cfg, topo: CPTopology, seq_len: int) -> str:
    """What global length a plain sequence needs, and how to get it padded."""
    mult = cp_multiple(cfg.layout, topo.ring.size, topo.ulysses.size) * cfg.chunk_size
    need = -(-seq_len // mult) * mult
    return (f"; the global sequence of {seq_len} tokens must be a multiple of {mult}: pad it to "
            f"{need} (ctxpar.shard_batch(..., multiple_of={cfg.chunk_size}) or "
            f"ctxpar.pad_for_cp(..., multiple_of={cfg.chunk_size}) do; padding at the end "
            "changes no real token's output)")


def build_plan(cfg, topo: CPTopology, local_len: int, cu_seqlens=None) -> Plan:
    """This rank's blocks of chunks (one per run of consecutive tokens of its shard), with
    their reset flags; the chunk grid is that of the (padded) global sequence. ``cfg`` is
    a :class:`ctxpar.ttt.TTTConfig`.

    Cost: one scan element, so one ``[B, D, F]`` carry, per run. That is 1 or 2 per rank
    for plain shards, but packed zigzag balances each document on its own (two pieces per
    document per rank, touching pieces merged), so its carries and gathered bytes grow
    with the number of documents."""
    c = cfg.chunk_size
    # One process holds a plain sequence as it is, whatever the layout: zigzag's even-length
    # rule would refuse an odd padded length (chunk_size 1, or an odd chunk) for nothing.
    # (Packed documents keep the layout: shard_packed pads each document by its rule.)
    layout = "contiguous" if topo.size == 1 and cu_seqlens is None else cfg.layout
    spec = ShardSpec.make(get_layout(layout), topo, local_len, cu_seqlens)
    runs, seq_len, starts = [spec.runs(q) for q in range(topo.size)], spec.seq_len, spec.doc_starts
    held = owners_of_runs([[start for start, _ in rank] for rank in runs])
    # Every rank knows every rank's runs: check them all, so that all ranks raise
    # together instead of the aligned ones waiting in the scan's gather.
    bad = [q for q, rank in enumerate(runs) if any(start % c or n % c for start, n in rank)]
    if bad:
        q = topo.rank if topo.rank in bad else bad[0]
        who = "this rank" if q == topo.rank else f"CP rank {q}"
        where = f"{topo.size} rank(s)" if not topo.is_mesh else f"a mesh of sizes {topo.sizes} ([a2a, p2p])"
        raise ValueError(
            f"chunk_size={c} does not divide the shard: layout={cfg.layout!r} on {where} gives "
            f"{who} {local_len} tokens in runs (start, length) {list(runs[q])}, which "
            "must start and end on chunk boundaries" + (
                f" (packed {cfg.layout}: every document must pad to a multiple of "
                f"{get_layout(cfg.layout).granularity(topo.size)} x {c} tokens)"
                if cu_seqlens is not None and get_layout(cfg.layout).balances_documents else "")
            + ("" if cu_seqlens is not None else _padding_hint(cfg, topo, spec.seq_len)))
    resets = None if cu_seqlens is None else tuple(starts) + (seq_len,)
    blocks, row = [], 0
    for (start, n), elem in zip(runs[topo.rank], held[topo.rank]):
        flags = (chunk_resets(resets, seq_len, c, start // c, n // c) if resets is not None
                 else (False,) * (n // c))
        blocks.append(Block(row, n, elem, flags))
        row += n
    return Plan(c, tuple(blocks), held, topo, cfg.layout, cfg.scan_algorithm, cfg.clip_tau,
                cu_seqlens is not None, cfg.overlap)


def extend_last_document(cu_seqlens, total: int):
    """``cu_seqlens`` with its last boundary moved to ``total`` (padding joins the last
    document, so no chunk of it resets); None stays None."""
    if cu_seqlens is None:
        return None
    cu = torch.as_tensor(cu_seqlens).clone()
    cu[-1] = total
    return cu
