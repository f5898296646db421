"""Local attention kernels for one (query block, key/value block) pair.

``block_forward(q, k, v, band=..., scale=...) -> (out, lse)`` and ``block_backward`` are the
only compute primitives the CP methods use. Shapes (the library-wide convention):

    q, out, dout : [B, Sq, Hq, D]       k, v, dk, dv : [B, Sk, Hkv, D]       lse : [B, Hq, Sq]

``Hq`` must be a multiple of ``Hkv`` (GQA/MQA): query head h reads key/value head
``h // (Hq // Hkv)``. K/V are never copied to Hq heads (an expanded stride-0 view is used).

``lse`` is fp32 (fp64 for fp64 inputs); ``out`` is in the input dtype. A row that sees no
key has ``out = 0`` and ``lse = -inf``, in every backend, so the merge can ignore it.

Backends (``backend="auto"`` picks the first that applies):

- ``"cpu_flash"``: torch's fused CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``),
  which returns the LSE and has a backward that takes the saved output and LSE, so no
  recomputation of the forward is needed. Supports fp64/fp32/bf16/fp16 and float masks.
- ``"cuda_flash"`` / ``"cuda_efficient"``: torch's fused CUDA kernels (half types / fp32).
- ``"math"``: a plain matmul-softmax path in fp32/fp64, used for float64 on CUDA and as a
  fallback; never materialises more than one block's scores.
"""
from __future__ import annotations

import functools

import torch

from ctxpar.attn import kernels_cuda
from ctxpar.attn.tiles import Band
from ctxpar.numerics import acc_dtype

__all__ = ["block_forward", "block_backward", "BACKENDS", "pick_backend", "refuse_double_backward",
           "saved_block_state", "sub_tile_rows"]

BACKENDS = ("auto", "cpu_flash", "cuda_flash", "cuda_efficient", "math")
_NEG_INF = float("-inf")


# torch's fused CPU flash kernel loses a NaN of q (and, for one key, of k) when the block has
# fewer keys than a SIMD vector holds (16 fp32/bf16 lanes, 8 fp64 with AVX-512; fewer on
# narrower ISAs): out and lse come back finite. Such blocks are tiny, so they take the math
# path, which propagates NaN like SDPA over the whole sequence does.
_CPU_FLASH_MIN_KEYS = 16


