"""Cross-rank agreement check of the arguments every rank must share.

One ``all_gather`` of a short int64 vector per call (a few dozen bytes) compares, across the
CP group: the local sequence length, batch, head counts, head_dim, dtype, causal flag,
window, layout, method and a checksum of ``cu_seqlens``. A mismatch raises the same
``ValueError`` on every rank, naming the ranks that differ and the field, instead of a hang
(mismatched transfer sizes) or silently wrong attention.

It is on by default; pass ``check_args=False`` to ``ctxpar.attention`` to skip it once a
training script is known to be consistent (it costs one small collective per call).
"""
from __future__ import annotations

import zlib

import torch

from .comms import CPGroup, all_gather

__all__ = ["check_consistent_args"]

_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _code(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def cu_checksum(cu_seqlens) -> int:
    if cu_seqlens is None:
        return -1
    values = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    return zlib.crc32(",".join(str(int(x)) for x in values).encode()) & 0x7FFFFFFF


def check_consistent_args(grp: CPGroup, q: torch.Tensor, k: torch.Tensor, *, causal: bool,
                          window, layout: str, method: str, cu_seqlens=None) -> None:
    """Raise ValueError on every rank if these arguments differ between ranks."""
    if grp.size == 1:
        return
    fields = {
        "batch": q.shape[0],
        "S_local": q.shape[1],
        "Hq": q.shape[2],
        "Hkv": k.shape[2],
        "head_dim": q.shape[3],
        "dtype": _DTYPES.index(q.dtype) if q.dtype in _DTYPES else _code(str(q.dtype)),
        "causal": int(bool(causal)),
        "window_left": int(window[0]),
        "window_right": int(window[1]),
        "layout": _code(layout),
        "method": _code(method),
        "cu_seqlens checksum": cu_checksum(cu_seqlens),
    }
    mine = torch.tensor(list(fields.values()), dtype=torch.int64, device=q.device)
    table = all_gather(grp, mine).cpu()
    if bool((table == table[0]).all()):
        return
    problems = []
    for j, name in enumerate(fields):
        col = table[:, j].tolist()
        if len(set(col)) > 1:
            # Name the minority ranks: those whose value differs from the most common one.
            common = max(set(col), key=col.count)
            odd = [r for r, x in enumerate(col) if x != common]
            shown = col if name in ("batch", "S_local", "Hq", "Hkv", "head_dim", "causal",
                                    "window_left", "window_right") else None
            detail = f" (values by rank: {shown})" if shown is not None else ""
            problems.append(f"{name} differs on rank(s) {odd}{detail}")
    raise ValueError("ctxpar.attention arguments must agree across the CP group: "
                     + "; ".join(problems))
