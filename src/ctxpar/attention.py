"""The public entry point: ``ctxpar.attention`` over a sequence-sharded CP group."""
from __future__ import annotations

import dataclasses
import math

import torch

from .comms import CPGroup, resolve_group
from .kernels import BACKENDS
from .layouts import check_divisible, check_layout
from .checks import check_consistent_args
from .packing import ShardSpec
from .ring import ring_attention

__all__ = ["attention", "AttentionConfig", "METHODS"]

METHODS = ("ring",)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """How one attention call is distributed and masked; validated on construction."""

    method: str = "ring"
    layout: str = "zigzag"
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        check_layout(self.layout)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        w = tuple(self.window)
        if len(w) != 2 or any((not isinstance(x, int)) or x < -1 for x in w):
            raise ValueError(f"window must be (left, right) with ints >= -1; got {self.window!r}")
        object.__setattr__(self, "window", w)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Local shape/dtype/device checks; raise ValueError naming the offending values."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be [batch, seq, heads, head_dim] (4 dims); got {t.dim()} dims, "
                f"shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, local sequence "
            f"length and head_dim")
    hq, hkv = q.shape[2], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
              method: str = "ring", layout: str = "zigzag", causal: bool = False,
              scale: float | None = None, window: tuple[int, int] = (-1, -1),
              return_lse: bool = False, backend: str = "auto", cu_seqlens=None,
              check_args: bool = True):
    """Exact softmax attention over a sequence sharded across the CP group.

    Args:
        q: ``[B, S_local, Hq, D]``, this rank's queries in the ``layout``'s local order
            (see ``ctxpar.shard``).
        k, v: ``[B, S_local, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA).
        group: the CP group: None (WORLD, or a world of one without torch.distributed),
            a ProcessGroup or a 1-D DeviceMesh.
        method: "ring" (K/V rotate peer to peer).
        layout: "contiguous", "zigzag" or "striped": how the global sequence was sharded.
        causal: causal masking by *global* position.
        scale: softmax scale, default ``D ** -0.5``.
        window: ``(left, right)`` sliding window by global position, flash-attn
            convention; ``(-1, -1)`` is none.
        return_lse: also return the log-sum-exp.
        backend: local kernel backend, see ``ctxpar.kernels``.
        cu_seqlens: packed documents: the *original* global int32 boundaries
            ``[0, e1, ..., S]``; the shards must come from ``ctxpar.shard_packed`` (or
            ``ctxpar.pad_for_cp``). Attention never crosses a document, never sees padding.
        check_args: compare the arguments that must agree across ranks (one small
            all-gather, see ``ctxpar.checks``); pass False to skip it for speed.

    Returns:
        ``out`` ``[B, S_local, Hq, D]`` in q's dtype, or ``(out, lse)`` with ``lse``
        ``[B, Hq, S_local]`` in fp32 (fp64 for fp64 inputs). Differentiable in q, k, v.
    """
    cfg = AttentionConfig(method=method, layout=layout, causal=causal, window=window,
                          backend=backend)
    check_qkv(q, k, v)
    grp: CPGroup = resolve_group(group)
    if check_args:
        check_consistent_args(grp, q, k, causal=cfg.causal, window=cfg.window, layout=cfg.layout,
                              method=cfg.method, cu_seqlens=cu_seqlens)
    if cu_seqlens is None:
        check_divisible(q.shape[1] * grp.size, cfg.layout, grp.size,
                        what=f"global sequence length (local {q.shape[1]} x {grp.size} ranks)")
    else:
        ShardSpec.make(cfg.layout, grp.size, q.shape[1], cu_seqlens)  # validates the lengths
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    out, lse = ring_attention(q, k, v, grp=grp, layout=cfg.layout, causal=cfg.causal,
                              window=cfg.window, scale=scale, backend=cfg.backend,
                              cu_seqlens=cu_seqlens)
    return (out, lse) if return_lse else out
