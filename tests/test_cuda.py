"""CUDA checks: fused CUDA block kernels vs the float64 reference, and ring attention on a
single-rank NCCL group. Skipped where no GPU is present."""
import os
import tempfile

import pytest
import torch

from ctxpar.attn.kernels import block_backward, block_forward
from ctxpar.attn.tiles import Band

from _cases import TOL, make_qkv, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _reference(q, k, v, dout, vis):
    qd, kd, vd = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    rep = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd.repeat_interleave(rep, 2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~vis, float("-inf"))
    has = vis.any(-1)
    p = torch.softmax(s.masked_fill(~has[:, None], 0), -1) * has[:, None]
    out = torch.einsum("bhqk,bkhd->bqhd", p, vd.repeat_interleave(rep, 2))
    (out * dout.double().cpu()).sum().backward()
    return out, torch.logsumexp(s, -1), qd.grad, kd.grad, vd.grad


@pytest.mark.parametrize("backend, dtype", [("cuda_flash", torch.bfloat16), ("cuda_flash", torch.float16),
                                            ("cuda_efficient", torch.float32), ("math", torch.float64)])
@pytest.mark.parametrize("band", [Band(), Band(0, None), Band(1, None), Band(-3, 5)],
                         ids=["full", "causal", "shift1", "window"])
def test_cuda_block_kernels(backend, dtype, band):
    q, k, v, dout = [t.cuda() for t in make_qkv(0, 2, 64, 8, 2, 64, dtype)]
    ref = _reference(q, k, v, dout, band.dense(64, 64))
    out, lse = block_forward(q, k, v, band=band, scale=64 ** -0.5, backend=backend)
    grads = block_backward(dout, q, k, v, out, lse, band=band, scale=64 ** -0.5, backend=backend)
    tol = 5e-3 if dtype == torch.float16 else TOL[dtype]
    for name, x, r in zip(["out", "lse", "dq", "dk", "dv"], [out, lse, *grads], ref):
        assert rel_err(x.cpu(), r.detach()) <= tol, (name, rel_err(x.cpu(), r.detach()))


def test_ring_on_single_rank_nccl():
    import torch.distributed as dist

    import ctxpar
    from ctxpar.attn.reference import attention_reference

    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        q, k, v, dout = [t.cuda() for t in make_qkv(1, 1, 256, 8, 2, 64, torch.bfloat16)]
        ql, kl, vl = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = ctxpar.attention(ql, kl, vl, causal=True, layout="zigzag", return_lse=True)
        out.backward(dout)
        ref_in = [t.double().cpu().requires_grad_() for t in (q, k, v)]
        ro, rl = attention_reference(*ref_in, causal=True)
        (ro * dout.double().cpu()).sum().backward()
        for x, r in zip([out, lse, ql.grad, kl.grad, vl.grad], [ro, rl, *[t.grad for t in ref_in]]):
            assert rel_err(x.cpu(), r.detach()) <= 2e-2
    finally:
        dist.destroy_process_group()
