"""ctxpar: context parallelism for PyTorch (ring, Ulysses, hierarchical and all-gather
attention across a sequence-sharded CP group, plus In-Place test-time training).

Tensor layout: ``[batch, seq, heads, head_dim]``; LSE ``[batch, heads, seq]``.
"""
from .attention import METHODS, AttentionConfig, attention, choose_method
from .comms import CommCounters, comm_counters
from .mesh import cp_mesh
from .layouts import LAYOUTS, position_ids, shard, unshard
from . import scan, ttt
from .ttt import InPlaceTTTMLP
from .packing import PackedShard, PadInfo, pad_for_cp, shard_packed, unshard_packed

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
