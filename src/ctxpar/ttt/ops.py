"""The In-Place TTT fast path: a chunked fast-weight apply/update as one autograd Function.

Shapes (one rank): ``z`` ``[B, S, F]`` (the gated-MLP activations, F = d_ff), ``v`` ``[B, S, D]``
(the targets V̂), ``w0`` ``[D, F]`` (down_proj.weight), ``eta`` a scalar. Chunk i is rows
``[iC, (i+1)C)``. With ΔW_i = V̂_iᵀ Z_i ``[B, D, F]`` (optionally Frobenius-clipped) and the
exclusive prefix S_i = P + E_i, where E_i = Σ_{j<i} ΔW_j within a block and P is the carry from
every earlier block of the sequence (the cross-rank scan):

    O_i = Z_i (W_0 + η P)ᵀ + η Y_i,      Y_i = Z_i E_iᵀ.

Why this form (and not Σ_{j<i} (Z_i Z_jᵀ) V̂_j, the linear-attention form): on CPU at S=16384,
D=256, F=1024, C=1024 the running D×F accumulator costs 4·S·D·F flops for the chunk work,
while the block-masked quadratic form costs S²·(D+F), ten times more; the quadratic form only
wins below S ≈ 4DF/(D+F) ≈ 800 tokens. The per-chunk weights W_(i) are never formed: E is
one running ``[B, D, F]`` accumulator, and the carry P enters only the final matmul, so the
scan's all-gather is in flight while the chunk loop runs. That overlap needs each block's
summary before the loop: one extra S·D·F GEMM (``overlap=True``, the default). With
``overlap=False`` the summary is the loop's final accumulator (no extra flops) and the
gather runs between the loop and the final matmul: better where compute dominates and the
link is fast (CPU/gloo, |W| of a few MB). The backward always overlaps: the reverse
summaries (one GEMM, which rank 0's block skips) travel during pass 1.

Backward, with G = ∂L/∂O, A_i = G_iᵀ Z_i, U_i = Σ_{k>i} A_k (a *reverse* exclusive scan;
its cross-block part Q is the reverse scan of block summaries):

    ∂Z_i = G_i W_(i) + V̂_i M_i,  ∂V̂_i = Z_i M_iᵀ,  M_i = η U_i (through the clip if any),
    ∂W_0 = Σ_i A_i,               ∂η = ⟨G, Y⟩ + Σ_blocks ⟨P, A over the carried rows⟩.

Saved for backward: z, v, W_0, η, Y ``[B, S, D]`` (only when η needs a gradient), the
carries P ``[m, B, D, F]`` (m runs: 1 or 2, or per document with packed zigzag): O(m·|W|)
besides the activations, never O(K·|W|) in the number of chunks K, and nothing
per chunk (the clip factors are recomputed with ΔW). The backward recomputes ΔW_i (one pass
forward for E_i, one pass in reverse for U_i) instead of storing it. Parameter gradients are
this rank's share; sum them over the CP group like any replicated parameter's.

Precision: accumulators, carries and the scan run in float32 (float64 for float64 input);
for bf16/fp16 input the W_0 matmul stays in the input dtype (so the layer is bit-exact with
the wrapped MLP at init) and the fast-weight correction is added in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ctxpar.numerics import acc_dtype
from ctxpar.scan import start_scan
from ctxpar.ttt.plan import Plan

__all__ = ["TTTApply", "chunk_delta"]


def _clip_scale(dw: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch scale min(1, τ/‖ΔW‖_F) and the norm (a zero norm gives scale 1)."""
    norm = torch.linalg.vector_norm(dw.flatten(1), dim=1)
    return (tau / norm).clamp(max=1.0), norm


def chunk_delta(v_i, z_i, clip):
    """ΔW_i = V̂_iᵀ Z_i, clipped (the backward recomputes it with the same ops, bit for bit)."""
    dw = torch.bmm(v_i.transpose(1, 2), z_i)
    if clip is None:
        return dw, None
    scale, _ = _clip_scale(dw, clip)
    return dw * scale.view(-1, 1, 1), scale


def _bmm_into(dst, a, b):
    """dst = a @ b, written in place when dst is contiguous (batch of one)."""
    if dst.is_contiguous():
        torch.bmm(a, b, out=dst)
    else:
        dst.copy_(torch.bmm(a, b))


def _matmul_into(dst, a, w):
    """dst = a @ w for w ``[D, F]`` or ``[B, D, F]``, in place when dst is contiguous."""
    if w.dim() == 2 and dst.is_contiguous():
        torch.mm(a.reshape(-1, a.shape[-1]), w, out=dst.view(-1, dst.shape[-1]))
    elif w.dim() == 3:
        _bmm_into(dst, a, w)
    else:
        dst.copy_(torch.matmul(a, w))