def pick_backend(q: torch.Tensor, backend: str = "auto", keys: int | None = None) -> str:
    """The kernel for a block of ``q`` against ``keys`` keys (``backend`` "auto": the fused
    kernel of the device and dtype)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "cpu_flash" and keys is not None and keys < _CPU_FLASH_MIN_KEYS:
        return "math"
    if backend != "auto":
        return backend
    if q.device.type == "cpu":
        return "cpu_flash" if keys is None or keys >= _CPU_FLASH_MIN_KEYS else "math"
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16):
            return "cuda_flash"
        if q.dtype == torch.float32:
            return "cuda_efficient"
    return "math"


# Query rows per sub-tile of a sliding window (``ctxpar.attn.tiles.split_band``): edge
# sub-tiles evaluate about ``rows * sub`` pairs beyond the window, and every sub-tile is
# one more kernel call and merge. On CPU (one thread, D=32) 256 was fastest at windows
# 256 and 4096 (``benchmarks/bench_windows.py --subs``); on CUDA launches cost more and
# the fused kernels like larger blocks: 512 is a guess not yet measured.
SUB_TILE_ROWS = {"cpu": 256}


def sub_tile_rows(device: torch.device) -> int:
    """The sub-tile size (query rows) that windowed tiles are cut into on ``device``."""
    return SUB_TILE_ROWS.get(device.type, 512)


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    # [B, S, H, D] -> [B, H, S, D] as a view: the fused kernels read through strides.
    return x.transpose(1, 2)


def _expand_heads(kv: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, H, S, D] with Hkv heads -> a stride-0 view with Hq heads (no copy)."""
    b, hkv, s, d = kv.shape
    if hkv == hq:
        return kv
    return kv.unsqueeze(2).expand(b, hkv, hq // hkv, s, d).flatten(1, 2)


def _fold_heads(g: torch.Tensor, hkv: int) -> torch.Tensor:
    """Sum a gradient over the query heads sharing one K/V head: [B, Hq, S, D] -> [B, Hkv, S, D]."""
    b, hq, s, d = g.shape
    if hq == hkv:
        return g
    return g.view(b, hkv, hq // hkv, s, d).sum(2)


def _additive(vis: torch.Tensor, dtype) -> torch.Tensor:
    """The fused kernels take masks as additive biases of the input dtype."""
    return torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill_(~vis, _NEG_INF)


def _band_every_row(band: Band, lq: int, lk: int) -> bool:
    """Whether every row of an ``[lq, lk]`` tile sees a key under ``band``, from the band's
    bounds (host ints: no device read). Row i sees keys ``max(0, i - hi) .. min(lk - 1,
    i - lo)``: non-empty for every i in ``[0, lq)`` iff ``lo <= 0`` (row 0),
    ``lq - 1 - hi <= lk - 1`` (the last row) and ``lo <= hi``."""
    if lq == 0:
        return True
    lo = -(lk - 1) if band.lo is None else band.lo
    hi = lq - 1 if band.hi is None else band.hi
    return lk > 0 and lo <= 0 and lo <= hi and lq - 1 - hi <= lk - 1


def _dense_masks(vis: torch.Tensor, dtype, every_row: bool = False):
    """``(vis, additive bias, every_row)``; ``every_row`` False (the default for a mask
    read from the caller: telling would need a device read) makes the fused path zero the
    rows without a key, which is correct either way."""
    return vis, _additive(vis, dtype), every_row  # [Sq, Sk] or per row [B, Sq, Sk]


# Sub-tiles of a window repeat a handful of (band, shape) pairs thousands of times per call:
# their masks are built once. Only sub-tile-sized masks are kept (up to 512 x 1024, 2.5 MB
# in fp32 with the boolean one), so the cache stays small; the tensors are only ever read.
_CACHED_MASK_ELEMENTS = 1 << 19
_band_masks = functools.lru_cache(maxsize=32)(
    lambda band, lq, lk, device, dtype: _dense_masks(band.dense(lq, lk, device), dtype,
                                                     _band_every_row(band, lq, lk)))


def _masks(band: Band, mask: torch.Tensor | None, lq: int, lk: int, q: torch.Tensor):
    """``(visibility [lq, lk] bool, additive bias in q's dtype, every row sees a key)`` of a
    band and an optional extra boolean mask; ``(None, None, True)`` when all is visible."""
    if mask is None and band.is_full:
        return None, None, True
    if mask is None and lq * lk <= _CACHED_MASK_ELEMENTS:
        return _band_masks(band, lq, lk, q.device, q.dtype)
    if band.is_full:
        return _dense_masks(mask, q.dtype)
    vis = band.dense(lq, lk, q.device)
    if mask is None:
        return _dense_masks(vis, q.dtype, _band_every_row(band, lq, lk))
    return _dense_masks(mask & vis, q.dtype)


def _causal_shift(band: Band) -> int | None:
    """For a band ``lo <= i - j`` with no upper bound and ``lo >= 0``, the row shift that
    turns it into a plain top-left causal mask; None when the band is not of that kind."""
    if band.hi is None and band.lo is not None and band.lo >= 0:
        return band.lo
    return None


def refuse_double_backward() -> None:
    """Called first in every attention autograd Function's backward, before any message.
    Inside a backward the engine enables grad mode only for ``create_graph=True``; the
    kernels' gradients are not differentiable, so refuse (on every rank alike: all reach
    this point) rather than hand back a gradient that silently has no graph."""
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "ctxpar.attention supports first-order gradients only: its backward is not "
            "differentiable (torch.autograd.grad(..., create_graph=True) or a gradient "
            "penalty through attention is not supported)")


def saved_block_state(ctx, dout: torch.Tensor):
    """The start of a backward that saved ``(q, k, v, out, lse)``: refuse double backward,
    then return ``(dout in q's dtype, q, k, v, out, lse)``."""
    refuse_double_backward()
    q, k, v, out, lse = ctx.saved_tensors
    return dout.to(q.dtype), q, k, v, out, lse


# --------------------------------------------------------------------------- forward


def block_forward(q, k, v, *, band: Band, scale: float, backend: str = "auto",
                  mask: torch.Tensor | None = None):
    """Attention of ``q`` against ``k``/``v`` under ``band`` (and the boolean ``[Sq, Sk]``
    ``mask`` when given, e.g. same-document, or a per-row ``[B, Sq, Sk]`` one, e.g. padded
    keys; forward only); returns ``(out, lse)``."""
    backend = pick_backend(q, backend, keys=k.shape[1])
    b, lq, hq, d = q.shape
    lk = k.shape[1]
    if mask is not None:
        return _fused_or_math_forward(q, k, v, _masks(band, mask, lq, lk, q), False, scale, backend)
    shift = _causal_shift(band)
    if shift is not None and shift > 0:
        # Rows i < shift see nothing; row i >= shift sees keys j <= i - shift, i.e. plain
        # causal on q[shift:] vs k[:lq - shift]. Keeping that block square matters: fused
        # kernels disagree on how a causal mask aligns when Sq != Sk.
        out = q.new_zeros(b, lq, hq, v.shape[-1])
        lse = torch.full((b, hq, lq), _NEG_INF, dtype=acc_dtype(q.dtype), device=q.device)
        nk = min(lk, lq - shift)
        if shift < lq:
            o, l = block_forward(q[:, shift:], k[:, :nk], v[:, :nk], band=Band(0, None),
                                 scale=scale, backend=backend)
            out[:, shift:] = o
            lse[:, :, shift:] = l
        return out, lse
    # The fused kernels take causality as a flag (top-left aligned, so only for square
    # blocks); every other band becomes a dense mask.
    is_causal = band.lo == 0 and band.hi is None and lq == lk
    flag = is_causal and backend != "math"
    masks = (None, None, True) if flag else _masks(band, None, lq, lk, q)
    return _fused_or_math_forward(q, k, v, masks, flag, scale, backend)


def _fused_or_math_forward(q, k, v, masks, is_causal, scale, backend):
    hq = q.shape[2]
    vis, mask, every_row = masks
    if backend == "math":
        return _math_forward(q, k, v, vis, scale)
    if backend == "cuda_flash" and vis is None:
        return kernels_cuda.flash_forward(q, k, v, is_causal, scale)
    qt, kt, vt = _bhsd(q), _expand_heads(_bhsd(k), hq), _expand_heads(_bhsd(v), hq)
    if mask is not None and mask.dim() == 3:  # per-row mask [B, Sq, Sk] -> [B, 1, Sq, Sk]
        mask = mask[:, None]
    if backend == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, is_causal, attn_mask=mask, scale=scale)
    elif backend in ("cuda_flash", "cuda_efficient"):
        out, lse = kernels_cuda.efficient_forward(qt, kt, vt, is_causal, mask, scale)
    else:
        raise ValueError(f"backend {backend!r} cannot run on {q.device}")
    lse = lse.to(acc_dtype(q.dtype))
    if not every_row:
        # Fused kernels report lse = 0 for rows whose keys are all masked; make them -inf
        # so the merge gives them zero weight. [Sq] for a shared mask, [B, 1, Sq] for a
        # per-row one: broadcasts against lse [B, H, Sq].
        has_key = vis.any(-1) if vis.dim() == 2 else vis.any(-1)[:, None]
        lse = lse.masked_fill(~has_key, _NEG_INF)
        out = out.masked_fill(~has_key[..., None], 0.0)
    return out.transpose(1, 2), lse


