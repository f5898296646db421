"""Block kernels and the LSE merge, every backend that runs here, vs the float64 reference."""
import pytest
import torch

from ctxpar.attn.kernels import block_backward, block_forward
from ctxpar.attn.merge import merge_into
from ctxpar.attn.tiles import Band
from ctxpar.attn.reference import attention_reference

from _cases import TOL, make_qkv, rel_err

BACKENDS = ["cpu_flash", "math"]


def _reference_block(q, k, v, dout, vis):
    """Reference for one block with an explicit visibility mask, via the naive path."""
    qd, kd, vd = [t.double().requires_grad_() for t in (q, k, v)]
    rep = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd.repeat_interleave(rep, 2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    has = vis.any(-1)
    p = torch.softmax(s.masked_fill(~has[:, None], 0), -1) * has[:, None]
    out = torch.einsum("bhqk,bkhd->bqhd", p, vd.repeat_interleave(rep, 2))
    (out * dout.double()).sum().backward()
    return out, lse, qd.grad, kd.grad, vd.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("band", [Band(), Band(0, None), Band(1, None), Band(3, None), Band(-2, 4),
                                  Band(None, -1), Band(5, 2)],
                         ids=["full", "causal", "shift1", "shift3", "window", "upper", "empty"])
def test_block_kernel_matches_reference(backend, dtype, band):
    q, k, v, dout = make_qkv(1, 2, 10, 4, 2, 24, dtype)
    vis = band.dense(10, 10)
    ref = _reference_block(q, k, v, dout, vis)
    out, lse = block_forward(q, k, v, band=band, scale=24 ** -0.5, backend=backend)
    dq, dk, dv = block_backward(dout, q, k, v, out, lse, band=band, scale=24 ** -0.5, backend=backend)
    tol = TOL[dtype]
    for name, x, r in zip(["out", "lse", "dq", "dk", "dv"], [out, lse, dq, dk, dv], ref):
        assert torch.isfinite(x).all() or name == "lse", name
        assert rel_err(x, r.detach()) <= tol, (name, rel_err(x, r.detach()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_mask_with_fully_masked_rows(backend):
    q, k, v, dout = make_qkv(2, 1, 6, 2, 2, 8, torch.float32)
    vis = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    vis[2] = False  # a row with nothing to attend
    ref = _reference_block(q, k, v, dout, vis)
    out, lse = block_forward(q, k, v, band=Band(), scale=8 ** -0.5, backend=backend, mask=vis)
    grads = block_backward(dout, q, k, v, out, lse, band=Band(), scale=8 ** -0.5, backend=backend,
                           mask=vis)
    assert lse[:, :, 2].eq(float("-inf")).all() and out[:, 2].eq(0).all()
    for x, r in zip([out, lse, *grads], ref):
        assert rel_err(x, r.detach()) <= 1e-5


def test_merge_of_two_halves_equals_whole():
    q, k, v, _ = make_qkv(3, 2, 12, 4, 4, 16, torch.float64)
    whole, whole_lse = attention_reference(q, k, v)
    out = torch.zeros_like(q)
    lse = torch.full((2, 4, 12), float("-inf"), dtype=torch.float64)
    for sl in (slice(0, 5), slice(5, 12)):
        o, l = attention_reference(q, k[:, sl], v[:, sl])
        merge_into(out, lse, o, l)
    assert rel_err(out, whole) < 1e-12 and rel_err(lse, whole_lse) < 1e-12


def test_merge_keeps_empty_rows_finite():
    out = torch.zeros(1, 3, 1, 2)
    lse = torch.full((1, 1, 3), float("-inf"))
    ob = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]], [[3.0, 4.0]]]])
    lb = torch.tensor([[[0.5, float("-inf"), 1.0]]])
    merge_into(out, lse, ob, lb)
    assert torch.equal(out, ob) and lse[0, 0, 1] == float("-inf") and not out.isnan().any()