def _matmul_t(x, w):
    """x ``[B, n, F]`` times wᵀ, for w ``[D, F]`` or per-batch ``[B, D, F]``: ``[B, n, D]``."""
    if w.dim() == 2:
        return F.linear(x, w)
    if w.shape[0] == 1:  # one weight: a single large GEMM instead of a batched one
        return F.linear(x, w[0])
    return torch.bmm(x, w.transpose(1, 2))


class TTTApply(torch.autograd.Function):
    """``TTTApply.apply(z, v, w0, bias, eta, plan) -> O [B, S, D]`` (dtype of z)."""

    @staticmethod
    def forward(ctx, z, v, w0, bias, eta, plan: Plan):
        acc = acc_dtype(z.dtype)
        low = acc != z.dtype  # bf16/fp16: keep the base matmul in the input dtype (exact at init)
        bsz, _, nf = z.shape
        nd, c = v.shape[-1], plan.chunk
        eta_a = eta.detach().to(acc)
        w0a = w0.detach().to(acc)
        m = len(plan.blocks)

        # 1. Block summaries for the forward scan, started first so that the gather overlaps
        # the chunk loop. The globally last block's summary is never consumed: skip it.
        # Without overlap the loop's own accumulator gives the summary at no extra flops,
        # and the gather runs between the loop and the final matmul.
        summ = torch.zeros(m, bsz, nd, nf, dtype=acc, device=z.device)
        needs_summary = [blk.elem != plan.n_elems - 1 for blk in plan.blocks]
        for j, blk in enumerate(plan.blocks):
            if not needs_summary[j] or not plan.overlap:
                continue
            lo, hi = blk.row0 + c * blk.last_reset, blk.row0 + blk.rows
            if plan.clip is None:
                torch.bmm(v[:, lo:hi].to(acc).transpose(1, 2), z[:, lo:hi].to(acc), out=summ[j])
            else:
                for s in range(lo, hi, c):
                    summ[j] += chunk_delta(v[:, s:s + c].to(acc), z[:, s:s + c].to(acc), plan.clip)[0]
        resets = plan.resets(z.device)
        pending = None
        if plan.n_elems > 1 and plan.overlap:
            pending = start_scan(summ, None, grp=plan.grp, layout=plan.layout, held=plan.held,
                                 algorithm=plan.algorithm, reset=resets)

        # 2. Local chunk work: Y_i = Z_i E_iᵀ with a running accumulator E.
        y = torch.zeros(bsz, z.shape[1], nd, dtype=acc, device=z.device)
        for j, blk in enumerate(plan.blocks):
            e, last = None, len(blk.flags) - 1
            if not plan.overlap and needs_summary[j]:
                last += 1  # the last delta completes this block's summary
            for i, flag in enumerate(blk.flags):
                s = blk.row0 + i * c
                if flag:
                    e = None
                z_i = z[:, s:s + c].to(acc)
                if e is not None:
                    _bmm_into(y[:, s:s + c], z_i, e.transpose(1, 2))
                if i < last:  # else the block's last delta only feeds the summary
                    dw, _ = chunk_delta(v[:, s:s + c].to(acc), z_i, plan.clip)
                    e = dw if e is None else e.add_(dw)
            if last == len(blk.flags) and e is not None:
                summ[j].copy_(e)
        if plan.n_elems > 1 and not plan.overlap:
            pending = start_scan(summ, None, grp=plan.grp, layout=plan.layout, held=plan.held,
                                 algorithm=plan.algorithm, reset=resets)

        # 3. The carry enters one final matmul per block.
        carry = pending.wait() if pending is not None else torch.zeros_like(summ)
        out = torch.empty(bsz, z.shape[1], nd, dtype=acc, device=z.device)
        for j, blk in enumerate(plan.blocks):
            r0, r1, rc = blk.row0, blk.row0 + blk.rows, blk.row0 + c * blk.first_reset
            has_carry = blk.elem != 0 and rc > r0
            parts = [(r0, rc, True), (rc, r1, False)] if has_carry else [(r0, r1, False)]
            for lo, hi, with_p in parts:
                if hi <= lo:
                    continue
                z_r = z[:, lo:hi]
                if low:
                    base = F.linear(z_r, w0, bias).to(acc)
                    if with_p:
                        base += _matmul_t(z_r.to(acc), eta_a * carry[j])
                else:
                    w = w0a + eta_a * carry[j] if with_p else w0a
                    base = F.linear(z_r, w, bias) if w.dim() == 2 else _matmul_t(z_r, w)
                    if w.dim() == 3 and bias is not None:
                        base += bias.to(acc)
                out[:, lo:hi] = base
        out.add_(eta_a * y)

        ctx.plan, ctx.low = plan, low
        ctx.has_bias = bias is not None
        ctx.save_for_backward(z, v, w0, eta, y if ctx.needs_input_grad[4] else None,
                              carry)
        return out.to(z.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        z, v, w0, eta, y, carry = ctx.saved_tensors
        plan: Plan = ctx.plan
        acc = carry.dtype
        c, m = plan.chunk, len(plan.blocks)
        bsz, _, nf = z.shape
        nd = v.shape[-1]
        g = grad_out.to(acc)
        eta_a = eta.detach().to(acc)
        w0a = w0.detach().to(acc)

        # 1. Reverse summaries A over the rows that received the carry (before the first
        # reset); the globally first block's is never consumed. Their reverse scan overlaps
        # pass 1.
        rsum = torch.zeros(m, bsz, nd, nf, dtype=acc, device=z.device)
        for j, blk in enumerate(plan.blocks):
            rc = blk.row0 + c * blk.first_reset
            if blk.elem != 0 and rc > blk.row0:
                torch.bmm(g[:, blk.row0:rc].transpose(1, 2), z[:, blk.row0:rc].to(acc), out=rsum[j])
        pending = None
        if plan.n_elems > 1:
            pending = start_scan(rsum, None, grp=plan.grp, layout=plan.layout, held=plan.held,
                                 algorithm=plan.algorithm, reverse=True, reset=plan.resets(z.device))

        # 2. Pass 1 (chunk order): ∂Z_i = G_i (W_0 + η(P + E_i)), E_i recomputed.
        dz = torch.empty(bsz, z.shape[1], nf, dtype=acc, device=z.device)
        for j, blk in enumerate(plan.blocks):
            e, last = None, len(blk.flags) - 1
            with_p = blk.elem != 0
            for i, flag in enumerate(blk.flags):
                s = blk.row0 + i * c
                if flag:
                    e, with_p = None, False
                w = w0a + eta_a * carry[j] if with_p else w0a
                if e is not None:
                    w = w + eta_a * e
                _matmul_into(dz[:, s:s + c], g[:, s:s + c], w)
                if i < last:
                    z_i = z[:, s:s + c].to(acc)
                    dw, _ = chunk_delta(v[:, s:s + c].to(acc), z_i, plan.clip)
                    e = dw if e is None else e.add_(dw)

        # 3. Pass 2 (reverse chunk order): U starts from the cross-block carry Q.
        q = pending.wait() if pending is not None else torch.zeros_like(rsum)
        dv = torch.zeros(bsz, z.shape[1], nd, dtype=acc, device=z.device)
        a_sum = torch.zeros(bsz, nd, nf, dtype=acc, device=z.device)
        for j in range(m - 1, -1, -1):
            blk = plan.blocks[j]
            u = q[j].clone() if blk.elem != plan.n_elems - 1 else None
            for i in range(len(blk.flags) - 1, -1, -1):
                s = blk.row0 + i * c
                z_i, g_i = z[:, s:s + c].to(acc), g[:, s:s + c]
                if u is not None:
                    mi = eta_a * u
                    if plan.clip is not None:
                        mi = _clip_adjoint(mi, v[:, s:s + c].to(acc), z_i, plan.clip)
                    dz[:, s:s + c].baddbmm_(v[:, s:s + c].to(acc), mi)
                    _bmm_into(dv[:, s:s + c], z_i, mi.transpose(1, 2))
                a_i = torch.bmm(g_i.transpose(1, 2), z_i)
                a_sum += a_i
                if blk.flags[i]:
                    u = None
                else:
                    u = a_i if u is None else u.add_(a_i)

        d_eta = None
        if ctx.needs_input_grad[4]:
            d_eta = (g * y).sum() + (carry * rsum).sum()
            d_eta = d_eta.to(eta.dtype).reshape(eta.shape)
        d_bias = g.sum((0, 1)).to(w0.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return (dz.to(z.dtype), dv.to(v.dtype), a_sum.sum(0).to(w0.dtype), d_bias, d_eta, None)


def _clip_adjoint(mi, v_i, z_i, tau):
    """∂L/∂ΔW from ∂L/∂(s·ΔW) = mi, with s = min(1, τ/‖ΔW‖):
    s·mi − [‖ΔW‖ > τ] · τ⟨mi, ΔW⟩/‖ΔW‖³ · ΔW."""
    dw = torch.bmm(v_i.transpose(1, 2), z_i)
    scale, norm = _clip_scale(dw, tau)
    clipped = (norm > tau).to(dw.dtype)
    inner = (mi * dw).flatten(1).sum(1)
    coef = clipped * tau * inner / norm.clamp_min(torch.finfo(dw.dtype).tiny) ** 3
    return mi * scale.view(-1, 1, 1) - coef.view(-1, 1, 1) * dw
