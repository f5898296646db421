"""Hugging Face transformers integration: run Llama / Qwen2 / Qwen3-style models under CP.

Three pieces, all opt-in and explicit (nothing happens on import; no transformers
internals are patched):

1. :func:`register` builds a ctxpar attention function bound to a CP group, method and
   layout, and registers it under a name through transformers' public attention-function
   registry, ``transformers.AttentionInterface.register(name, fn)``. Load or build the
   model with ``attn_implementation=name`` (or ``model.set_attn_implementation(name)``).
   The group/method/layout travel in the registered closure, so there is no global state
   in ctxpar and several CP groups can coexist under different names. ctxpar masks by
   *global* position, which the sharding layout defines, so the model needs no dense
   mask: the same name is registered in transformers' ``AttentionMaskInterface`` with a
   mask function that builds none. That function also sees the user's 2-D
   ``attention_mask`` once per forward and refuses one with padding (zeros), which ctxpar
   cannot honour; without it transformers would drop the mask silently.

2. :func:`shard_batch` turns a full batch (identical on every rank) into this rank's CP
   shard: labels are shifted on the full sequence *before* sharding (so the label of the
   last token of a shard is the first token of the next shard, wherever that lives), then
   ``input_ids``, ``labels`` and the *global* ``position_ids`` (for RoPE) are sharded with
   the layout (on a 1-D group or a hierarchical ``ctxpar.cp_mesh``). Packed documents
   (``cu_seqlens``) are sharded with ``ctxpar.shard_packed``: per-document positions, no
   label across a document boundary, and attention that never crosses a document.

3. The loss and gradient reduction live in :mod:`ctxpar.loss`
   (:func:`~ctxpar.loss.cp_cross_entropy`, :func:`~ctxpar.loss.allreduce_gradients`).

Use in a training loop (every rank, after ``torch.distributed.init_process_group``)::

    from ctxpar.integrations.transformers import register, shard_batch
    from ctxpar.loss import cp_cross_entropy, allreduce_gradients

    name = register("ctxpar_ring", group=cp_group, method="ring", layout="zigzag")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    batch = shard_batch(input_ids, group=cp_group, layout="zigzag")
    logits = model(**batch.model_inputs()).logits
    loss = cp_cross_entropy(logits, batch.labels, group=cp_group)
    loss.backward()
    allreduce_gradients(model, group=cp_group)   # sum over CP (and DP): exact
    optimizer.step()

Generation: :func:`generate` (every rank, same arguments) runs ``model.generate`` with a KV
cache sharded over the CP group (:mod:`ctxpar.integrations.generation`); the registered
attention function knows a generation call from the cache it is handed.

Limitations (training): no attention dropout; padding must be on the right (pads are dropped from the loss
through the labels, and causal attention keeps real tokens from seeing them); no
``softcap`` or ``position_bias``. Sliding-window layers (Qwen2/Qwen3 ``sliding_window``)
map to ctxpar's ``window=(sliding_window - 1, 0)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ctxpar.attn.dispatch import METHODS, attention
from ctxpar.dist.topology import resolve
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.packing import pad_for_cp, shard_packed
from ctxpar.sequence.sharding import position_ids as cp_position_ids, shard
from ctxpar.sequence.spec import parse_cu_seqlens

__all__ = ["register", "make_attention_function", "refuse_padding_mask", "shard_batch", "CPBatch",
           "DEFAULT_NAME", "generate"]

DEFAULT_NAME = "ctxpar"


def make_attention_function(*, group=None, method: str = "ring", layout: str = "zigzag",
                            backend: str = "auto", check_positions: bool = True,
                            check_args: bool = True) -> Callable:
    """The attention function that :func:`register` registers, bound to one CP setup.

    Signature (transformers' attention-function protocol)::

        fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)
            -> (attn_output [B, S_local, Hq, D], None)

    with ``query`` ``[B, Hq, S_local, D]`` and ``key``/``value`` ``[B, Hkv, S_local, D]``
    (heads first, as transformers passes them) holding this rank's shard in the layout's
    local order. Causality comes from ``module.is_causal`` (or an ``is_causal`` kwarg).
    With ``check_positions`` the first layer checks, once per forward, that the model got
    this rank's global ``position_ids`` (a missing ``position_ids=`` would silently give
    every shard positions ``0..S_local-1``, i.e. wrong RoPE). ``check_args`` is passed to
    ``ctxpar.attention`` (a tiny all-gather per call comparing arguments across ranks)."""
    def ctxpar_attention_forward(module: torch.nn.Module, query: torch.Tensor,
                                 key: torch.Tensor, value: torch.Tensor,
                                 attention_mask: torch.Tensor | None,
                                 scaling: float | None = None, dropout: float = 0.0,
                                 **kwargs: Any):
        cache = kwargs.pop("ctxpar_cache", None)
        if cache is not None:  # generation: prefill or decode against the sharded cache
            return _generation_attention(cache, module, query, scaling, kwargs, group, layout,
                                         backend), None
        if attention_mask is not None:
            raise ValueError(
                "ctxpar attention masks by global position and takes no attention_mask; "
                "drop it (right-padded tokens are excluded through labels=-100, see "
                "ctxpar.integrations.transformers.shard_batch)")
        if dropout:
            raise NotImplementedError("attention dropout is not supported under ctxpar CP; "
                                      "set attention_dropout=0.0 in the model config")
        for unsupported in ("softcap", "position_bias", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(f"ctxpar attention does not support {unsupported!r}")
        causal, window = _causal_window(module, kwargs)
        extra = {}
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            extra["cu_seqlens"] = cu
        elif check_positions and getattr(module, "layer_idx", 0) == 0:
            _check_position_ids(kwargs.get("position_ids"), query.shape[2], group, layout)
        out = attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            group=group, method=method, layout=layout, causal=causal, scale=scaling,
            window=window, backend=backend, check_args=check_args, **extra)
        return out, None

    ctxpar_attention_forward.ctxpar_setup = dict(group=group, method=method, layout=layout,
                                                 backend=backend)
    return ctxpar_attention_forward


def _causal_window(module: torch.nn.Module, kwargs: dict) -> tuple[bool, tuple[int, int]]:
    """Causality (``module.is_causal`` or an ``is_causal`` kwarg) and the ctxpar window of
    an HF ``sliding_window`` (``(sliding_window - 1, 0)``)."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    sw = kwargs.get("sliding_window")
    return causal, ((int(sw) - 1, 0) if sw else (-1, -1))


