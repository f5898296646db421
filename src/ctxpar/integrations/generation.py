"""Hugging Face ``generate()`` under context parallelism: a sharded KV cache and the hooks
that feed each rank its share of the prompt.

:func:`generate` (re-exported as ``ctxpar.integrations.transformers.generate``) wraps
``model.generate`` on every rank of the CP group:

1. The ranks' CPU (and CUDA) RNG states are set to rank 0's, so that sampling draws the
   same tokens everywhere. ``model.generate`` gets the prompt ``[B, S]`` (identical on
   every rank) as given.
2. A :class:`CPCache` (a ``transformers.Cache`` through its public API, one
   :class:`CPShardLayer` per layer) holds this rank's :class:`~ctxpar.attn.kvcache.KVShard`:
   the keys and values of the prompt tokens the layout gives it, then of the decode tokens
   it owns (round-robin, ``slot mod N``).
3. A forward pre-hook turns HF's prefill call into this rank's share (``input_ids`` and
   HF's own ``position_ids`` left-padded to a multiple of the layout's ``cp_multiple``,
   then sharded: pads that HF never sees, so its length limits and logits processors
   read the prompt as given; the padding mask becomes the cache's per-row key
   validity; ``logits_to_keep`` selects the last prompt token on the rank that holds it),
   and a forward hook broadcasts that token's logits ``[B, 1, V]``: the only logits
   shared. Decode steps (one token, the same on every rank) run replicated; their
   attention is the merge of every rank's partial (:func:`ctxpar.attn.decode.decode_attention`).
4. The registered attention function sees the cache (``ctxpar_cache`` in its kwargs) and
   calls :func:`cached_attention`: pass-KV / pass-Q for the prefill (``method``), decode over
   shards afterwards, whatever the training method it was registered with (pass-KV on an
   empty cache is a ring prefill that also honours the per-row padded keys, which the
   training methods do not take).

Beam search: every rank computes the same logits, so the same ``beam_idx``; each rank's
shard (and In-Place TTT state) keeps the rows of the beams that continue
(:meth:`CPCache.reorder_cache`).

On a hierarchical mesh (``ctxpar.cp_mesh``, the hybrid method's group) each CP rank holds
the hybrid layout's share of the prompt; the prefills travel one flat tour of all CP ranks
(:func:`ctxpar.attn.decode.ring_tour`) and decode merges over both axes.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from ctxpar.attn.decode import PREFILL_METHODS, decode_attention, prefill_attention
from ctxpar.attn.kvcache import (KVShard, check_setup, group_signature, prefill_holder,
                                 prefill_slots)
from ctxpar.attn.options import AttnOptions
from ctxpar.dist import collectives as comms
from ctxpar.dist.agreement import check_agree_on, text_code
from ctxpar.dist.topology import CPTopology, resolve
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.sharding import shard
from ctxpar.sequence.spec import cp_multiple
from ctxpar.ttt.stream import TTTStates

__all__ = ["CPCache", "CPShardLayer", "cached_attention", "generate", "UNSUPPORTED"]

#: generate() options ctxpar refuses (a ValueError naming the option).
UNSUPPORTED = ("assistant_model", "prompt_lookup_num_tokens", "inputs_embeds", "cache",
               "past_key_values", "cache_implementation", "output_attentions",
               "output_hidden_states", "synced_gpus", "negative_prompt_ids", "penalty_alpha",
               "dola_layers", "assistant_early_exit")
#: Generation-config fields that must keep their single-sequence values.
_MUST_BE = {"use_cache": True,
            "max_time": None}  # each rank's own clock would stop the ranks at different steps


@dataclasses.dataclass(frozen=True)
class _Step:
    """What the current forward is: a prefill (this rank's slots, key validity, and the
    CP rank holding the last prompt token) or one decode token."""

    decode: bool
    slots: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    holder: int = 0


class CPShardLayer(CacheLayerMixin):
    """One layer's :class:`~ctxpar.attn.kvcache.KVShard`. ``update`` keeps the new keys and
    values by the sharding rules and returns them unchanged: the attention function reads
    the shard itself."""

    is_sliding = False

    def __init__(self, cache: "CPCache"):
        super().__init__()
        self.cache = cache
        self.shard: KVShard | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.shard = KVShard.empty(key_states.transpose(1, 2), value_states.transpose(1, 2),
                                   self.cache.topo, self.cache.layout)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """``key_states``/``value_states`` ``[B, Hkv, S, D]`` as HF passes them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)
        step = self.cache.step
        if step is None:
            raise ValueError("CPCache is filled only by ctxpar.integrations.transformers.generate")
        if step.decode:
            self.shard.append_decode(k, v, self.cache.topo)
        else:
            self.shard.append_prefill(k, v, step.slots, step.valid)
        return key_states, value_states

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: this rank's shard keeps the rows of the beams that continue."""
        if self.shard is not None:
            self.shard.select_rows(beam_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens of the whole group's cache as ``generate()`` counts them (slots used, less
        the pads :func:`_before_forward` added), not of this rank's shard."""
        return 0 if self.shard is None else self.shard.total - self.cache.hidden_pads

    def get_max_length(self) -> int:
        return -1


