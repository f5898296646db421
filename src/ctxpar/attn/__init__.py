"""Exact attention across a CP group. :mod:`~ctxpar.attn.dispatch` (``ctxpar.attention``)
validates a call once and hands one method the resolved topology, the shard spec and the
options (:mod:`~ctxpar.attn.options`): :mod:`~ctxpar.attn.ring`,
:mod:`~ctxpar.attn.allgather`, :mod:`~ctxpar.attn.ulysses` or :mod:`~ctxpar.attn.hybrid`.
They share the tile planner (:mod:`~ctxpar.attn.tiles`), the block kernels
(:mod:`~ctxpar.attn.kernels`, :mod:`~ctxpar.attn.kernels_cuda`) and the LSE merge
(:mod:`~ctxpar.attn.merge`); :mod:`~ctxpar.attn.reference` is the float64 reference.
Imports :mod:`ctxpar.sequence` and below."""
