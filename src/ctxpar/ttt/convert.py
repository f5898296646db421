"""The Hugging Face drop-in: :func:`convert` replaces a Llama / Qwen2 / Qwen3-style model's
gated MLPs by :class:`~ctxpar.ttt.layer.InPlaceTTTMLP`, in place, with explicit forward
hooks (no patching) that hand the layers the token embeddings and the decoder layer's
packed-document boundaries."""
from __future__ import annotations

import torch
from torch import nn

from ctxpar.ttt.layer import InPlaceTTTMLP, TTTConfig

__all__ = ["convert"]



class _EmbeddingTap:
    """Holds the latest output of a model's input embedding (filled by a forward hook)."""

    def __init__(self):
        self.value = None

    def __call__(self, module, args, output):
        self.value = output


class _DocumentTap:
    """Holds, while one decoder layer runs, the packed-document boundaries (``value``) and
    the position ids (``positions``) it was called with: Hugging Face decoder layers pass
    ``cu_seq_lens_q`` and ``position_ids`` (what
    :func:`ctxpar.integrations.transformers.shard_batch` sets) to attention but call the MLP
    with the hidden states alone. The positions let the layer check that the shard fits its
    layout (:mod:`ctxpar.ttt.checks`)."""

    def __init__(self):
        self.value = self.positions = None

    def enter(self, module, args, kwargs):
        self.value, self.positions = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")

    def leave(self, module, args, kwargs, output):
        self.value = self.positions = None


