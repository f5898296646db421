"""State-dict names of :class:`~ctxpar.ttt.layer.InPlaceTTTMLP`: those of the official
release (ByteDance-Seed/In-Place-TTT), so that checkpoints move both ways.

Per converted MLP the release stores ``ttt_conv.weight`` ``[D, 1, k]`` (a depthwise
``nn.Conv1d``) and ``ttt_proj.weight`` ``[D, D]`` (an ``nn.Linear`` whose weight is used
*untransposed*: V̂ = Conv(T) · W_proj), and no learning rate (``ttt_lr`` is a config
float). The layer holds the conv as a plain Parameter ``ttt_conv`` (so ``named_parameters``
says ``ttt_conv``) and saves it as ``ttt_conv.weight``. A learnable η (``learn_eta=True``,
a ctxpar option) is saved as ``ttt_eta``, which the release does not know; a fixed η is a
non-persistent buffer. Earlier ctxpar checkpoints (``ttt_conv``, ``ttt_target`` = W_projᵀ,
``ttt_eta``) still load.
"""
from __future__ import annotations

import torch

__all__ = ["rename_for_save", "translate_for_load"]

CONV, CONV_SAVED, PROJ, LEGACY_TARGET, ETA = "ttt_conv", "ttt_conv.weight", "ttt_proj.weight", "ttt_target", "ttt_eta"


def rename_for_save(destination: dict, prefix: str) -> None:
    """Rename the conv's entry to the release's ``ttt_conv.weight``, in place."""
    if prefix + CONV in destination:
        destination[prefix + CONV_SAVED] = destination.pop(prefix + CONV)


def translate_for_load(state_dict: dict, prefix: str, *, conv_shape: torch.Size,
                       proj_shape: torch.Size | None, eta: torch.Tensor, learn_eta: bool) -> None:
    """Bring the release's (or an earlier ctxpar's) entries under ``prefix`` to the layer's
    own names, in place, checking their shapes: ValueError naming the key and the shape.

    ``conv_shape``/``proj_shape``: the layer's ``[D, 1, k]`` and ``[D, D]`` (None: built
    with ``ttt_proj=False``). ``eta``: the fixed-η buffer, which a legacy ``ttt_eta``
    entry fills when η is not learnable."""
    if prefix + LEGACY_TARGET in state_dict and prefix + PROJ not in state_dict:
        legacy = state_dict.pop(prefix + LEGACY_TARGET)  # W_target = W_projᵀ
        state_dict[prefix + PROJ] = legacy.t() if legacy.dim() == 2 else legacy
    if prefix + CONV_SAVED in state_dict:
        state_dict[prefix + CONV] = state_dict.pop(prefix + CONV_SAVED)
    _check(state_dict, prefix + CONV, conv_shape, prefix + CONV_SAVED)
    if proj_shape is None:
        if prefix + PROJ in state_dict:
            raise ValueError(f"state dict has {prefix + PROJ} but the layer was built with "
                             "ttt_proj=False (proj=False); build it with ttt_proj=True to load it")
    else:
        _check(state_dict, prefix + PROJ, proj_shape, prefix + PROJ)
    if not learn_eta and prefix + ETA in state_dict:  # an earlier ctxpar's persistent η
        value = state_dict.pop(prefix + ETA)
        with torch.no_grad():
            eta.copy_(torch.as_tensor(value).reshape(eta.shape))


def _check(state_dict: dict, key: str, shape: torch.Size, shown: str) -> None:
    """ValueError when ``state_dict[key]`` exists with another shape than ``shape``."""
    value = state_dict.get(key)
    if value is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"state dict entry {shown} has shape {tuple(value.shape)}; this "
                         f"layer needs {tuple(shape)}")
