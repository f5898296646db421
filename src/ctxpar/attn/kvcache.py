"""A KV cache sharded over a CP group: who keeps which token, and what a rank's shard holds.

**Slots.** Every token fed to the model during one generation has a global *slot*: 0, 1, ...
in the order the tokens were fed (the prompt, padded as a whole, then continuation prefills,
then decode tokens). Causal masking and sliding windows compare slots (a window of ``w``
keeps keys with ``q_slot - w <= k_slot``); padded slots are *invalid keys*, per batch row,
and are never attended to.

**Who keeps which token** (every rank can compute it, so no index is ever exchanged):

- a prefill of ``m`` new tokens at slots ``T .. T+m-1`` (``m`` a multiple of the layout's
  ``cp_multiple``) is split by the layout: CP rank r keeps slots
  ``T + ShardSpec(layout, p2p, a2a, m).positions(r)``, in that (local) order
  (:func:`prefill_slots`);
- a decode token at slot ``p`` is kept by CP rank ``p mod N`` (:func:`decode_owner`): after
  a prefill (``T`` a multiple of N) the decode tokens go to ranks 0, 1, ..., N-1, 0, ...,
  so the shards never differ by more than one token.

No rank ever holds another rank's keys and values. Shapes: ``k``/``v`` ``[B, n, Hkv, D]``,
``slots`` ``[n]`` (int64), ``valid`` ``[B, n]`` (bool).
"""
from __future__ import annotations

import dataclasses

import torch

from ctxpar.dist.topology import CPTopology
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.spec import ShardSpec

__all__ = ["KVShard", "decode_owner", "prefill_slots", "prefill_holder", "visibility",
           "group_signature", "check_setup"]


def decode_owner(slot: int, topo: CPTopology) -> int:
    """The CP rank that keeps the decode token at global slot ``slot``: ``slot mod N``."""
    return slot % topo.size


def prefill_slots(layout: str, topo: CPTopology, new_len: int, offset: int,
                  device=None) -> torch.Tensor:
    """Global slots ``[new_len // N]`` of this rank's share of ``new_len`` new tokens that
    start at slot ``offset`` (the layout's split of the new tokens)."""
    spec = ShardSpec(get_layout(layout), topo.ring.size, topo.ulysses.size, new_len)
    return spec.positions(topo.rank, device) + offset


def prefill_holder(layout: str, topo: CPTopology, new_len: int, index: int) -> tuple[int, int]:
    """``(CP rank, local index)`` of the ``index``-th of ``new_len`` prefill tokens."""
    spec = ShardSpec(get_layout(layout), topo.ring.size, topo.ulysses.size, new_len)
    for rank in range(topo.size):
        hits = (spec.positions(rank) == index).nonzero()
        if hits.numel():
            return rank, int(hits[0, 0])
    raise ValueError(f"token {index} is not among the {new_len} prefill tokens")


def group_signature(topo: CPTopology) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The global ranks of the topology's ring and Ulysses groups (names a CP group)."""
    return (tuple(topo.ring.global_rank(i) for i in range(topo.ring.size)),
            tuple(topo.ulysses.global_rank(i) for i in range(topo.ulysses.size)))


def check_setup(group: tuple, layout_name: str, topo: CPTopology, layout: str) -> None:
    """Raise ValueError, naming both, unless a cache made on ``group`` (a
    :func:`group_signature`) with ``layout_name`` is used on ``topo`` with ``layout``."""
    layout = get_layout(layout).name
    here = group_signature(topo)
    if layout_name != layout or group != here:
        raise ValueError(
            f"this KV cache was made for CP group {group} with layout={layout_name!r}; it "
            f"cannot be used on CP group {here} with layout={layout!r}")


