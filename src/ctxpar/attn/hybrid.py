"""Hierarchical CP (USP-style): Ulysses inside each node, a ring across nodes.

On a mesh ``("ring", "ulysses")`` of shape ``(p2p, a2a)`` (``ctxpar.cp_mesh``), rank
(r, u) holds the u-th contiguous piece of ring rank r's layout share (see
``ctxpar.sequence.layouts``). Forward:

1. three all-to-alls inside the Ulysses group (a2a ranks): q, k, v go from
   ``[B, S/(p2p·a2a), H, D]`` to ``[B, S/p2p, H/a2a, D]``. The pieces concatenate in
   Ulysses-rank order, so every member now holds ring rank r's whole share, in the ring
   layout's local order, for its head shard;
2. ring attention (``ctxpar.attn.ring``) over the ring axis on those head-sharded tensors:
   the ring group of rank (r, u) is the p2p ranks (·, u), which all hold head shard u;
3. one all-to-all back (the LSE rides along when requested).

Backward is the mirror image, through autograd: dout all-to-all, the ring backward,
dq/dk/dv all-to-alls. K/V heads are replicated for GQA as in Ulysses, with the degree a2a.
Communication per call: Ulysses' counts and bytes with N = a2a, plus the ring's with
N = p2p on tensors of ``S/p2p`` tokens and ``Hkv'/a2a`` K/V heads.

Packed documents (``cu_seqlens``) are the ring's: its packed order over the ring axis
(documents padded so that each ring rank's share splits evenly, ``ctxpar.shard_packed``),
split contiguously within the Ulysses group like any layout.

``[N, 1]`` (p2p = 1) is Ulysses on contiguous pieces followed by a one-rank "ring" (one
local causal kernel); ``[1, N]`` skips both all-to-alls and is the ring, bit for bit.
"""
from __future__ import annotations

from ctxpar.attn.options import AttnOptions
from ctxpar.attn.ring import ring_attention
from ctxpar.attn.ulysses import head_to_seq, kv_replication, seq_to_head
from ctxpar.dist.topology import CPTopology
from ctxpar.sequence.spec import ShardSpec

__all__ = ["hybrid_attention"]


def hybrid_attention(q, k, v, topo: CPTopology, spec: ShardSpec, opts: AttnOptions):
    """Hierarchical attention over a ``("ring", "ulysses")`` topology (see
    :mod:`ctxpar.attn.options`); returns ``(out, lse)`` (``lse`` None when
    ``opts.return_lse`` is False)."""
    uly = topo.ulysses
    rep = kv_replication(k.shape[2], uly.size)
    qh = seq_to_head(q, uly)
    kh = seq_to_head(k, uly, rep=rep)
    vh = seq_to_head(v, uly, rep=rep)
    oh, lh = ring_attention(qh, kh, vh, topo, spec, opts)
    return head_to_seq(oh, lh if opts.return_lse else None, uly)
