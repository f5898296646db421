"""Cross-rank agreement check of the arguments every rank must share.

One ``all_gather`` of a short int64 vector per call (a few dozen bytes) compares, across the
CP group: the local sequence length, batch, head counts, head_dim, dtype, causal flag,
window, softmax scale, layout, method, backend, ``return_lse`` and a checksum of
``cu_seqlens``: every argument of ``ctxpar.attention`` that changes what the ranks compute or
send. (``check_args`` itself cannot be checked: a rank that skips the check while its peers
run it leaves them waiting.) A mismatch raises the same
``ValueError`` on every rank, naming the ranks that differ and the field, instead of a hang
(mismatched transfer sizes) or silently wrong attention.

It is on by default; pass ``check_args=False`` to ``ctxpar.attention`` to skip it once a
training script is known to be consistent (it costs one small collective per call).
"""
from __future__ import annotations

import struct
import zlib

import torch

from ctxpar.dist.collectives import all_gather
from ctxpar.dist.topology import CPGroup, CPTopology

__all__ = ["check_agree", "check_agree_on", "check_consistent_args", "text_code", "cu_checksum",
           "dtype_code"]

_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def text_code(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def cu_checksum(cu_seqlens) -> int:
    if cu_seqlens is None:
        return -1
    values = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    return zlib.crc32(",".join(str(int(x)) for x in values).encode()) & 0x7FFFFFFF


def float_code(x: float | None) -> int:
    """The bits of a float (-1 for None) as an int, so that equal floats compare equal."""
    if x is None:
        return -1
    return int.from_bytes(struct.pack("<d", float(x)), "little", signed=True)


def check_consistent_args(topo: CPTopology, q: torch.Tensor, k: torch.Tensor, *, causal: bool,
                          window, layout: str, method: str, scale: float | None = None,
                          backend: str = "auto", return_lse: bool = False,
                          cu_seqlens=None) -> None:
    """Raise ValueError on every rank if these attention arguments differ between ranks."""
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
                          "window_right", "return_lse"))


def check_agree_on(topo: CPTopology, fields: dict[str, int], what: str, device=None,
                   shown=()) -> None:
    """:func:`check_agree` over a whole CP group. On a mesh it runs in the Ulysses and in
    the ring group, every rank taking part in both whatever it finds, and then a
    one-element "someone failed" flag is OR-ed over the Ulysses and then the ring group,
    which reaches every rank of the mesh: all raise together, none is left waiting."""
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