def visibility(q_slots: torch.Tensor, k_slots: torch.Tensor, k_valid: torch.Tensor, *,
               causal: bool, window: tuple[int, int]) -> torch.Tensor:
    """Boolean ``[B, Sq, Sk]``: may query slot i see key slot j (causal, window
    ``(left, right)`` flash-attn convention, valid key)."""
    d = q_slots[:, None] - k_slots[None, :]
    vis = torch.ones(d.shape, dtype=torch.bool, device=d.device)
    if causal:
        vis &= d >= 0
    left, right = window
    if left >= 0:
        vis &= d <= left
    if right >= 0:
        vis &= d >= -right
    return vis[None] & k_valid[:, None, :]


@dataclasses.dataclass
class KVShard:
    """One layer's keys and values on one CP rank, with their slots and validity.

    ``counts[r]`` is the number of tokens CP rank r keeps (the same tuple on every rank: it
    follows from the rules above); ``layout`` and ``group`` (:func:`group_signature`) name
    the CP setup the shard belongs to."""

    k: torch.Tensor
    v: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor
    counts: tuple[int, ...]
    layout: str
    group: tuple

    @classmethod
    def empty(cls, like_k: torch.Tensor, like_v: torch.Tensor, topo: CPTopology,
              layout: str) -> "KVShard":
        """An empty shard for keys/values shaped like ``like_k``/``like_v`` ``[B, *, H, D]``."""
        b, _, hkv, d = like_k.shape
        return cls(like_k.new_empty(b, 0, hkv, d), like_v.new_empty(b, 0, hkv, like_v.shape[-1]),
                   torch.zeros(0, dtype=torch.int64, device=like_k.device),
                   torch.zeros(b, 0, dtype=torch.bool, device=like_k.device),
                   (0,) * topo.size, get_layout(layout).name, group_signature(topo))

    @property
    def total(self) -> int:
        """Tokens in the whole (group) cache: the next free slot."""
        return sum(self.counts)

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's keys and values."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def check_belongs(self, topo: CPTopology, layout: str) -> None:
        """Refuse a shard of another CP group or layout, naming both."""
        check_setup(self.group, self.layout, topo, layout)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` ``[B']`` (beam search: each beam continues the row it
        extends). Slots and counts are per token, the same for every row."""
        index = index.to(self.k.device)
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
        self.valid = self.valid.index_select(0, index.to(self.valid.device))

    def append(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
               valid: torch.Tensor, added: tuple[int, ...]) -> None:
        """Keep ``k``/``v`` ``[B, m, Hkv, D]`` at ``slots`` ``[m]``; ``added[r]`` tokens were
        added on CP rank r (this rank's entry is ``m``)."""
        self.k = torch.cat([self.k, k.to(self.k.dtype)], 1)
        self.v = torch.cat([self.v, v.to(self.v.dtype)], 1)
        self.slots = torch.cat([self.slots, slots.to(self.slots.device)])
        self.valid = torch.cat([self.valid, valid.to(device=self.valid.device, dtype=torch.bool)], 1)
        self.counts = tuple(c + a for c, a in zip(self.counts, added))

    def append_prefill(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                       valid: torch.Tensor) -> None:
        """This rank's share of a prefill (every rank adds as many tokens)."""
        self.append(k, v, slots, valid, (k.shape[1],) * len(self.counts))

    def append_decode(self, k: torch.Tensor, v: torch.Tensor, topo: CPTopology) -> int:
        """A decode token ``[B, 1, Hkv, D]`` (the same on every rank) at the next slot: kept
        only by its owner (:func:`decode_owner`). Returns its slot."""
        slot = self.total
        owner = decode_owner(slot, topo)
        added = tuple(int(r == owner) for r in range(topo.size))
        if topo.rank == owner:
            slots = torch.tensor([slot], dtype=torch.int64, device=self.slots.device)
            self.append(k, v, slots, torch.ones(k.shape[0], 1, dtype=torch.bool), added)
        else:
            self.counts = tuple(c + a for c, a in zip(self.counts, added))
        return slot
