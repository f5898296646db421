"""What :class:`~ctxpar.ttt.layer.InPlaceTTTMLP` checks about its inputs before any scan.

Cross-rank agreement (``check_args``, on by default: one all-gather of a dozen int64 per
call). Every rank must run the same plan, or the carries are wrong or a collective hangs:
the shard's shape and dtype, the chunk size, the options that shape the plan or the math
(layout, scan algorithm, clip, target, projection on/off, conv kernel, ``learn_eta``), the value of η (a rank
with another η would mix its carries silently), whether autocast is on and in which
dtype, and the packed documents. Errors that one rank finds alone (a missing embeddings
tensor, position ids that do not fit the layout) are fields of the same check, so that
every rank raises instead of some waiting in the scan. Not checkable: ``check_args``
itself (a rank that skips the check never joins its collective) and the other parameters'
values (replicated weights are the training framework's job; a checksum would cost a pass
over them on every call).

The layout of a shard. A tensor does not record how it was sharded: a plain shard of the
right length looks the same under every layout, so a layer whose ``layout`` differs from
the one the input was sharded with cannot tell from ``x`` alone. What gives it away:

- position ids (``forward(position_ids=...)``, or in a converted model the ids the decoder
  layer is called with, as ``shard_batch`` hands them): under CP they must be this rank's
  positions for the layer's layout (global positions; with packed documents, positions
  within each document, as ``shard_packed`` gives them). Checked when ``check_positions``
  and ``check_args`` are on (a failed check must reach every rank; one process skips it:
  every layout is then the identity);
- packed documents: a shard of ``shard_packed`` under another layout often has another
  length (zigzag pads each document), which the plan rejects.

No host-device synchronisation per call: the agreement runs once per distinct signature
and group, per layer (``ctxpar.dist.agreement``, the trade-off is stated there); η, a learned value
that changes every step, is compared whenever the check runs but is not part of the
signature (reading it is a device read). Position ids and ``cu_seqlens`` are read once
per tensor (by identity and version counter), so the layers of a model that share one
batch's tensors read them once per batch.
"""
from __future__ import annotations

import collections
import struct
import weakref

import torch

from ctxpar.dist.agreement import check_agree_on, cu_checksum, dtype_code, text_code
from ctxpar.dist.topology import CPTopology
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.spec import ShardSpec, parse_cu_seqlens
from ctxpar.ttt.ops import autocast_dtype

__all__ = ["check_agreement", "positions_error"]


def _expected_positions(layout: str, topo: CPTopology, local_len: int, cu_seqlens):
    """``(positions [S_local], real [S_local] bool)`` of this rank's tokens under ``layout``:
    global positions, or positions within each document (padding is not real); None when
    the shard does not fit the layout at all (the plan then raises on every rank)."""
    try:
        spec = ShardSpec.make(get_layout(layout), topo, local_len, cu_seqlens)
    except ValueError:
        return None
    if cu_seqlens is None:
        pos = spec.positions(topo.rank)
        return pos, torch.ones_like(pos, dtype=torch.bool)
    src, within = spec.sources(topo.rank)
    return within, src >= 0


def positions_error(cfg, topo: CPTopology, local_len: int, cu_seqlens, position_ids) -> ValueError | None:
    """The error to raise when ``position_ids`` (``[..., S_local]``) are not this rank's
    positions for ``cfg.layout``; None when they are or when there is nothing to check (see
    the module docstring)."""
    if position_ids is None or topo.size == 1 or not (cfg.check_positions and cfg.check_args):
        return None
    expected = _expected_positions(cfg.layout, topo, local_len, cu_seqlens)
    if expected is None:
        return None
    ids = torch.as_tensor(position_ids)
    key = (cfg.layout, topo.rank, topo.size, local_len, _cu_code(cu_seqlens))
    if _positions_fit(ids, expected, key):
        return None
    kind = "positions within each document" if cu_seqlens is not None else "global positions"
    return ValueError(
        f"position_ids are not this rank's {kind} under layout={cfg.layout!r} (CP rank "
        f"{topo.rank} of {topo.size}): the input looks sharded with another layout. Shard "
        f"with the layer's layout (ctxpar.shard / shard_packed / shard_batch with "
        f"layout={cfg.layout!r}) or build the layer with the one you shard with; "
        f"check_positions=False skips this check")


# id(position ids) -> (weakref, version, key, verdict): a bounded LRU, see the docstring.
_FIT: collections.OrderedDict = collections.OrderedDict()


def _positions_fit(ids: torch.Tensor, expected, key) -> bool:
    """Whether ``ids`` are the ``expected`` positions, read once per ids tensor and key."""
    hit = _FIT.get(id(ids))
    if hit is not None and hit[0]() is ids and hit[1] == ids._version and hit[2] == key:
        return hit[3]
    want, real = (t.to(ids.device) for t in expected)
    fit = ids.shape[-1] == want.shape[-1] and bool(((ids == want) | ~real).all())
    _FIT[id(ids)] = (weakref.ref(ids), ids._version, key, fit)
    while len(_FIT) > 64:
        _FIT.popitem(last=False)
    return fit


def _cu_code(cu_seqlens) -> int:
    """The ``cu_seqlens`` checksum from the host parse (read once per tensor); the raw
    values when they do not parse (the plan then raises on every rank)."""
    try:
        return cu_checksum(None if cu_seqlens is None else parse_cu_seqlens(cu_seqlens))
    except ValueError:
        return cu_checksum(cu_seqlens)


def _eta_bits(eta: torch.Tensor) -> int:
    return struct.unpack("<q", struct.pack("<d", float(eta.detach())))[0]


def check_agreement(cfg, topo: CPTopology, x: torch.Tensor, eta: torch.Tensor, cu_seqlens,
                    local: dict[str, ValueError | None], verified=None) -> None:
    """Raise a ValueError on every rank if the fields of the module docstring differ across
    ranks or any rank found one of the ``local`` errors (named by what they check). A rank
    raises its own local error where it has one (the most specific message), else the
    agreement's; with ``check_args`` off only the local errors are raised. ``verified``
    (the layer's :class:`~ctxpar.dist.agreement.VerifiedSignatures`): check each distinct
    signature once; None: every call."""
    own = next((e for e in local.values() if e is not None), None)
    if cfg.check_args:
        cast = autocast_dtype(x.device.type)
        options = (f"{cfg.layout} {cfg.scan_algorithm} {cfg.clip_tau!r} {cfg.target} {cfg.proj} "
                   f"{cfg.conv_kernel} {cfg.learn_eta}")
        fields = {"batch": x.shape[0], "S_local": x.shape[1], "hidden": x.shape[2],
                  "dtype": dtype_code(x.dtype), "chunk_size": cfg.chunk_size,
                  "options (layout, scan, clip, target, proj, conv, learn_eta)": text_code(options),
                  "autocast dtype": -1 if cast is None else dtype_code(cast),
                  "cu_seqlens checksum": _cu_code(cu_seqlens)}
        fields.update({f"{name} ok": int(e is None) for name, e in local.items()})
        try:
            check_agree_on(topo, fields, "InPlaceTTTMLP inputs", device=x.device,
                           shown=("batch", "S_local", "hidden", "chunk_size"), verified=verified,
                           unkeyed=lambda: {"eta": _eta_bits(eta)})
        except ValueError as e:
            raise (own or e) from None
    if own is not None:
        raise own
