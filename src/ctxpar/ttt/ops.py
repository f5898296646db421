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

Autocast: the Function's internals pick their own dtypes (fp32 accumulators written in place,
the W_0 matmul in the compute dtype), so they run with autocast *disabled*, in forward and
backward. Under an enabled autocast, forward first casts z and v to the autocast dtype (what
autocast hands any matmul; float64 stays, as autocast leaves it) and W_0 follows z, so at
init the output equals the wrapped MLP under the same autocast bit for bit. This is
``torch.amp.custom_fwd(cast_inputs=...)`` and ``custom_bwd`` done at run time: those
decorators fix the device type and the cast dtype when the class is defined, while this
layer runs on any device under any autocast dtype.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ctxpar.numerics import acc_dtype
from ctxpar.scan import PendingScan, start_scan
from ctxpar.ttt.plan import Plan

__all__ = ["TTTApply", "autocast_dtype", "chunk_delta", "clip_delta", "without_autocast"]


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


def clip_delta(dw, clip):
    """``dw`` ``[B, D, F]`` scaled to Frobenius norm <= ``clip`` per row (None: as it is);
    the same scale as :func:`chunk_delta`'s, for a ΔW summed token by token (decode)."""
    if clip is None:
        return dw
    return dw * _clip_scale(dw, clip)[0].view(-1, 1, 1)


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


