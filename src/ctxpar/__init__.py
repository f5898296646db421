"""ctxpar: context parallelism for PyTorch (ring, Ulysses, hierarchical and all-gather
attention across a sequence-sharded CP group, plus In-Place test-time training).

Tensor layout: ``[batch, seq, heads, head_dim]``; LSE ``[batch, heads, seq]``. The package
is layered (see ARCHITECTURE.md); this module only re-exports the public names.
"""
from ctxpar import scan, ttt
from ctxpar.attn.dispatch import METHODS, AttentionConfig, attention, choose_method
from ctxpar.dist.mesh import cp_mesh
from ctxpar.observe.counters import CommCounters, comm_counters
from ctxpar.sequence.layouts import LAYOUTS
from ctxpar.sequence.packing import PackedShard, PadInfo, pad_for_cp, shard_packed, unshard_packed
from ctxpar.sequence.sharding import position_ids, shard, unshard
from ctxpar.ttt import InPlaceTTTMLP

__version__ = "0.1.0"

__all__ = [
    "InPlaceTTTMLP",
    "scan",
    "ttt",
    "METHODS",
    "AttentionConfig",
    "attention",
    "choose_method",
    "cp_mesh",
    "LAYOUTS",
    "CommCounters",
    "comm_counters",
    "PackedShard",
    "PadInfo",
    "pad_for_cp",
    "position_ids",
    "shard",
    "shard_packed",
    "unshard",
    "unshard_packed",
]
