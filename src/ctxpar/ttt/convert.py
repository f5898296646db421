"""The Hugging Face drop-in: :func:`convert` replaces a Llama / Qwen2 / Qwen3-style model's
gated MLPs by :class:`~ctxpar.ttt.layer.InPlaceTTTMLP`, in place, with explicit forward
hooks (no patching) that hand the layers the token embeddings and the decoder layer's
packed-document boundaries."""
from __future__ import annotations

from torch import nn

from ctxpar.ttt.layer import InPlaceTTTMLP

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


def _decoder_layers(model: nn.Module):
    for owner in (model, getattr(model, "model", None), getattr(model, "get_decoder", lambda: None)()):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and all(hasattr(l, "mlp") for l in layers):
            return layers
    raise ValueError(f"{type(model).__name__} has no decoder `layers` with an `mlp` each "
                     "(expected a Llama / Qwen2 / Qwen3-style model)")


def convert(model: nn.Module, *, layers=None, chunk_size: int = 1024, every: int = 6,
            group=None, **options) -> nn.Module:
    """Replace, in place, the gated MLPs of a Hugging Face Llama / Qwen2 / Qwen3-style model
    by :class:`InPlaceTTTMLP` and return the model.

    ``layers``: indices to convert; default every ``every``-th layer (a positive int),
    counting from one (layers 5, 11, 17, ... for every=6, the paper's released
    configuration). ``options`` go to :class:`TTTConfig` unchanged (``target``, ``eta``,
    ``clip_tau``, ``layout``, ...); ``layout`` defaults to ``"zigzag"``, as for
    :func:`ctxpar.integrations.transformers.shard_batch` and the attention functions.

    Pretrained outputs are unchanged at init (the conv is zero). Trainable parameters
    added per converted layer: ``mlp.ttt_conv``, ``mlp.ttt_target`` and ``mlp.ttt_eta``
    (unless ``learn_eta=False``). The wrapped ``gate_proj``/``up_proj``/``down_proj`` keep
    their names and their ``requires_grad``: freeze them yourself for a TTT-only fine-tune.
    With ``target="embeddings"`` a forward hook on the input embedding feeds the layers.
    Hooks on each converted decoder layer hand its ``cu_seq_lens_q`` keyword (packed
    documents, see :func:`ctxpar.integrations.transformers.shard_batch`) and its
    ``position_ids`` to the TTT MLP; under CP the positions must fit ``layout``, so a batch
    sharded with another layout raises instead of training on wrong carries
    (``check_positions=False`` skips this, e.g. where a wrapper shards the MLP's input
    itself)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    stack = _decoder_layers(model)
    if layers is None:
        layers = [i for i in range(len(stack)) if i % every == every - 1]
        if not layers:
            raise ValueError(f"the model has {len(stack)} layers, so converting every {every}th "
                             "layer selects none; pass layers=[...]")
    layers = sorted(set(int(i) for i in layers))
    bad = [i for i in layers if not 0 <= i < len(stack)]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {len(stack)} layers")
    tap = None
    if options.get("target") == "embeddings":
        tap = _EmbeddingTap()
        model.get_input_embeddings().register_forward_hook(tap)
    for i in layers:
        if isinstance(stack[i].mlp, InPlaceTTTMLP):
            raise ValueError(f"layer {i} is already converted")
        new = InPlaceTTTMLP(stack[i].mlp, chunk_size=chunk_size, group=group, **options)
        new._embedding_tap = tap
        new._document_tap = _DocumentTap()
        stack[i].register_forward_pre_hook(new._document_tap.enter, with_kwargs=True)
        # always_call: cleared even when the layer raises, so no stale boundaries linger.
        stack[i].register_forward_hook(new._document_tap.leave, with_kwargs=True, always_call=True)
        stack[i].mlp = new
    return model