def _generation_attention(cache, module, query, scaling, kwargs, group, layout: str,
                          backend: str) -> torch.Tensor:
    """Attention during :func:`generate`: the cache must belong to this function's group
    and layout."""
    from ctxpar.integrations.generation import cached_attention

    cache.check_belongs(resolve(group), layout)
    causal, window = _causal_window(module, kwargs)
    return cached_attention(cache, module, query, scaling=scaling, causal=causal, window=window,
                            backend=backend)


def generate(model, input_ids: torch.Tensor, **kwargs: Any):
    """Hugging Face ``generate()`` under CP; see
    :func:`ctxpar.integrations.generation.generate` (same arguments: ``group``,
    ``method``, ``layout``, ``attention_mask``, ``**generate_kwargs``)."""
    from ctxpar.integrations.generation import generate as _generate

    return _generate(model, input_ids, **kwargs)


def _check_position_ids(position_ids, s_local: int, group, layout: str) -> None:
    size = resolve(group).size
    if position_ids is None or size == 1:
        return
    expected = cp_position_ids(s_local * size, group=group, layout=layout,
                               device=position_ids.device)
    if position_ids.shape[-1] != s_local or not bool((position_ids == expected).all()):
        raise ValueError(
            f"the model's position_ids are not this rank's global positions for "
            f"layout={layout!r}; pass position_ids=ctxpar.position_ids(seq_len, group=..., "
            f"layout=...) (shard_batch(...).model_inputs() does)")


def register(name: str = DEFAULT_NAME, *, group=None, method: str = "ring",
             layout: str = "zigzag", backend: str = "auto",
             check_positions: bool = True, check_args: bool = True) -> str:
    """Register a ctxpar attention function with transformers and return its name.

    The explicit opt-in: call it on every rank (after the process group exists), then use
    ``attn_implementation=name``. Registering the same name again replaces the function
    (e.g. after re-creating the group). ``group``/``method``/``layout``/``backend`` are
    passed to :func:`ctxpar.attention` unchanged (``method`` may be any of
    ``ctxpar.METHODS``; for ``"hybrid"`` pass the 2-D mesh from ``ctxpar.cp_mesh``).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string; got {name!r}")
    if name in ("eager", "sdpa", "flex_attention") or name.startswith(("flash_attention",
                                                                         "paged")):
        raise ValueError(f"{name!r} is a transformers built-in attention name; choose another")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    get_layout(layout)
    fn = make_attention_function(group=group, method=method, layout=layout, backend=backend,
                                 check_positions=check_positions, check_args=check_args)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, refuse_padding_mask)
    return name


def refuse_padding_mask(*, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """transformers' mask function for a ctxpar attention name (called once per forward
    with the user's 2-D padding mask, if any): ctxpar needs no dense mask, so it returns
    None, after refusing a mask with padding that it would otherwise silently ignore."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "ctxpar attention got an attention_mask with padding (zeros at "
            f"{int((~attention_mask.bool()).sum())} position(s)); ctxpar masks by global "
            "position and cannot honour a padding mask. Right padding: drop the mask and "
            "exclude pads from the loss (shard_batch(attention_mask=...) does); packed "
            "documents: pass cu_seqlens to shard_batch; left padding is not supported")
    return None


@dataclasses.dataclass(frozen=True)
class CPBatch:
    """This rank's shard of a batch. ``labels`` are already shifted (``labels[t]`` is the
    target of token ``t``); ``cu_seqlens`` (global, unsharded) is set for packed
    documents. Feed ``model(**batch.model_inputs())`` and compute the loss with
    ``ctxpar.loss.cp_cross_entropy(logits, batch.labels, group=...)``."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    seq_len: int = 0  # the original global length (before any padding)

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for the model's forward (no ``labels``: transformers would
        shift them again; use ``ctxpar.loss.cp_cross_entropy`` on the logits)."""
        out: dict[str, Any] = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.cu_seqlens is not None:
            out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = self.cu_seqlens
            longest = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
            out["max_length_q"] = out["max_length_k"] = longest
        return out


