"""Helpers shared by the attention tests: seeded global inputs, tolerances, comparisons."""
from __future__ import annotations

import torch

import ctxpar
from ctxpar.attn.reference import attention_reference

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_qkv(seed, b, s, hq, hkv, d, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dout)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to max(1, max |ref|), with -inf entries required to match."""
    x, ref = x.double(), ref.double()
    inf = torch.isinf(ref)
    if inf.any():
        if not torch.equal(torch.isinf(x), inf) or not torch.equal(x[inf], ref[inf]):
            return float("inf")
        x, ref = x[~inf], ref[~inf]
    if ref.numel() == 0:
        return 0.0
    return ((x - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def compare_with_reference(q, k, v, dout, *, layout, group=None, **attn_kwargs) -> dict[str, float]:
    """Run ctxpar.attention on this rank's shard and the float64 reference on the full
    tensors; return relative errors of out, lse, dq, dk, dv on the local shard."""
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref_kwargs = {key: val for key, val in attn_kwargs.items() if key in ("causal", "window", "scale")}
    ro, rl = attention_reference(*ref_inputs, **ref_kwargs)
    (ro * dout.double()).sum().backward()
    shard = lambda t, dim=1: ctxpar.shard(t, layout=layout, group=group, dim=dim)  # noqa: E731
    ql, kl, vl = [shard(t).detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = ctxpar.attention(ql, kl, vl, layout=layout, group=group, return_lse=True, **attn_kwargs)
    (out.double() * shard(dout).double()).sum().backward()
    assert out.dtype == q.dtype and ql.grad.dtype == q.dtype
    return {
        "out": rel_err(out, shard(ro.detach())),
        "lse": rel_err(lse, shard(rl.detach(), 2)),
        "dq": rel_err(ql.grad, shard(ref_inputs[0].grad)),
        "dk": rel_err(kl.grad, shard(ref_inputs[1].grad)),
        "dv": rel_err(vl.grad, shard(ref_inputs[2].grad)),
    }