def _scores(q, k, scale, cdt):
    # q: [B, Sq, Hq, D], k: [B, Sk, Hkv, D] -> [B, Hkv, G, Sq, Sk] without expanding K.
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.to(cdt).view(b, lq, hkv, hq // hkv, d)
    return torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(cdt)) * scale


def _math_forward(q, k, v, vis, scale):
    cdt = acc_dtype(q.dtype)
    b, lq, hq, d = q.shape
    s = _scores(q, k, scale, cdt)
    if vis is not None:  # [Sq, Sk], or per row [B, Sq, Sk] against s [B, Hkv, G, Sq, Sk]
        s = s.masked_fill(~(vis if vis.dim() == 2 else vis[:, None, None]), _NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, Sq]; -inf for rows with no key
    p = torch.exp(s - lse.masked_fill(lse == _NEG_INF, 0.0)[..., None])
    out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(cdt)).reshape(b, lq, hq, v.shape[-1])
    return out.to(q.dtype), lse.reshape(b, hq, lq)


# -------------------------------------------------------------------------- backward


def block_backward(dout, q, k, v, out, lse, *, band: Band, scale: float, backend: str = "auto",
                   mask: torch.Tensor | None = None, upcast: bool = True):
    """Gradients of one block given the *global* ``out`` and ``lse`` of these query rows.

    With the global normaliser, ``P = exp(S - lse)`` is this block's slice of the full
    softmax and ``D = rowsum(dout * out)`` is the full-row term, so block gradients add up
    to the exact full gradient with no recomputation of the forward. Returns
    ``(dq, dk, dv)`` in fp32 (fp64 for fp64 inputs), ``dk``/``dv`` with Hkv heads. With
    ``upcast=False`` a fused kernel's gradients may come back in the input dtype, for a
    caller that adds them straight into fp32 accumulators (saves a copy per block)."""
    backend = pick_backend(q, backend, keys=k.shape[1])
    cdt = acc_dtype(q.dtype)
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    shift = None if mask is not None else _causal_shift(band)
    if shift is not None and shift > 0:
        dq = torch.zeros(b, lq, hq, d, dtype=cdt, device=q.device)
        dk = torch.zeros(b, lk, hkv, d, dtype=cdt, device=q.device)
        dv = torch.zeros(b, lk, hkv, v.shape[-1], dtype=cdt, device=q.device)
        nk = min(lk, lq - shift)
        if shift < lq:
            g = block_backward(dout[:, shift:], q[:, shift:], k[:, :nk], v[:, :nk], out[:, shift:],
                               lse[:, :, shift:], band=Band(0, None), scale=scale, backend=backend)
            dq[:, shift:] = g[0]
            dk[:, :nk] = g[1]
            dv[:, :nk] = g[2]
        return dq, dk, dv
    # A row with no key anywhere has lse = -inf; +inf makes every P = exp(S - lse) exactly
    # 0 instead of exp(-inf + inf) = NaN.
    lse = lse.masked_fill(lse == _NEG_INF, float("inf"))
    is_causal = mask is None and band.lo == 0 and band.hi is None and lq == lk
    if backend == "math":
        return _math_backward(dout, q, k, v, out, lse, _masks(band, mask, lq, lk, q)[0], scale)
    vis, mask, _ = (None, None, True) if is_causal else _masks(band, mask, lq, lk, q)
    if backend == "cuda_flash" and vis is None:
        dq, dk, dv = kernels_cuda.flash_backward(dout, q, k, v, out, lse, is_causal, scale)
        return (dq.to(cdt), dk.to(cdt), dv.to(cdt)) if upcast else (dq, dk, dv)
    qt, kt, vt = _bhsd(q), _expand_heads(_bhsd(k), hq), _expand_heads(_bhsd(v), hq)
    if backend == "cpu_flash":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout), qt, kt, vt, _bhsd(out), lse, 0.0, is_causal, attn_mask=mask, scale=scale)
    else:
        dq, dk, dv = kernels_cuda.efficient_backward(_bhsd(dout), qt, kt, vt, _bhsd(out), lse, is_causal,
                                                     mask, scale)
    return (dq.transpose(1, 2).to(cdt), _fold_heads(dk.to(cdt), hkv).transpose(1, 2),
            _fold_heads(dv.to(cdt), hkv).transpose(1, 2))


def _math_backward(dout, q, k, v, out, lse, vis, scale):
    cdt = acc_dtype(q.dtype)
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    s = _scores(q, k, scale, cdt)
    if vis is not None:
        s = s.masked_fill(~vis, _NEG_INF)
    p = torch.exp(s - lse.to(cdt).view(b, hkv, g, lq)[..., None])
    do = dout.to(cdt).view(b, lq, hkv, g, -1)
    dv = torch.einsum("bhgqk,bqhgd->bkhd", p, do)
    dp = torch.einsum("bqhgd,bkhd->bhgqk", do, v.to(cdt))
    delta = (do * out.to(cdt).view(b, lq, hkv, g, -1)).sum(-1).permute(0, 2, 3, 1)  # [B,Hkv,G,Sq]
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k.to(cdt)).reshape(b, lq, hq, d)
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, q.to(cdt).view(b, lq, hkv, g, d))
    return dq, dk, dv