def without_autocast(device_type: str):
    """A context with autocast off on ``device_type`` (see the module docstring)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype an enabled autocast gives matmuls on ``device_type``, else None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _scan(summaries: torch.Tensor, plan: Plan, reverse: bool = False) -> PendingScan | None:
    """The exclusive scan of this rank's block summaries ``[m, B, D, F]`` over the plan's
    element order, with its document resets; None when the sequence is one block."""
    if plan.n_elems <= 1:
        return None
    return start_scan(summaries, None, grp=plan.grp, layout=plan.layout, held=plan.held,
                      algorithm=plan.algorithm, reverse=reverse, reset=plan.resets(summaries.device))


def _carried(plan: Plan) -> list[tuple[int, int, int]]:
    """``(j, row0, rc)`` for every block j whose rows ``[row0, rc)`` (those before its first
    reset) receive the carry from earlier blocks."""
    out = []
    for j, blk in enumerate(plan.blocks):
        rc = blk.row0 + plan.chunk * blk.first_reset
        if blk.elem != 0 and rc > blk.row0:
            out.append((j, blk.row0, rc))
    return out


class TTTApply(torch.autograd.Function):
    """``TTTApply.apply(z, v, w0, bias, eta, plan) -> O [B, S, D]`` (dtype of z; under
    autocast, the autocast dtype)."""

    @staticmethod
    def forward(ctx, z, v, w0, bias, eta, plan: Plan):
        ctx.in_dtypes = (z.dtype, v.dtype)
        cast = autocast_dtype(z.device.type)
        with without_autocast(z.device.type):
            if cast is not None:  # as autocast's own casts: float64 stays float64
                z, v = (t if t.dtype == torch.float64 else t.to(cast) for t in (z, v))
            out, y, carry = _forward(z, v, w0, bias, eta, plan)
        ctx.plan, ctx.has_bias = plan, bias is not None
        ctx.save_for_backward(z, v, w0, eta, y if ctx.needs_input_grad[4] else None, carry)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        z, v, w0, eta, y, carry = ctx.saved_tensors
        plan: Plan = ctx.plan
        with without_autocast(z.device.type):
            g = grad_out.to(carry.dtype)
            dz, dv, dw0, rsum = _backward(g, z, v, w0, eta, carry, plan)
            d_eta = None
            if ctx.needs_input_grad[4]:
                # The carry term counts only where the carry entered: elsewhere P may hold
                # another (possibly non-finite) document while A is zero.
                carried = sum((carry[j] * rsum[j]).sum() for j, _, _ in _carried(plan))
                d_eta = ((g * y).sum() + carried).to(eta.dtype).reshape(eta.shape)
            d_bias = g.sum((0, 1)).to(w0.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dz.to(ctx.in_dtypes[0]), dv.to(ctx.in_dtypes[1]), dw0.to(w0.dtype), d_bias, d_eta, None


# ------------------------------------------------------------------------------ forward


def _forward(z, v, w0, bias, eta, plan: Plan):
    """``(O in z's dtype, Y [B, S, D], carries P [m, B, D, F])``; Y and P in the carry dtype."""
    acc = acc_dtype(z.dtype)
    # The globally last block's summary is never consumed: skip it.
    needs = [blk.elem != plan.n_elems - 1 for blk in plan.blocks]
    bsz, _, nf = z.shape
    summ = torch.zeros(len(plan.blocks), bsz, v.shape[-1], nf, dtype=acc, device=z.device)
    # 1. Summaries first, so that the scan's gather overlaps the chunk loop (overlap=True);
    # without overlap the loop's own accumulator gives them at no extra flops, and the
    # gather runs between the loop and the final matmul.
    pending = None
    if plan.overlap:
        _block_summaries(summ, z, v, plan, needs)
        pending = _scan(summ, plan)
    y = _local_prefix(summ, z, v, plan, needs)
    if not plan.overlap:
        pending = _scan(summ, plan)
    carry = pending.wait() if pending is not None else torch.zeros_like(summ)
    eta_a = eta.detach().to(acc)
    out = _apply(z, w0, bias, eta_a, carry, plan)
    return out.add_(eta_a * y).to(z.dtype), y, carry


def _block_summaries(summ, z, v, plan: Plan, needs) -> None:
    """``summ[j]`` = Σ ΔW over block j's chunks from its last reset on (its state at its
    end), for the blocks in ``needs``."""
    c, acc = plan.chunk, summ.dtype
    for j, blk in enumerate(plan.blocks):
        if not needs[j]:
            continue
        lo, hi = blk.row0 + c * blk.last_reset, blk.row0 + blk.rows
        if plan.clip is None:
            torch.bmm(v[:, lo:hi].to(acc).transpose(1, 2), z[:, lo:hi].to(acc), out=summ[j])
        else:
            for s in range(lo, hi, c):
                summ[j] += chunk_delta(v[:, s:s + c].to(acc), z[:, s:s + c].to(acc), plan.clip)[0]


def _local_prefix(summ, z, v, plan: Plan, needs) -> torch.Tensor:
    """Y_i = Z_i E_iᵀ ``[B, S, D]`` with one running accumulator E per block (None after a
    reset: the restart is a selection). Without overlap the blocks in ``needs`` also write
    their final accumulator into ``summ``."""
    c, acc = plan.chunk, summ.dtype
    y = torch.zeros(*z.shape[:2], v.shape[-1], dtype=acc, device=z.device)
    for j, blk in enumerate(plan.blocks):
        e, last = None, len(blk.flags) - 1
        if not plan.overlap and needs[j]:
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
    return y


def _apply(z, w0, bias, eta_a, carry, plan: Plan) -> torch.Tensor:
    """Z (W_0 + η P)ᵀ (+ bias) ``[B, S, D]`` in the carry dtype: the carry enters one final
    matmul per block, on its rows before the first reset only. For bf16/fp16 z the W_0
    matmul runs in z's dtype (W_0 and the bias cast to it: exact at init, also under
    autocast) and the carry term is added in float32."""
    acc = eta_a.dtype
    low = acc != z.dtype
    w0c = w0.detach().to(z.dtype if low else acc)
    bias = None if bias is None else bias.detach().to(w0c.dtype)
    out = torch.empty(*z.shape[:2], w0.shape[0], dtype=acc, device=z.device)
    carried = {j: rc for j, _, rc in _carried(plan)}
    for j, blk in enumerate(plan.blocks):
        r0, r1, rc = blk.row0, blk.row0 + blk.rows, carried.get(j, blk.row0)
        for lo, hi, with_p in ((r0, rc, True), (rc, r1, False)):
            if hi <= lo:
                continue
            z_r = z[:, lo:hi]
            if low:
                base = F.linear(z_r, w0c, bias).to(acc)
                if with_p:
                    base += _matmul_t(z_r.to(acc), eta_a * carry[j])
            else:
                w = w0c + eta_a * carry[j] if with_p else w0c
                base = F.linear(z_r, w, bias) if w.dim() == 2 else _matmul_t(z_r, w)
                if w.dim() == 3 and bias is not None:
                    base += bias
            out[:, lo:hi] = base
    return out


# ----------------------------------------------------------------------------- backward


def _backward(g, z, v, w0, eta, carry, plan: Plan):
    """``(∂Z, ∂V̂, ∂W_0, reverse summaries A [m, B, D, F])`` in the carry dtype, for ``g`` =
    ∂L/∂O in the carry dtype."""
    acc = carry.dtype
    eta_a = eta.detach().to(acc)
    rsum = _reverse_summaries(g, z, plan)
    pending = _scan(rsum, plan, reverse=True)  # in flight during pass 1
    dz = _grad_pass_forward(g, z, v, w0.detach().to(acc), eta_a, carry, plan)
    q = pending.wait() if pending is not None else torch.zeros_like(carry)
    dv, a_sum = _grad_pass_reverse(dz, g, z, v, eta_a, q, plan)
    return dz, dv, a_sum.sum(0), rsum


def _reverse_summaries(g, z, plan: Plan) -> torch.Tensor:
    """``[m, B, D, F]``: A = Σ G_iᵀ Z_i over the rows of each block that received the carry
    (before its first reset); zero elsewhere (the globally first block's is never
    consumed)."""
    acc = g.dtype
    rsum = torch.zeros(len(plan.blocks), g.shape[0], g.shape[-1], z.shape[-1], dtype=acc, device=z.device)
    for j, r0, rc in _carried(plan):
        torch.bmm(g[:, r0:rc].transpose(1, 2), z[:, r0:rc].to(acc), out=rsum[j])
    return rsum


def _grad_pass_forward(g, z, v, w0a, eta_a, carry, plan: Plan) -> torch.Tensor:
    """Pass 1 (chunk order): ∂Z_i = G_i (W_0 + η(P + E_i)), E_i recomputed: ``[B, S, F]``."""
    c, acc = plan.chunk, g.dtype
    dz = torch.empty(*z.shape, dtype=acc, device=z.device)
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
                dw, _ = chunk_delta(v[:, s:s + c].to(acc), z[:, s:s + c].to(acc), plan.clip)
                e = dw if e is None else e.add_(dw)
    return dz


def _grad_pass_reverse(dz, g, z, v, eta_a, q, plan: Plan):
    """Pass 2 (reverse chunk order): U starts from the cross-block carry Q and is dropped
    at a reset (a selection). Adds V̂_i M_i to ``dz``; returns ``(∂V̂ [B, S, D], Σ_i A_i
    [B, D, F])``."""
    c, acc = plan.chunk, g.dtype
    dv = torch.zeros(*z.shape[:2], v.shape[-1], dtype=acc, device=z.device)
    a_sum = torch.zeros(z.shape[0], v.shape[-1], z.shape[-1], dtype=acc, device=z.device)
    for j in range(len(plan.blocks) - 1, -1, -1):
        blk = plan.blocks[j]
        u = q[j].clone() if blk.elem != plan.n_elems - 1 else None
        for i in range(len(blk.flags) - 1, -1, -1):
            s = blk.row0 + i * c
            z_i, v_i = z[:, s:s + c].to(acc), v[:, s:s + c].to(acc)
            if u is not None:
                mi = eta_a * u
                if plan.clip is not None:
                    mi = _clip_adjoint(mi, v_i, z_i, plan.clip)
                dz[:, s:s + c].baddbmm_(v_i, mi)
                _bmm_into(dv[:, s:s + c], z_i, mi.transpose(1, 2))
            a_i = torch.bmm(g[:, s:s + c].transpose(1, 2), z_i)
            a_sum += a_i
            u = None if blk.flags[i] else (a_i if u is None else u.add_(a_i))
    return dv, a_sum


def _clip_adjoint(mi, v_i, z_i, tau):
    """∂L/∂ΔW from ∂L/∂(s·ΔW) = mi, with s = min(1, τ/‖ΔW‖):
    s·mi − [‖ΔW‖ > τ] · τ⟨mi, ΔW⟩/‖ΔW‖³ · ΔW."""
    dw = torch.bmm(v_i.transpose(1, 2), z_i)
    scale, norm = _clip_scale(dw, tau)
    clipped = (norm > tau).to(dw.dtype)
    inner = (mi * dw).flatten(1).sum(1)
    coef = clipped * tau * inner / norm.clamp_min(torch.finfo(dw.dtype).tiny) ** 3
    return mi * scale.view(-1, 1, 1) - coef.view(-1, 1, 1) * dw
