"""``generate()`` for models converted by :func:`ctxpar.ttt.convert`: the fast-weight state
lives in the cache, next to the KV cache, through transformers' public ``Cache`` API.

One process::

    from ctxpar.integrations.ttt_generation import TTTCache
    out = model.generate(ids, attention_mask=mask, cache=TTTCache(model))

:class:`TTTCache` is a ``transformers.DynamicCache`` that also carries a
:class:`ctxpar.ttt.stream.TTTStates` (``ttt_states``): per converted layer, per row, the sum
of the completed chunks' ΔW, the open chunk's pending sum and its last few tokens. The
converted layers find it through the model-level hook that ``convert`` registers (the
decoder layers call their MLP with the hidden states alone), so nothing is patched. Under
CP, :func:`ctxpar.integrations.transformers.generate` does the same with its sharded
``CPCache``, which carries a ``TTTStates`` too; every rank then holds every row's full
fast weight after the prompt and decodes with no TTT communication.

Greedy search, sampling and beam search work, with a left-padded batch of prompts of any
lengths: pad tokens are left out of the fast-weight update and each row's chunk grid starts
at its first real token, so a padded row generates what it generates alone
(:mod:`ctxpar.ttt.stream`). Beam search reorders the TTT state with the KV cache (each
beam continues from the fast weight of the beam it extends). Assisted decoding and cache
cropping would need a fast-weight update undone; they raise ValueError. Without a TTT cache,
``model.generate(ids)`` on a converted model raises ValueError at its first decode step
instead of decoding without the prompt's fast weights.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from ctxpar.ttt.stream import TTTStates

__all__ = ["TTTCache"]


class TTTCache(DynamicCache):
    """A ``DynamicCache`` (keys and values per layer) plus ``ttt_states``, the In-Place TTT
    state of every converted layer. ``TTTCache(model)`` takes the model's text config, as
    ``DynamicCache(config=...)`` does; ``ttt_bytes`` is what the TTT state holds
    (O(B·|W|) per converted layer, independent of the prompt length)."""

    def __init__(self, model=None, **kwargs):
        if model is not None:
            kwargs.setdefault("config", model.config.get_text_config(decoder=True))
        super().__init__(**kwargs)
        self.ttt_states = TTTStates()

    @property
    def ttt_bytes(self) -> int:
        return self.ttt_states.nbytes

    def reset(self) -> None:
        super().reset()
        self.ttt_states.clear()

    def reorder_cache(self, beam_idx) -> None:
        """Beam search: each beam continues from the state of the beam it extends."""
        super().reorder_cache(beam_idx)
        self.ttt_states.select_rows(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(f"TTTCache cannot be cropped ({tokens_to_remove}): a fast-weight update "
                         "is not undone (assisted decoding and prompt lookup are unsupported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.ttt_states.batch_size is not None:
            self.ttt_states.select_rows(torch.arange(self.ttt_states.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices) -> None:
        super().batch_select_indices(indices)
        self.ttt_states.select_rows(torch.as_tensor(indices))
