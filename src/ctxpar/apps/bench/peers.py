"""Peer context-parallel libraries for ``ctxpar bench``, each an optional extra.

A peer is run side by side with ctxpar in the same run, on the same shapes, through the
same timing, error, memory and compute-vs-wait measurements (see ``ctxpar.apps.bench.run``). Each
entry of :data:`PEERS` says which layout its shards must be in and builds a callable
``fn(q, k, v) -> out`` on ``[B, S_local, H, D]`` shards, run on every rank.

- ``deepspeed-ulysses``: DeepSpeed's ``deepspeed.sequence.layer.DistributedAttention``
  wrapped around torch's fused ``scaled_dot_product_attention`` (the local attention over
  the whole sequence for ``H/N`` heads). Runs on CPU with gloo as shipped; install it with
  ``DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed`` (so its build does not
  pull a CUDA torch). It gathers the sequence in rank order, so its shards are
  ``contiguous`` (it has no load-balancing layout).
- ``torch-cp`` (``torch.distributed.tensor.experimental.context_parallel``),
  ``ring-flash-attn`` and ``yunchang``: CUDA only as shipped (flash-attn kernels / NCCL),
  and they need one GPU per rank; reported as skipped with the reason otherwise. Their
  adapters are not implemented yet (no multi-GPU machine was available to check them).

:func:`peer_status` returns None when a peer can run here, else the note explaining why
not. Nothing here is imported by ``ctxpar`` itself; peers are never core dependencies.
"""
from __future__ import annotations

import importlib.util

import torch

__all__ = ["PEERS", "peer_status", "make_peer", "peer_layout"]

PEERS = ("deepspeed-ulysses", "torch-cp", "ring-flash-attn", "yunchang")

_MODULES = {"deepspeed-ulysses": "deepspeed", "torch-cp": "torch.distributed.tensor.experimental",
            "ring-flash-attn": "ring_flash_attn", "yunchang": "yunchang"}
_LAYOUT = {"deepspeed-ulysses": "contiguous", "torch-cp": "contiguous",
           "ring-flash-attn": "zigzag", "yunchang": "zigzag"}


def peer_layout(name: str) -> str:
    """The sequence layout the peer's shards must be in."""
    return _LAYOUT[name]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def peer_status(name: str, *, device: str, world: int, hq: int, hkv: int) -> str | None:
    """None if ``name`` can run here on these shapes, else a one-line note saying why not."""
    if name not in PEERS:
        return f"unknown peer {name!r}; known: {', '.join(PEERS)}"
    if not _installed(_MODULES[name]):
        extra = " (DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)" if name == "deepspeed-ulysses" else ""
        return f"not installed{extra}"
    if name == "deepspeed-ulysses":
        if hq % world or hkv % world:
            return f"heads ({hq} q, {hkv} kv) do not split over {world} ranks"
        return None
    if device != "cuda":
        return "runs only on CUDA as shipped"
    if world > max(1, torch.cuda.device_count()):
        return f"needs one GPU per rank ({world} ranks, {torch.cuda.device_count()} GPU(s))"
    return "adapter not implemented yet (not checked on a multi-GPU machine)"


def _sdpa_local(causal: bool):
    """torch's fused attention on ``[B, S, h, D]`` tensors (the peer's local attention)."""
    def local(q, k, v, *args, **kwargs):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
            enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)
    return local


def _deepspeed_ulysses(causal: bool):
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    # deepspeed.init_distributed would JIT-compile a shared-memory all-reduce op on CPU
    # (minutes, needs a compiler, and unused by the all-to-alls measured here): mark it
    # unavailable in this (benchmark worker) process only.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    from deepspeed.sequence.layer import DistributedAttention

    attn = DistributedAttention(_sdpa_local(causal), dist.group.WORLD, scatter_idx=2, gather_idx=1)
    return lambda q, k, v: attn(q, k, v, batch_dim_idx=0)


def make_peer(name: str, *, causal: bool):
    """Build the peer's ``fn(q, k, v) -> out`` for this rank (call on every rank, after
    ``peer_status`` returned None)."""
    if name == "deepspeed-ulysses":
        return _deepspeed_ulysses(causal)
    raise ValueError(f"peer {name!r} has no adapter here")