class _GenerationTap:
    """Holds, while the model runs, what generation needs that a decoder layer does not
    hand its MLP: the cache's TTT state (``ttt_states``, a :class:`ctxpar.ttt.stream.TTTStates`,
    which :class:`ctxpar.integrations.ttt_generation.TTTCache` and the CP generation cache
    carry), the cache's CP layout if it has one, and the 2-D ``attention_mask`` (left
    padding). A cache without TTT state that already holds tokens cannot continue a
    converted model (its fast weights are gone): ValueError naming the fix."""

    def __init__(self):
        self.states = self.cache = self._mask = self.layout = None

    @property
    def mask(self):
        """The prompt's padding mask ``[B, S]``: the CP cache's own (``prompt_mask``: the
        prompt as its prefill padded it, which this hook, running first, cannot see yet),
        else the model's ``attention_mask``."""
        own = getattr(self.cache, "prompt_mask", None)
        return own if own is not None else self._mask

    def enter(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        states = getattr(cache, "ttt_states", None)
        if cache is not None and states is None and cache.get_seq_length() > 0:
            raise ValueError(
                f"this model has In-Place TTT layers, whose fast weights a {type(cache).__name__} "
                f"holding {cache.get_seq_length()} tokens does not carry: generate with "
                "cache=ctxpar.integrations.ttt_generation.TTTCache(model) (one process) or "
                "ctxpar.integrations.transformers.generate (CP)")
        mask = kwargs.get("attention_mask")
        self.states, self.cache, self.layout = states, cache, getattr(cache, "layout", None)
        self._mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None

    def leave(self, module, args, kwargs, output):
        self.states = self.cache = self._mask = self.layout = None


def _decoder_layers(model: nn.Module):
    for owner in (model, getattr(model, "model", None), getattr(model, "get_decoder", lambda: None)()):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and all(hasattr(l, "mlp") for l in layers):
            return layers
    raise ValueError(f"{type(model).__name__} has no decoder `layers` with an `mlp` each "
                     "(expected a Llama / Qwen2 / Qwen3-style model)")


# The release's names (model config attributes and convert() arguments) -> TTTConfig fields.
OFFICIAL = {"ttt_chunk": "chunk_size", "ttt_lr": "eta", "ttt_proj": "proj", "ttt_target": "target"}
# What convert() uses when neither an argument nor the model config gives a value: the
# release's own fallbacks, except the chunk (see convert's docstring).
DEFAULTS = {"chunk_size": 1024, "eta": 0.3, "proj": True, "target": "hidden_states", "learn_eta": False}


def _settings(model: nn.Module, args: dict, options: dict) -> dict:
    """TTTConfig fields from, by priority, the arguments (release or ctxpar names), the
    model config's ``ttt_*`` attributes, and :data:`DEFAULTS`."""
    cfg = getattr(model, "config", None)
    out = dict(DEFAULTS)
    for official, field in OFFICIAL.items():
        if getattr(cfg, official, None) is not None:
            out[field] = getattr(cfg, official)
    for official, field in OFFICIAL.items():
        given = [n for n, v in ((official, args.get(official)), (field, options.get(field))) if v is not None]
        if len(given) > 1:
            raise ValueError(f"pass one of {given}: they name the same setting")
        if given:
            out[field] = args.get(official) if given[0] == official else options.pop(field)
    out.update(options)
    if isinstance(out["eta"], bool) or not isinstance(out["eta"], (int, float)):
        raise ValueError(f"ttt_lr must be a number, got {out['eta']!r}")
    out["eta"] = float(out["eta"])
    return out


def _layer_indices(model: nn.Module, stack: nn.ModuleList, layers, every) -> list[int]:
    """The layers to convert: ``layers``, else the model config's ``ttt_layers``, else
    every ``every``-th from layer 0; ValueError naming any index out of range."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if layers is None:
        layers = getattr(getattr(model, "config", None), "ttt_layers", None)
    if layers is None:
        layers = [i for i in range(len(stack)) if i % every == 0]
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise ValueError(f"layers must be ints; got {bad}")
    layers = sorted(set(layers))
    bad = [i for i in layers if not 0 <= i < len(stack)]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {len(stack)} layers")
    if not layers:
        raise ValueError(f"no layer to convert (the model has {len(stack)} layers); pass layers=[...]")
    return layers


def _record(model: nn.Module, layers: list[int], cfg: TTTConfig) -> None:
    """Write the release's ``ttt_*`` attributes into the model config, so that
    ``save_pretrained`` gives a checkpoint the release's code loads as it is."""
    config = getattr(model, "config", None)
    if config is None:
        return
    values = {"ttt_mode": True, "ttt_layers": layers, "ttt_lr": cfg.eta, "ttt_chunk": cfg.chunk_size,
              "ttt_proj": cfg.proj, "ttt_target": cfg.target}
    for name, value in values.items():
        setattr(config, name, value)


def convert(model: nn.Module, *, layers=None, ttt_layers=None, ttt_lr=None, ttt_chunk=None,
            ttt_proj=None, ttt_target=None, every: int = 6, group=None, **options) -> nn.Module:
    """Replace, in place, the gated MLPs of a Hugging Face Llama / Qwen2 / Qwen3-style model
    by :class:`InPlaceTTTMLP` and return the model.

    The release's settings (ByteDance-Seed/In-Place-TTT), each from the argument, else
    from the model config's attribute of the same name, else the default:

    - ``ttt_layers`` (alias ``layers``): indices to convert; default ``i % every == 0``
      (0, 6, 12, ... for ``every=6``), the release's ``[0, 6, ..., 36]``.
    - ``ttt_lr`` (alias ``eta``): the fixed step size η; default 0.3, the release's
      fallback (its recommended config says 3). ``learn_eta=True`` makes it a trainable
      Parameter starting there (a ctxpar option; it is then saved as ``mlp.ttt_eta``).
    - ``ttt_chunk`` (alias ``chunk_size``): default 1024, **not** the release's (8192 as a
      fallback, 4096 recommended): the paper's chunk ablation favours 512-1024.
    - ``ttt_proj``: True (V̂ = Conv(T) · W_proj, W_proj an untransposed ``[D, D]``, a
      small random diagonal at init) or False (V̂ = Conv(T)).
    - ``ttt_target`` (alias ``target``): ``"hidden_states"`` (the MLP input, default) or
      ``"input_embed"`` (the token embeddings); ``"mlp_input"``/``"embeddings"`` are
      accepted aliases.

    The chosen values are written back to ``model.config`` (with ``ttt_mode=True``);
    ``ttt_mode`` itself is not read: calling ``convert`` turns TTT on.
    Other ``options`` go to :class:`TTTConfig` (``clip_tau``, ``conv_kernel``, ``layout``,
    ...); ``layout`` defaults to ``"zigzag"``, as for
    :func:`ctxpar.integrations.transformers.shard_batch`. Other differences from the
    release: a down projection's bias (Llama ``mlp_bias=True``) is kept (the release
    drops it in converted layers); document resets, CP and streaming are ctxpar's.

    State dicts use the release's names and orientation per converted layer:
    ``mlp.ttt_conv.weight`` ``[D, 1, k]`` (zeros at init, so pretrained outputs are
    unchanged) and ``mlp.ttt_proj.weight`` ``[D, D]``; see :mod:`ctxpar.ttt.names`. The
    wrapped ``gate_proj``/``up_proj``/``down_proj`` keep their names and
    ``requires_grad``: freeze them yourself for a TTT-only fine-tune. With
    ``input_embed`` a forward hook on the input embedding feeds the layers. Hooks on each
    converted decoder layer hand its ``cu_seq_lens_q`` keyword (packed documents, see
    ``shard_batch``) and its ``position_ids`` to the TTT MLP; under CP the positions must
    fit ``layout``, so a batch sharded with another layout raises instead of training on
    wrong carries (``check_positions=False`` skips this). Any sequence length runs on one
    process; under CP, pad with ``shard_batch(..., multiple_of=chunk)``."""
    stack = _decoder_layers(model)
    layers = _layer_indices(model, stack, _one_of("layers", layers, "ttt_layers", ttt_layers), every)
    args = {"ttt_lr": ttt_lr, "ttt_chunk": ttt_chunk, "ttt_proj": ttt_proj, "ttt_target": ttt_target}
    cfg = TTTConfig(**_settings(model, args, options))
    already = [i for i in layers if isinstance(stack[i].mlp, InPlaceTTTMLP)]
    if already:
        raise ValueError(f"layer {already[0]} is already converted")
    tap, gen = None, _GenerationTap()
    # always_call: cleared even when the model raises, so no stale state lingers.
    model.register_forward_pre_hook(gen.enter, with_kwargs=True)
    model.register_forward_hook(gen.leave, with_kwargs=True, always_call=True)
    if cfg.target == "input_embed":
        tap = _EmbeddingTap()
        model.get_input_embeddings().register_forward_hook(tap)
    for i in layers:
        new = InPlaceTTTMLP(stack[i].mlp, config=cfg, group=group)
        new._embedding_tap = tap
        new._document_tap = _DocumentTap()
        new._generation_tap = gen
        stack[i].register_forward_pre_hook(new._document_tap.enter, with_kwargs=True)
        # always_call: cleared even when the layer raises, so no stale boundaries linger.
        stack[i].register_forward_hook(new._document_tap.leave, with_kwargs=True, always_call=True)
        stack[i].mlp = new
    _record(model, layers, cfg)
    return model


def _one_of(name: str, value, official: str, official_value):
    """The value of a setting given under ctxpar's or the release's name (not both)."""
    if value is not None and official_value is not None:
        raise ValueError(f"pass one of {name!r} and {official!r}: they name the same setting")
    return official_value if value is None else value
