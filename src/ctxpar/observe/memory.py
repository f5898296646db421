"""Activation memory: bytes of the tensors autograd saves for the backward pass.

``saved_tensor_bytes(fn)`` runs ``fn()`` under ``torch.autograd.graph.saved_tensors_hooks``
and returns the bytes of every distinct storage saved for backward: tensors saved by
built-in ops and by custom ``autograd.Function``s (``ctx.save_for_backward``) alike.

- **Deduplicated by storage**: a storage saved several times (the same tensor reused by
  two ops, or several views of one buffer) is counted once, at its full size, which is
  what it actually holds in memory while the graph is alive.
- **Parameters excluded**: storages of the given parameters (e.g. ``model.parameters()``)
  are not activations; a weight saved as a transposed view still shares its storage and is
  excluded too.

The count is of what the graph keeps alive, not of transient peaks inside an op; on CUDA
use ``torch.cuda.max_memory_allocated`` for the latter.

>>> from ctxpar.observe.memory import saved_tensor_bytes
>>> nbytes = saved_tensor_bytes(lambda: layer(x), exclude=layer.parameters())

or, when the output is needed:

>>> with SavedTensors(exclude=layer.parameters()) as saved:
...     y = layer(x)
>>> saved.nbytes, saved.count
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["SavedTensors", "saved_tensor_bytes"]


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr())


class SavedTensors:
    """Context manager recording the distinct storages saved for backward inside its block.

    Attributes after (or during) the block: ``nbytes`` (total bytes of distinct saved
    storages), ``count`` (how many distinct storages), ``by_dtype`` (bytes per dtype name).
    The hooks return each tensor unchanged: the forward and backward behave exactly as
    without them. Nothing outlives the block except these numbers (the saved tensors are
    not referenced)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {_storage_key(p) for p in exclude}
        self._seen: dict[tuple, int] = {}
        self.by_dtype: dict[str, int] = {}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout != torch.strided or t.device.type == "meta":
            return t
        key = _storage_key(t)
        if key in self._excluded or key in self._seen:
            return t
        nbytes = t.untyped_storage().nbytes()
        self._seen[key] = nbytes
        name = str(t.dtype).replace("torch.", "")
        self.by_dtype[name] = self.by_dtype.get(name, 0) + nbytes
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())

    @property
    def count(self) -> int:
        return len(self._seen)

    def __enter__(self) -> "SavedTensors":
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def saved_tensor_bytes(fn: Callable[[], object], *, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages that ``fn()`` saves for backward, excluding those of
    ``exclude`` (typically the model's parameters). ``fn``'s result is dropped, so its
    graph (and the saved tensors) are freed on return."""
    with SavedTensors(exclude=exclude) as saved:
        fn()
    return saved.nbytes
