"""In-Place test-time training (arXiv 2604.06169) under context parallelism.

- :mod:`~ctxpar.ttt.layer`: :class:`InPlaceTTTMLP`, its :class:`TTTConfig` and the streaming
  :class:`TTTState`;
- :mod:`~ctxpar.ttt.plan`: a rank's blocks of chunks and their document resets;
- :mod:`~ctxpar.ttt.ops`: the fast-weight autograd Function (forward and backward);
- :mod:`~ctxpar.ttt.names`: state-dict names and orientation of the official release;
- :mod:`~ctxpar.ttt.convert`: the Hugging Face drop-in, with the release's settings;
- :mod:`~ctxpar.ttt.stream`: generation state (per-row fast weights in a cache, O(|W|) decode);
- :mod:`~ctxpar.ttt.reference`: the float64 token loop the tests and ``ctxpar verify``
  compare with.
"""
from ctxpar.ttt.convert import convert
from ctxpar.ttt.layer import InPlaceTTTMLP, TTTConfig, TTTState
from ctxpar.ttt.plan import chunk_resets

__all__ = ["InPlaceTTTMLP", "TTTConfig", "TTTState", "convert", "chunk_resets"]
