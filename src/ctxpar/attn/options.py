"""The per-call options every CP attention method receives, already validated by
:func:`ctxpar.attention` (:mod:`ctxpar.attn.dispatch`).

Every method has one signature, ``method(q, k, v, topo, spec, opts) -> (out, lse)``:
``topo`` the resolved :class:`~ctxpar.dist.topology.CPTopology`, ``spec`` the
:class:`~ctxpar.sequence.spec.ShardSpec` of the shards, ``opts`` an :class:`AttnOptions`.
``lse`` may be None when ``opts.return_lse`` is False. Methods do not validate again.
"""
from __future__ import annotations

import dataclasses

__all__ = ["AttnOptions"]


@dataclasses.dataclass(frozen=True)
class AttnOptions:
    """Masking and kernel options of one call: causal masking and a ``(left, right)``
    sliding window by global position, the softmax scale, the local kernel backend, and
    whether the caller wants the LSE back."""

    causal: bool
    window: tuple[int, int]
    scale: float
    backend: str
    return_lse: bool = False
