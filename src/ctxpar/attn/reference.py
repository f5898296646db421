"""Plain references for attention: naive masked softmax over the whole sequence.

Deliberately simple and independent of the fast paths (no blocks, no LSE merge, no
layouts): the full ``[S, S]`` score matrix is built in the requested dtype (use float64
for checking), masked from global positions, and differentiated by autograd.
"""
from __future__ import annotations

import torch

__all__ = ["attention_reference", "reference_mask"]


def reference_mask(seq_len: int, *, causal: bool, window: tuple[int, int] = (-1, -1),
                   cu_seqlens: torch.Tensor | None = None, device=None,
                   key_len: int | None = None) -> torch.Tensor:
    """Boolean ``[S, S_k]``: ``mask[i, j]`` is True when query position i may attend key j
    (``S_k = key_len``, default S).

    causal: j <= i. window (left, right), flash-attn convention: i - left <= j <= i + right,
    -1 meaning unbounded. cu_seqlens: document boundaries ``[0, e1, e2, ..., S]``; i and j
    must lie in the same document."""
    i = torch.arange(seq_len, device=device)[:, None]
    key_len = seq_len if key_len is None else key_len
    j = torch.arange(key_len, device=device)[None, :]
    mask = torch.ones(seq_len, key_len, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= i
    left, right = window
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    if cu_seqlens is not None:
        doc = torch.bucketize(torch.arange(seq_len, device=device), cu_seqlens[1:].to(device),
                              right=True)
        mask &= doc[:, None] == doc[None, :key_len]
    return mask


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        causal: bool = False, scale: float | None = None,
                        window: tuple[int, int] = (-1, -1),
                        cu_seqlens: torch.Tensor | None = None):
    """Naive attention over full sequences.

    q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]. Returns ``(out [B, S, Hq, D], lse [B, Hq, S])``
    in q's dtype. Rows that see no key get out = 0 and lse = -inf (and zero gradients)."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    rep = hq // hkv
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = reference_mask(s, causal=causal, window=window, cu_seqlens=cu_seqlens, device=q.device,
                          key_len=k.shape[1])
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    has_key = mask.any(-1)
    # softmax of an all -inf row is NaN; such rows contribute nothing instead.
    probs = torch.softmax(scores.masked_fill(~has_key[:, None], 0.0), dim=-1) * has_key[:, None]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse
