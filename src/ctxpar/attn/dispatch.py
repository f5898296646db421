"""The public entry point, ``ctxpar.attention``: validate once, build the shard spec once,
dispatch to one method.

Every method computes the same exact attention (equal to the float64 reference up to the
dtype's rounding, for every layout, forward and backward); they differ only in how they
communicate:

- ``"ring"``: K/V blocks rotate peer to peer, overlapped with compute (``ctxpar.attn.ring``).
- ``"ulysses"``: all-to-alls trade sequence shards for head shards (``ctxpar.attn.ulysses``).
- ``"allgather"``: K/V all-gathered once, dK/dV reduce-scattered (``ctxpar.allgather``).
- ``"hybrid"``: Ulysses within the mesh's ``ulysses`` axis, ring across its ``ring`` axis
  (``ctxpar.attn.hybrid``); needs a mesh from ``ctxpar.cp_mesh``.
- ``"auto"``: one of the above, by :func:`choose_method`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ctxpar.attn.allgather import allgather_attention
from ctxpar.attn.hybrid import hybrid_attention
from ctxpar.attn.kernels import BACKENDS
from ctxpar.attn.options import AttnOptions
from ctxpar.attn.ring import ring_attention
from ctxpar.attn.tiles import spec_ring_steps
from ctxpar.attn.ulysses import check_heads, kv_replication, ulysses_attention
from ctxpar.dist.agreement import VERIFIED, check_consistent_args, check_mode
from ctxpar.dist.topology import CPTopology, is_mesh, resolve
from ctxpar.numerics import acc_dtype
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.spec import ShardSpec, parse_cu_seqlens

__all__ = ["attention", "AttentionConfig", "METHODS", "choose_method"]

METHODS = ("ring", "ulysses", "allgather", "hybrid", "auto")


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
        get_layout(self.layout)
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
    if hq == 0:
        raise ValueError(f"q must have at least one head; got shape {tuple(q.shape)}")
    if q.shape[3] == 0:
        raise ValueError(f"head_dim must be positive; got q {tuple(q.shape)}")


def _autocast_inputs(q, k, v):
    """Under ``torch.autocast`` (as for SDPA, an autocast op): q, k and v in the autocast
    dtype, so that e.g. RoPE-promoted fp32 q/k meet a bf16 v; float64 stays float64. The
    method then runs with autocast off: its own accumulation dtypes are explicit."""
    dev = q.device.type
    if not torch.is_autocast_enabled(dev):
        return q, k, v
    low = torch.get_autocast_dtype(dev)
    return tuple(t.to(low) if t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (q, k, v))


def choose_method(topo: CPTopology, hq: int, hkv: int, *, spec: ShardSpec | None = None,
                  causal: bool = False, window: tuple[int, int] = (-1, -1)) -> str:
    """The rule behind ``method="auto"``; it depends only on the mesh shape, the head
    counts and (for windows) the token order ``spec`` and the mask, which every rank
    shares, so every rank picks the same method.

    1. ``"hybrid"`` when the group is a mesh with ``ring`` and ``ulysses`` axes.
    2. ``"ring"`` on a group of one rank (no communication at all, any method is the same).
    3. ``"ring"`` when a sliding window keeps the ring to 2 steps on N >= 3 ranks
       (``steps`` = :func:`ctxpar.attn.tiles.ring_steps`, 1 + how many ranks back any
       window reaches; 2 for a causal window no longer than a shard on the contiguous
       layout, whatever N). Each rank then receives one K/V block, while its diagonal
       block computes. Measured (``benchmarks/bench_windows.py``, N = 4, MHA, W = 256) it
       beats Ulysses by 1.2x although the all-to-alls move a quarter fewer bytes (they are
       not overlapped with compute), and all-gather by 1.5x; at W = 4096 it ties Ulysses.
    4. ``"ulysses"`` when the N ranks split the query heads (``Hq % N == 0``) and the
       all-to-alls move no more bytes than rotating K/V round the ring:
       ``Hq + Hkv' <= N·Hkv`` with ``Hkv' = lcm(Hkv, N)`` the replicated K/V heads (per rank,
       Ulysses sends ``(N-1)/N²·S·D·(2Hq + 2Hkv')`` in the forward, the ring
       ``(N-1)/N·S·D·2Hkv``). Always true for MHA. Ulysses is balanced for every layout
       and runs one fused kernel per rank.
    5. ``"allgather"`` for GQA/MQA (``Hkv < Hq``), where K/V are small enough to gather
       and keep (Llama-3's choice); its backward moves no K/V again. Unless a window
       shortens the ring enough that it moves fewer bytes: a ring rank receives
       ``2(steps-1)`` K/V blocks and ``steps`` fp32 dK/dV partial sums per fwd+bwd,
       all-gather ``N - 1`` of each, so ``"ring"`` when ``3·steps - 2 <= 2(N - 1)``.
    6. ``"ring"`` otherwise (MHA with heads that do not split over N ranks).

    Zigzag's second chunk needs the *next* rank's block, the ring's last step, so a window
    on zigzag has ``steps = N``: use ``layout="contiguous"`` with windows.
    """
    if topo.is_mesh:
        return "hybrid"
    n = topo.size
    if n == 1:
        return "ring"
    steps = n
    if spec is not None and window != (-1, -1):
        steps = spec_ring_steps(spec, n, causal, tuple(window))
    if steps == 2 < n:
        return "ring"
    if hq % n == 0 and hq + hkv * kv_replication(hkv, n) <= n * hkv:
        return "ulysses"
    if hkv < hq:
        return "ring" if 3 * steps - 2 <= 2 * (n - 1) else "allgather"
    return "ring"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
              method: str = "ring", layout: str = "zigzag", causal: bool = False,
              scale: float | None = None, window: tuple[int, int] = (-1, -1),
              return_lse: bool = False, backend: str = "auto", cu_seqlens=None,
              check_args: bool | str = True):
    """Exact softmax attention over a sequence sharded across the CP group.

    Args:
        q: ``[B, S_local, Hq, D]``, this rank's queries in the ``layout``'s local order
            (see ``ctxpar.shard``, called with the same ``group``).
        k, v: ``[B, S_local, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA).
        group: the CP group: None (WORLD, or a world of one without torch.distributed),
            a ProcessGroup or a 1-D DeviceMesh for "ring", "ulysses" and "allgather"; a
            DeviceMesh with axes ``("ring", "ulysses")`` (``ctxpar.cp_mesh``), possibly
            with outer data-parallel axes such as ``("dp", "ring", "ulysses")``, for
            "hybrid".
        method: "ring", "ulysses", "allgather", "hybrid" or "auto" (see the module
            docstring and :func:`choose_method`).
        layout: "contiguous", "zigzag" or "striped": how the global sequence was sharded.
            On a mesh: the layout's chunking over the ring axis, then a contiguous split
            within the Ulysses group (see ``ctxpar.sequence.layouts``). With a sliding
            window use "contiguous": a window balances it by itself, and the ring then
            needs only the blocks the window reaches (see :func:`choose_method`).
        causal: causal masking by *global* position.
        scale: softmax scale, default ``D ** -0.5``.
        window: ``(left, right)`` sliding window by global position, flash-attn
            convention; ``(-1, -1)`` is none. Computed in sub-tiles: about
            ``S·(left + right + 256)`` query-key pairs on CPU, not ``S²``
            (``ctxpar.attn.tiles.split_band``).
        return_lse: also return the log-sum-exp.
        backend: local kernel backend, see ``ctxpar.attn.kernels``.
        cu_seqlens: packed documents: the *original* global int32 boundaries
            ``[0, e1, ..., S]``; the shards must come from ``ctxpar.shard_packed`` (or
            ``ctxpar.pad_for_cp``). Attention never crosses a document, never sees padding.
            Host boundaries (a list, tuple or CPU tensor) cost no device read; a device
            tensor is copied to the host once per tensor (``ctxpar.sequence.spec``).
            On a mesh the packed order is that of the ring axis, split contiguously within
            the Ulysses group (as for plain layouts).
        check_args: compare the arguments that must agree across ranks (one small
            all-gather, see ``ctxpar.dist.agreement``; four tiny ones on a mesh). True (or
            ``"once"``): once per distinct signature and group, later calls with a known
            signature skip it (no collective, no host-device synchronisation; see the
            agreement module for what a rank changing its arguments alone then does);
            ``"always"``: every call; False: never.

    Returns:
        ``out`` ``[B, S_local, Hq, D]`` in q's dtype, or ``(out, lse)`` with ``lse``
        ``[B, Hq, S_local]`` in fp32 (fp64 for fp64 inputs). Differentiable in q, k, v.

    Raises:
        ValueError, on every rank and before any communication, for bad shapes, a length
        the layout cannot split, heads that do not split over the Ulysses degree, a mesh
        without ``ring``/``ulysses`` axes, or a method that does not fit the group.
    """
    cfg = AttentionConfig(method=method, layout=layout, causal=causal, window=window,
                          backend=backend)
    q, k, v = _autocast_inputs(q, k, v)
    method, topo, spec, opts = _prepare(cfg, q, k, v, group, scale, return_lse, cu_seqlens,
                                        check_args)
    if q.numel() == 0:  # empty shards on every rank (the lengths agree): nothing to attend
        out = q * 0.0  # keeps the autograd connection to q
        lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=acc_dtype(q.dtype), device=q.device)
        return (out, lse) if return_lse else out
    with torch.autocast(q.device.type, enabled=False):
        out, lse = _METHODS[method](q, k, v, topo, spec, opts)
    return (out, lse) if return_lse else out


def _prepare(cfg: AttentionConfig, q, k, v, group, scale, return_lse: bool, cu_seqlens,
             check_args) -> tuple[str, CPTopology, ShardSpec, AttnOptions]:
    """Every check of one call, once: local shapes, then (before any method-specific check,
    so that a rank whose arguments differ fails together with its peers instead of alone,
    which would hang them) the cross-rank agreement, the scale, the lengths against the
    layout and topology (building the shard spec, which ``"auto"`` reads for windows),
    then the method."""
    check_qkv(q, k, v)
    mode = check_mode(check_args)
    # No communication; a mesh without the axes raises here. A DeviceMesh is resolved once
    # (slicing it by axis reads its rank tensor on the host, every call otherwise).
    topo = _resolve_mesh(group) if is_mesh(group) else resolve(group)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # Boundaries as host ints, read once per tensor (the checksum and the spec share them);
    # a malformed cu_seqlens is checked after the agreement, like the other lengths.
    try:
        docs, bad_docs = (None if cu_seqlens is None else parse_cu_seqlens(cu_seqlens)), None
    except ValueError as e:
        docs, bad_docs = None, e
    if mode is not None:
        check_consistent_args(topo, q, k, causal=cfg.causal, window=cfg.window,
                              layout=cfg.layout, method=cfg.method, scale=scale,
                              backend=cfg.backend, return_lse=return_lse,
                              cu_seqlens=cu_seqlens if bad_docs is not None else docs,
                              verified=VERIFIED if mode == "once" else None)
    if bad_docs is not None:
        raise bad_docs
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    spec = ShardSpec.make(get_layout(cfg.layout), topo, q.shape[1], docs)
    method = _check_method(cfg, topo, q.shape[2], k.shape[2], spec)
    return method, topo, spec, AttnOptions(cfg.causal, cfg.window, scale, cfg.backend, return_lse)


@functools.lru_cache(maxsize=16)
def _resolve_mesh(mesh) -> CPTopology:
    return resolve(mesh)


_METHODS = {"ring": ring_attention, "allgather": allgather_attention,
            "ulysses": ulysses_attention, "hybrid": hybrid_attention}


def _check_method(cfg: AttentionConfig, topo: CPTopology, hq: int, hkv: int, spec: ShardSpec) -> str:
    """The method to run (``"auto"`` resolved), after checking that it fits the group and
    the heads."""
    method = cfg.method
    if method == "auto":
        method = choose_method(topo, hq, hkv, spec=spec, causal=cfg.causal, window=cfg.window)
    if method == "hybrid" and not topo.is_mesh:
        raise ValueError(
            "method='hybrid' needs a DeviceMesh with axes ('ring', 'ulysses') as group=, "
            "e.g. ctxpar.cp_mesh(hierarchical_context_parallel_sizes=[a2a, p2p])")
    if method != "hybrid" and topo.is_mesh:
        raise ValueError(
            f"method={method!r} takes a 1-D group (ProcessGroup or 1-D DeviceMesh); got a mesh "
            f"with axes {topo.mesh_axes}. Use method='hybrid' (or 'auto') on this mesh, or "
            f"pass a 1-D group")
    if method in ("ulysses", "hybrid"):
        check_heads(hq, topo.ulysses.size if method == "hybrid" else topo.size, method)
    return method