class CPCache(Cache):
    """A ``transformers.Cache`` holding this rank's shard of every layer's keys and values,
    for one CP group and layout; ``method`` is the prefill method ("pass-kv", "pass-q",
    "auto"). ``kv_bytes`` is what this rank keeps."""

    def __init__(self, num_layers: int, topo: CPTopology, layout: str, method: str = "auto"):
        if method not in PREFILL_METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {PREFILL_METHODS}")
        self.topo, self.layout, self.method = topo, get_layout(layout).name, method
        self.group = group_signature(topo)
        self.step: _Step | None = None
        self.hidden_pads = 0  # left pads the prefill added to the prompt (not in HF's view)
        self.prompt_mask: torch.Tensor | None = None  # [B, S + pads] key validity of the prompt
        self.ttt_states = TTTStates()  # In-Place TTT layers' fast weights (ctxpar.ttt.stream)
        super().__init__(layers=[CPShardLayer(self) for _ in range(num_layers)])

    @property
    def kv_bytes(self) -> int:
        return sum(layer.shard.nbytes for layer in self.layers if layer.shard is not None)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: every layer's shard and In-Place TTT state follow the beams (the
        same ``beam_idx`` on every rank: the ranks hold the same logits)."""
        super().reorder_cache(beam_idx)
        self.ttt_states.select_rows(beam_idx)

    def check_belongs(self, topo: CPTopology, layout: str) -> None:
        """Refuse use with another CP group or layout than the cache was made for."""
        check_setup(self.group, self.layout, topo, layout)


def cached_attention(cache: CPCache, module: torch.nn.Module, query: torch.Tensor, *,
                     scaling: float | None, causal: bool, window: tuple[int, int],
                     backend: str) -> torch.Tensor:
    """The attention of ``query`` ``[B, Hq, S, D]`` (HF's heads-first layout; the keys and
    values are already in the cache) against the sharded cache: ``[B, S, Hq, D]``."""
    shard = cache.layers[module.layer_idx].shard
    q = query.transpose(1, 2)
    scale = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    opts = AttnOptions(causal, window, scale, backend)
    if cache.step.decode:
        slots = torch.arange(shard.total - q.shape[1], shard.total, device=q.device)
        return decode_attention(q, slots, shard, cache.topo, opts)[0]
    return prefill_attention(q, cache.step.slots, shard, cache.topo, opts, cache.method)[0]


def _before_forward(cache: CPCache, module, args, kwargs: dict):
    """Forward pre-hook: this rank's share of a prefill, or a decode step (see the module
    docstring)."""
    ids = kwargs.get("input_ids")
    mask = kwargs.get("attention_mask")
    kwargs["attention_mask"] = None  # the cache knows which keys are padding
    kwargs["ctxpar_cache"] = cache
    if cache.get_seq_length() > 0:
        if ids.shape[1] != 1:
            raise ValueError("ctxpar generate() decodes one token per step")
        cache.step = _Step(decode=True)
        return args, kwargs
    topo, s = cache.topo, ids.shape[1]
    take = functools.partial(shard, group=topo, layout=cache.layout)
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    pos = kwargs.get("position_ids")
    pos = torch.arange(s, device=ids.device).expand(ids.shape[0], s) if pos is None else pos
    # Left-pad to a length the layout splits, here and not in generate()'s input_ids: HF
    # never sees these pads (its max_length, min_length and logits processors read the
    # prompt as given); the cache keeps them as invalid keys and hides them from HF's count.
    extra = -s % cp_multiple(cache.layout, topo.ring.size, topo.ulysses.size)
    ids, pos = (F.pad(t, (extra, 0)) for t in (ids, pos))
    valid = F.pad(valid, (extra, 0), value=False)
    cache.hidden_pads, cache.prompt_mask, s = extra, valid, s + extra
    holder, index = prefill_holder(cache.layout, topo, s, s - 1)
    cache.step = _Step(False, prefill_slots(cache.layout, topo, s, 0, ids.device), take(valid), holder)
    kwargs.update(input_ids=take(ids), position_ids=take(pos),
                  logits_to_keep=torch.tensor([index if topo.rank == holder else 0]))
    return args, kwargs


class _AgreeOnTokens(StoppingCriteria):
    """The caller's stopping criteria (``user``), run so that the ranks agree: after every
    token selection the ranks must hold the same new tokens ``[B]``, caches in the same
    state (slots used) and the same stop decision of ``user``, else the same ValueError on
    every rank (e.g. a logits processor, sampler or stopping criterion that differs between
    ranks). It runs after the selection, so a rank that picked eos, or that a criterion
    stopped, alone is caught before it leaves the others waiting. One small all-gather
    per new token, not per layer."""

    def __init__(self, cache: CPCache, user: StoppingCriteriaList):
        self.cache, self.user = cache, user

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if len(self.user):
            done = done | self.user(input_ids, scores, **kwargs)
        fields = {"cache slots": self.cache.get_seq_length(),
                  "new token checksum": _checksum(input_ids[:, -1]),
                  "stopping criteria checksum": _checksum(done)}
        check_agree_on(self.cache.topo, fields, "ctxpar generate() new tokens",
                       device=input_ids.device, shown=("cache slots",))
        return done


def _after_forward(cache: CPCache, module, args, kwargs, output):
    """Forward hook: after a prefill, every rank gets the last prompt token's logits."""
    if cache.step.decode:
        return output
    logits = output.logits.contiguous()
    topo, holder = cache.topo, cache.step.holder  # CP rank = ring rank * U + Ulysses rank
    comms.broadcast(topo.ulysses, logits, holder % topo.ulysses.size)  # within its ring row,
    comms.broadcast(topo.ring, logits, holder // topo.ulysses.size)  # then down each column
    output.logits = logits
    return output


def _refuse_unsupported(model, kwargs: dict) -> None:
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"ctxpar generate() does not support the option {name!r}")
    config = kwargs.get("generation_config") or model.generation_config
    for name, value in _MUST_BE.items():
        got = kwargs.get(name, getattr(config, name, value))
        if got is not None and got != value:
            raise ValueError(f"ctxpar generate() supports only {name}={value!r}; got {got!r}")


