"""CUDA block kernels: torch's fused flash (FA2) and memory-efficient attention.

The flash path calls the varlen entry points (``aten._flash_attention_forward`` /
``_backward``) with one sequence per batch row: they take ``[tokens, heads, head_dim]``
directly (our ``[B, S, H, D]`` layout, no transpose), support GQA without expanding K/V,
and return the LSE the ring merge and the no-recompute backward need. Masks other than
full/causal go through the memory-efficient kernel with an additive bias.
"""
from __future__ import annotations

import torch

__all__ = ["flash_forward", "flash_backward", "efficient_forward", "efficient_backward"]


def _cu(b: int, s: int, device) -> torch.Tensor:
    return torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device)


def flash_forward(q, k, v, is_causal: bool, scale: float):
    """q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D] (half types). Returns out [B, Sq, Hq, D]
    and lse [B, Hq, Sq] (fp32)."""
    b, lq, hq, d = q.shape
    lk = k.shape[1]
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q.reshape(b * lq, hq, d), k.reshape(b * lk, k.shape[2], d), v.reshape(b * lk, v.shape[2], d),
        _cu(b, lq, q.device), _cu(b, lk, q.device), lq, lk, 0.0, is_causal, False, scale=scale)
    # Varlen LSE is [Hq, total_q].
    return out.view(b, lq, hq, d), lse.view(hq, b, lq).transpose(0, 1)


def flash_backward(dout, q, k, v, out, lse, is_causal: bool, scale: float):
    """Gradients for :func:`flash_forward` from the (global) out and lse; dk/dv have Hkv heads."""
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    lse_varlen = lse.float().transpose(0, 1).reshape(hq, b * lq).contiguous()
    rng = torch.zeros(2, dtype=torch.int64, device=q.device)
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.reshape(b * lq, hq, d), q.reshape(b * lq, hq, d), k.reshape(b * lk, hkv, d),
        v.reshape(b * lk, hkv, d), out.reshape(b * lq, hq, d), lse_varlen,
        _cu(b, lq, q.device), _cu(b, lk, q.device), lq, lk, 0.0, is_causal, rng, unused, scale=scale)
    return dq.view(b, lq, hq, d), dk.view(b, lk, hkv, d), dv.view(b, lk, hkv, d)


def efficient_forward(qt, kt, vt, is_causal: bool, bias, scale: float):
    """[B, H, S, D] inputs (K/V already at Hq heads); returns out [B, H, Sq, D], lse [B, H, Sq]."""
    if bias is not None:
        bias = bias.expand(qt.shape[0], qt.shape[1], -1, -1)
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        qt, kt, vt, bias, True, 0.0, is_causal, scale=scale)
    # The kernel pads the LSE to a multiple of 32 rows.
    return res[0], res[1][..., : qt.shape[2]]


def efficient_backward(dot, qt, kt, vt, ot, lse, is_causal: bool, bias, scale: float):
    lq = qt.shape[2]
    padded = -(-lq // 32) * 32
    lse = lse.float()
    if padded != lq:
        lse = torch.nn.functional.pad(lse, (0, padded - lq), value=float("inf"))
    if bias is not None:
        bias = bias.expand(qt.shape[0], qt.shape[1], -1, -1)
    empty = torch.empty(0, device=qt.device)
    g = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dot, qt, kt, vt, bias, ot, lse.contiguous(), empty, empty, 0.0,
        [True, True, True, False], is_causal, scale=scale)
    return g[0], g[1], g[2]
