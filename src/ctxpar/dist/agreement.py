"""Cross-rank agreement check of the arguments every rank must share.

One ``all_gather`` of a short int64 vector (a few dozen bytes) compares, across the CP
group: the local sequence length, batch, head counts, head_dim, dtype, causal flag,
window, softmax scale, layout, method, backend, ``return_lse`` and a checksum of
``cu_seqlens``: every argument of ``ctxpar.attention`` that changes what the ranks compute or
send. (``check_args`` itself cannot be checked: a rank that skips the check while its peers
run it leaves them waiting.) A mismatch raises the same
``ValueError`` on every rank, naming the ranks that differ and the field, instead of a hang
(mismatched transfer sizes) or silently wrong attention.

**Once per signature** (``verified=``, what ``ctxpar.attention`` and the TTT layer use by
default: attention records signatures in :data:`VERIFIED`, a TTT layer in its own set). Reading the gathered table on the host is a host-device synchronisation on CUDA
(it drains the stream in every layer), and the collective is a fixed cost per call. So a
rank remembers the signatures (the field values, per group) that passed the check and
skips the check when it meets one again: a training loop pays one check per distinct
shape, then none. The trade-off, stated plainly: the check then guards the *first* call
of every signature. If the ranks agree on a call and later one rank *alone* changes its
arguments, that rank's signature is new and it enters the check's all-gather while its
peers (signature known) enter the method's first collective: mismatched collectives,
which hang until the process group's timeout or fail in the transport, not with this
module's ValueError. A rank that alone switches to another *already verified* signature
is not noticed at all. Scripts that change shapes rank by rank (a bug this check exists
to catch) should run with ``check_args="always"`` while debugging: every call checked
(one collective per call, a device synchronisation on CUDA), as before.
"""
from __future__ import annotations

import collections
import struct
import zlib

import torch

from ctxpar.dist.collectives import all_gather
from ctxpar.dist.topology import CPGroup, CPTopology

__all__ = ["check_agree", "check_agree_on", "check_consistent_args", "text_code", "cu_checksum",
           "dtype_code", "check_mode", "VerifiedSignatures", "VERIFIED"]

_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def text_code(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def cu_checksum(cu_seqlens) -> int:
    """A checksum of document boundaries (a tensor, or host ints: no device read)."""
    if cu_seqlens is None:
        return -1
    values = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    return zlib.crc32(",".join(str(int(x)) for x in values).encode()) & 0x7FFFFFFF


def check_mode(check_args) -> str | None:
    """``check_args`` as a mode: True or "once" -> "once" (each distinct signature checked
    once per group), "always" -> every call, False -> None (no check)."""
    if check_args is True or check_args == "once":
        return "once"
    if check_args == "always":
        return "always"
    if check_args is False or check_args is None:
        return None
    raise ValueError(f"check_args must be True, False, 'once' or 'always'; got {check_args!r}")


class VerifiedSignatures:
    """The signatures this process has seen pass the check: a bounded LRU set of
    ``(what, process groups, field values)``. Bounded (``maxsize``) so that a run that
    varies shapes forever keeps a fixed footprint (an evicted signature is simply checked
    again). One instance, :data:`VERIFIED`, serves the library; tests may build their own."""

    def __init__(self, maxsize: int = 1024):
        self.maxsize = maxsize
        self._keys: collections.OrderedDict = collections.OrderedDict()

    def __contains__(self, key) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        return False

    def add(self, key) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.maxsize:
            self._keys.popitem(last=False)

    def clear(self) -> None:
        self._keys.clear()

    def __deepcopy__(self, memo) -> "VerifiedSignatures":
        # A copy (e.g. of a model that owns one) starts empty: the keys hold process
        # groups, which neither copy nor pickle, and a copy checks its first calls again.
        return VerifiedSignatures(self.maxsize)

    def __reduce__(self):
        return VerifiedSignatures, (self.maxsize,)


VERIFIED = VerifiedSignatures()


def float_code(x: float | None) -> int:
    """The bits of a float (-1 for None) as an int, so that equal floats compare equal."""
    if x is None:
        return -1
    return int.from_bytes(struct.pack("<d", float(x)), "little", signed=True)


def check_consistent_args(topo: CPTopology, q: torch.Tensor, k: torch.Tensor, *, causal: bool,
                          window, layout: str, method: str, scale: float | None = None,
                          backend: str = "auto", return_lse: bool = False,
                          cu_seqlens=None, verified: "VerifiedSignatures | None" = None) -> None:
    """Raise ValueError on every rank if these attention arguments differ between ranks
    (``verified``: skip a signature found there, see the module docstring).
    ``cu_seqlens`` as host ints (a tuple) costs no device read."""
    if topo.size == 1:
        return
    fields = {
        "batch": q.shape[0],
        "S_local": q.shape[1],
        "Hq": q.shape[2],
        "Hkv": k.shape[2],
        "head_dim": q.shape[3],
        "dtype": dtype_code(q.dtype),
        "causal": int(bool(causal)),
        "window_left": int(window[0]),
        "window_right": int(window[1]),
        "scale (bits)": float_code(scale),
        "layout": text_code(layout),
        "method": text_code(method),
        "backend": text_code(backend),
        "return_lse": int(bool(return_lse)),
        "cu_seqlens checksum": cu_checksum(cu_seqlens),
    }
    check_agree_on(topo, fields, "ctxpar.attention arguments", device=q.device,
                   shown=("batch", "S_local", "Hq", "Hkv", "head_dim", "causal", "window_left",
                          "window_right", "return_lse"), verified=verified)


def check_agree_on(topo: CPTopology, fields: dict[str, int], what: str, device=None,
                   shown=(), *, verified: VerifiedSignatures | None = None,
                   unkeyed=None) -> None:
    """:func:`check_agree` over a whole CP group. On a mesh it runs in the Ulysses and in
    the ring group, every rank taking part in both whatever it finds, and then a
    one-element "someone failed" flag is OR-ed over the Ulysses and then the ring group,
    which reaches every rank of the mesh: all raise together, none is left waiting.

    ``verified``: skip the check when these ``fields`` already passed on this group, as
    recorded there (see the module docstring for what that trades); :data:`VERIFIED` for
    functional calls, or an owner's own set (a layer checks its own first calls). ``unkeyed``: a callable returning more fields
    that are compared whenever the check runs but are not part of the signature (values
    that change every step, such as a learned scalar, and cost a device read)."""
    if topo.size == 1:
        return
    key = None if verified is None else (what, topo.ring.pg, topo.ulysses.pg, topo.size,
                                         tuple(fields.items()))
    if key is not None and key in verified:
        return
    if unkeyed is not None:
        fields = {**fields, **unkeyed()}
    _check_agree_on(topo, fields, what, device, shown)
    if key is not None:
        verified.add(key)


def _check_agree_on(topo: CPTopology, fields: dict[str, int], what: str, device, shown) -> None:
    if not topo.is_mesh:
        check_agree(topo.ring, fields, what, device, shown)
        return
    error = None
    for grp in (topo.ulysses, topo.ring):
        try:
            check_agree(grp, fields, what, device, shown)
        except ValueError as e:
            error = error or e
    flag = torch.tensor([int(error is not None)], dtype=torch.int64, device=device)
    for grp in (topo.ulysses, topo.ring):
        if grp.size > 1:
            flag = all_gather(grp, flag).amax(0)
    if error is not None:
        raise error
    if int(flag.item()):
        raise ValueError(f"{what} must agree across the CP mesh; another rank of the mesh found "
                         "a mismatch (see its error for the field)")


def check_agree(grp: CPGroup, fields: dict[str, int], what: str, device=None, shown=()) -> None:
    """Raise the same ValueError on every rank of ``grp`` if any of the int ``fields``
    differs between ranks, naming the field and the odd rank(s); the values by rank are
    printed for the fields named in ``shown`` (the others are codes or checksums)."""
    if grp.size == 1:
        return
    mine = torch.tensor(list(fields.values()), dtype=torch.int64, device=device)
    table = all_gather(grp, mine).cpu()
    if bool((table == table[0]).all()):
        return
    problems = []
    for j, name in enumerate(fields):
        col = table[:, j].tolist()
        if len(set(col)) > 1:
            # Name the minority ranks: those whose value differs from the most common one;
            # without a majority (e.g. 1 vs 1) those that differ from rank 0, and say so.
            counts = sorted((col.count(x) for x in set(col)), reverse=True)
            tie = counts[0] == counts[1]
            common = col[0] if tie else max(set(col), key=col.count)
            odd = [r for r, x in enumerate(col) if x != common]
            notes = (["no majority: the ranks that differ from rank 0"] if tie else []) + (
                [f"values by rank: {col}"] if name in shown else [])
            detail = f" ({'; '.join(notes)})" if notes else ""
            problems.append(f"{name} differs on rank(s) {odd}{detail}")
    raise ValueError(f"{what} must agree across the CP group: " + "; ".join(problems))


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else text_code(str(dtype))