def _describe(value: Any) -> str:
    """A rank-independent description of a generate() option (types for objects, whose
    repr may hold addresses; values for plain data and tensors)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_describe(v) for v in value) + "]"
    if torch.is_tensor(value):
        return f"tensor{tuple(value.shape)}:{_checksum(value)}"
    return type(value).__name__


def _checksum(t: torch.Tensor | None) -> int:
    if t is None:
        return -1
    return zlib.crc32(t.detach().to("cpu", torch.float64).numpy().tobytes()) & 0x7FFFFFFF


def _check_agreement(topo: CPTopology, input_ids, attention_mask, method: str, layout: str,
                     kwargs: dict) -> None:
    options = ";".join(f"{k}={_describe(v)}" for k, v in sorted(kwargs.items()))
    fields = {"batch": input_ids.shape[0], "prompt length": input_ids.shape[1],
              "input_ids checksum": _checksum(input_ids),
              "attention_mask checksum": _checksum(attention_mask),
              "method": text_code(method), "layout": text_code(str(layout)),
              "generation options": text_code(options)}
    check_agree_on(topo, fields, "ctxpar generate() arguments", device=input_ids.device,
                   shown=("batch", "prompt length"))


def _share_rng(topo: CPTopology, device: torch.device) -> None:
    """Every rank takes CP rank 0's RNG state (CPU, and CUDA for a CUDA model): ring axis
    first, then within each Ulysses group."""
    state = torch.get_rng_state()
    for grp in reversed(topo.levels):
        comms.broadcast(grp, state, 0)
    torch.set_rng_state(state)
    if device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(device).to(device)
        for grp in reversed(topo.levels):
            comms.broadcast(grp, cuda_state, 0)
        torch.cuda.set_rng_state(cuda_state.cpu(), device)


def generate(model, input_ids: torch.Tensor, *, group=None, method: str = "auto",
             layout: str = "zigzag", attention_mask: torch.Tensor | None = None,
             **generate_kwargs):
    """``model.generate(input_ids, attention_mask=..., **generate_kwargs)`` under CP.

    Call it on every rank of ``group`` (a 1-D CP group or a ``ctxpar.cp_mesh`` mesh;
    resolved by :func:`ctxpar.dist.topology.resolve`) with the same arguments; every rank
    returns what ``model.generate`` returns in one process. ``model`` must use a ctxpar
    attention registered with the same ``group`` and ``layout``
    (``ctxpar.integrations.transformers.register``); whatever its training method (ring,
    ulysses, allgather, hybrid), generation attends through the cache as below, the group
    and layout deciding who holds which token. ``method``: the prefill ("pass-kv",
    "pass-q" or "auto", see :func:`ctxpar.attn.decode.choose_prefill`); ``layout``: how
    the prompt is split. ``input_ids`` ``[B, S]`` with an optional left-padding
    ``attention_mask`` ``[B, S]``. Greedy search, sampling, ``max_new_tokens``,
    ``eos_token_id``, logits processors, ``num_return_sequences`` and beam search work (the
    cache reorders each rank's shard); assisted decoding, a user cache,
    attention/hidden-state outputs and ``max_time`` (a per-rank clock) raise ValueError
    naming the option, as do arguments that differ between ranks, and new tokens or
    stopping decisions (``stopping_criteria``) that differ between ranks at any step
    (checked after every token selection; the same error on every rank)."""
    _refuse_unsupported(model, generate_kwargs)
    if method not in PREFILL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {PREFILL_METHODS}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
    topo = resolve(group)
    _check_agreement(topo, input_ids, attention_mask, method, layout, generate_kwargs)
    cache = CPCache(model.config.num_hidden_layers, topo, layout, method)
    _share_rng(topo, input_ids.device)
    hooks = [model.register_forward_pre_hook(functools.partial(_before_forward, cache),
                                             with_kwargs=True),
             model.register_forward_hook(functools.partial(_after_forward, cache),
                                         with_kwargs=True)]
    user = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
    stops = StoppingCriteriaList([_AgreeOnTokens(cache, user)])
    try:
        return model.generate(input_ids, attention_mask=attention_mask, cache=cache,
                              stopping_criteria=stops, **generate_kwargs)
    finally:
        for hook in hooks:
            hook.remove()