def shift_labels(labels: torch.Tensor, *, ignore_index: int = -100,
                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """``out[:, t] = labels[:, t + 1]``; the last token, and with ``cu_seqlens`` the last
    token of every document, get ``ignore_index``."""
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        ends = torch.as_tensor(cu_seqlens, dtype=torch.int64)[1:].to(labels.device) - 1
        out[:, ends] = ignore_index
    return out


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, group=None,
                layout: str = "zigzag", attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None,
                ignore_index: int = -100, multiple_of: int = 1) -> CPBatch:
    """Shard a full causal-LM batch for CP (call on every rank with the same tensors).

    Args:
        input_ids: ``[B, S]`` the full sequences. A length the layout cannot split (2N for
            zigzag, N otherwise) is padded at the end (``ctxpar.pad_for_cp``); pads get
            ``ignore_index`` labels and, being last, are never seen by causal attention.
        labels: ``[B, S]`` *unshifted* targets (default ``input_ids``), as you would give
            transformers; ``ignore_index`` entries do not count.
        group, layout: the CP group (a 1-D group or a ``ctxpar.cp_mesh``) and the layout,
            as for ``ctxpar.shard``.
        attention_mask: optional ``[B, S]`` 0/1 padding mask, right padding only; pad
            positions get ``ignore_index`` labels (no other effect: causal attention keeps
            real tokens from seeing later pads).
        cu_seqlens: optional ``[n_docs + 1]`` int32 boundaries ``[0, e1, ..., S]`` of
            packed documents, the same for every row: tokens are sharded with
            ``ctxpar.shard_packed`` (per-document load balancing), positions restart at 0
            in each document, no label crosses a boundary, and the model's attention gets
            the boundaries (``cu_seq_lens_q``) so no query sees another document.
        ignore_index: label value excluded from the loss.
        multiple_of: pad plain sequences further, to that multiple of the layout's
            (e.g. a converted model's In-Place TTT chunk size, so that every shard is
            whole chunks; see ``ctxpar.ttt``).

    Returns:
        :class:`CPBatch` with this rank's ``input_ids``, shifted ``labels`` and global (or
        per-document) ``position_ids``, each ``[B, S_local]`` in the layout's local order.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match input_ids "
                         f"{tuple(input_ids.shape)}")
    b, s = input_ids.shape
    labels = labels.clone()
    if attention_mask is not None:
        m = attention_mask.to(device=labels.device, dtype=torch.bool)
        if bool((m[:, 1:] & ~m[:, :-1]).any()):
            raise ValueError("attention_mask must be right-padded (1...1 0...0) under CP")
        labels[~m] = ignore_index
    if cu_seqlens is not None:
        return _shard_packed_batch(input_ids, labels, cu_seqlens, group, layout, ignore_index)
    shifted = shift_labels(labels, ignore_index=ignore_index)
    topo = resolve(group)
    # Pads at the end: token 0, label ignore_index (causal attention keeps real tokens from
    # seeing them, the loss drops them).
    ids, _ = pad_for_cp(input_ids, group=topo, layout=layout, multiple_of=multiple_of)
    shifted, _ = pad_for_cp(shifted, group=topo, layout=layout, multiple_of=multiple_of,
                            value=ignore_index)
    total = ids.shape[1]
    position_ids = cp_position_ids(total, group=topo, layout=layout, device=input_ids.device)
    return CPBatch(
        input_ids=shard(ids, group=topo, layout=layout),
        labels=shard(shifted, group=topo, layout=layout),
        position_ids=position_ids.unsqueeze(0).expand(b, -1),
        seq_len=s,
    )


def _shard_packed_batch(input_ids, labels, cu_seqlens, group, layout: str,
                        ignore_index: int) -> CPBatch:
    """:func:`shard_batch` for packed documents: per-document labels and positions."""
    b, s = input_ids.shape
    if torch.is_tensor(cu_seqlens) and cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D; got shape {tuple(cu_seqlens.shape)}")
    cu = torch.tensor(parse_cu_seqlens(cu_seqlens), dtype=torch.int64)  # ints, from 0, increasing
    if int(cu[-1]) != s:
        raise ValueError(f"cu_seqlens must be [0, ..., {s}] (1-D, ending at the sequence "
                         f"length); got {cu.tolist()[:16]}")
    shifted = shift_labels(labels, ignore_index=ignore_index, cu_seqlens=cu)
    tok = shard_packed(input_ids, cu, group=group, layout=layout, value=0)
    lab = shard_packed(shifted, cu, group=group, layout=layout, value=ignore_index)
    return CPBatch(input_ids=tok.tokens, labels=lab.tokens,
                   position_ids=tok.position_ids.unsqueeze(0).expand(b, -1),
                   cu_seqlens=tok.cu_seqlens, seq_len=s)
