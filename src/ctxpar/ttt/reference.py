"""Float64 reference for In-Place TTT: a token-by-token apply-then-update loop.

Written from the definitions only, independently of :mod:`ctxpar.ttt.ops` (no chunked
matmuls, no prefix accumulators, no scans): each token is first *applied* with the current
fast weight, then its outer product is added to the pending delta of its chunk; when a chunk
ends its (clipped) pending delta is folded into the fast weight. Slow, for tests only.
Differentiable with ordinary autograd, so its gradients serve as the reference too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ttt_reference", "reference_resets", "documents_reference"]


def reference_resets(cu_seqlens, seq_len: int, chunk: int) -> list[bool]:
    """Chunk i resets iff some document start s (an entry of cu_seqlens except the last)
    satisfies i*chunk <= s < (i+1)*chunk."""
    starts = [int(s) for s in list(cu_seqlens)[:-1]]
    n = -(-seq_len // chunk)
    return [any(i * chunk <= s < (i + 1) * chunk for s in starts) for i in range(n)]


def ttt_reference(x, *, w_gate, w_up, w_down, conv_weight, w_proj, eta, chunk_size,
                  target=None, act=F.silu, clip_tau=None, cu_seqlens=None, bias=None):
    """x ``[B, S, D]`` (the MLP input, any S: a trailing partial chunk is applied and never
    folded in); ``target`` ``[B, S, D]`` the target source (default x); w_gate/w_up
    ``[F, D]``, w_down ``[D, F]``, conv_weight ``[D, 1, k]``, w_proj ``[D, D]`` used
    untransposed, v = conv · w_proj (None: v = conv), eta a scalar. Returns ``[B, S, D]``
    in float64."""
    f64 = torch.float64
    x = x.to(f64)
    t_src = x if target is None else target.to(f64)
    wg, wu, w0 = w_gate.to(f64), w_up.to(f64), w_down.to(f64)
    kern = conv_weight.to(f64)[:, 0, :]
    wp = None if w_proj is None else w_proj.to(f64)
    eta = torch.as_tensor(eta).to(f64)
    b0 = None if bias is None else bias.to(f64)
    bsz, seq, _ = x.shape
    c, half = chunk_size, conv_weight.shape[-1] // 2
    resets = reference_resets(cu_seqlens, seq, c) if cu_seqlens is not None else [False] * -(-seq // c)
    outs = []
    for b in range(bsz):
        fast = w0
        pending = torch.zeros_like(w0)
        rows = []
        for t in range(seq):
            i = t // c
            if t % c == 0:
                if t > 0:  # the previous chunk just ended: update
                    delta = pending
                    if clip_tau is not None:
                        delta = delta * torch.clamp(clip_tau / torch.linalg.norm(delta), max=1.0)
                    fast = fast + eta * delta
                    pending = torch.zeros_like(w0)
                if resets[i]:
                    fast = w0
            h = x[b, t]
            z = act(wg @ h) * (wu @ h)
            o = fast @ z  # apply
            rows.append(o if b0 is None else o + b0)
            # Target: the conv sees tokens t-half .. t+half of the same chunk only (zeros
            # past the end of the sequence).
            conv = torch.zeros_like(h)
            for k in range(kern.shape[1]):
                src = t + k - half
                if i * c <= src < min((i + 1) * c, seq):
                    conv = conv + kern[:, k] * t_src[b, src]
            v = conv if wp is None else conv @ wp
            pending = pending + torch.outer(v, z)  # update, used from the next chunk on
        outs.append(torch.stack(rows))
    return torch.stack(outs)


def documents_reference(layer, x, grad_out, docs, clip_tau=None):
    """Each packed document run alone through :func:`ttt_reference` (zero-padded at its end
    to whole chunks; the padding reaches no real token) with ``layer``'s parameters in
    float64; what a packed CP run whose documents start on chunk boundaries must give.

    ``x``, ``grad_out``: ``[B, S, D]``; ``docs``: boundaries ``[0, ..., S]``. Returns
    ``(out, dx, {name: grad})`` in float64, the loss being ``<out, grad_out>``."""
    c = layer.config.chunk_size
    p = {k: v.detach().double().clone().requires_grad_(True) for k, v in layer.named_parameters()}
    out_all, dx_all = torch.zeros_like(x, dtype=torch.float64), torch.zeros_like(x, dtype=torch.float64)
    for a, e in zip(docs, docs[1:]):
        xd = F.pad(x[:, a:e].double(), (0, 0, 0, -(e - a) % c)).requires_grad_(True)
        out = ttt_reference(xd, w_gate=p["gate_proj.weight"], w_up=p["up_proj.weight"],
                            w_down=p["down_proj.weight"], conv_weight=p["ttt_conv"],
                            w_proj=p.get("ttt_proj.weight"), eta=p.get("ttt_eta", layer.ttt_eta), chunk_size=c,
                            clip_tau=clip_tau)[:, : e - a]
        (out * grad_out[:, a:e].double()).sum().backward()
        out_all[:, a:e], dx_all[:, a:e] = out.detach(), xd.grad[:, : e - a]
    return out_all, dx_all, {k: v.grad for k, v in p.items()}


def all_chunk_weights_forward(layer, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The naive form of an :class:`~ctxpar.ttt.InPlaceTTTMLP` forward (batch 1, no conv
    halo, no resets): it materialises every chunk's weight W_(i) ``[D, F]``, which autograd
    then keeps, O(K·|W|) for K chunks. The memory baseline the fast Function avoids."""
    z = layer.activations(x)
    v = layer.targets(x)
    w, outs = layer.down_proj.weight, []
    for s in range(0, x.shape[1], chunk):
        outs.append(z[:, s:s + chunk] @ w.transpose(0, 1))
        w = w + layer.ttt_eta * (v[0, s:s + chunk].T @ z[0, s:s + chunk])
    return torch.cat(outs, 1)


class GatedMLP(torch.nn.Module):
    """The plain gated MLP that :class:`~ctxpar.ttt.InPlaceTTTMLP` wraps (Llama/Qwen shape):
    ``down_proj(act(gate_proj(x)) * up_proj(x))``, x ``[B, S, d]``."""

    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, ff, bias=False)
        self.up_proj = torch.nn.Linear(d, ff, bias=False)
        self.down_proj = torch.nn.Linear(ff, d, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

