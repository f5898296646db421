"""Edges of ctxpar.attention found by an adversarial probe: NaN in tiny blocks, second-order
gradients, empty shards, zero head_dim, autocast, groups without the caller, meshes and
float boundaries in the sequence helpers. Each of these once gave a silently wrong result
or a crash without a message."""
import pytest
import torch
import torch.distributed as dist

import ctxpar
from ctxpar.apps.launch import RankError
from ctxpar.attn.kernels import block_backward, block_forward
from ctxpar.attn.tiles import Band
from ctxpar.sequence.spec import parse_cu_seqlens

from _cases import make_qkv

METHODS_1D = ("ring", "ulysses", "allgather")


# ------------------------------------------------------------------ NaN never turns finite

@pytest.mark.parametrize("keys", [1, 5, 15, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_nan_query_stays_nan_in_small_blocks(keys, dtype):
    q, k, v, dout = make_qkv(0, 1, 8, 2, 2, 8, dtype)
    k, v = k[:, :keys].clone(), v[:, :keys].clone()
    q[0, 3, 1, 0] = float("nan")
    out, lse = block_forward(q, k, v, band=Band(), scale=0.3)
    assert out[0, 3, 1].isnan().all() and lse[0, 1, 3].isnan()
    dq, dk, dv = block_backward(dout, q, k, v, out, lse, band=Band(), scale=0.3)
    assert dq[0, 3, 1].isnan().all()


def _nan_in_q(method, layout):
    n = dist.get_world_size()
    q, k, v, _ = make_qkv(1, 1, 4 * n, 6, 2, 8, torch.float32)  # 2-token zigzag blocks
    q[0, 5, 0, 0] = float("nan")
    args = [ctxpar.shard(t, layout=layout) for t in (q, k, v)]
    out = ctxpar.unshard(ctxpar.attention(*args, method=method, layout=layout, causal=True),
                         layout=layout)
    # Query 5 of head 0 is NaN, so its output row must be; the other rows stay finite.
    return bool(out[0, 5, 0].isnan().all()), int(out.isnan().sum())


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", METHODS_1D)
def test_a_nan_input_never_becomes_finite_under_cp(run_ranks, world, method):
    for row_is_nan, nans in run_ranks(world, _nan_in_q, method, "zigzag"):
        assert row_is_nan and nans == 8


# ------------------------------------------------------------- second-order gradients

def _double_backward(method):
    n = dist.get_world_size()
    q, k, v, _ = make_qkv(2, 1, 4 * n, 6, 2, 8, torch.float64)
    q, k, v = (ctxpar.shard(t).requires_grad_() for t in (q, k, v))
    out = ctxpar.attention(q, k, v, method=method, causal=True)
    try:
        g, = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    except NotImplementedError as e:
        return str(e)
    return f"no error; grad has a graph: {g.requires_grad}"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", METHODS_1D)
def test_double_backward_raises_the_same_clear_error(run_ranks, world, method):
    for text in run_ranks(world, _double_backward, method):
        assert "first-order gradients only" in text, text


def test_first_order_gradients_still_work_under_create_graph_false():
    q, k, v, dout = make_qkv(3, 1, 8, 2, 2, 8, torch.float64)
    q.requires_grad_()
    out = ctxpar.attention(q, k, v, causal=True)
    g, = torch.autograd.grad((out * dout).sum(), q)
    assert torch.isfinite(g).all()


# --------------------------------------------------------------- empty and degenerate

@pytest.mark.parametrize("method", ["ring", "ulysses", "allgather", "auto"])
def test_an_empty_shard_gives_an_empty_output(method):
    q = torch.randn(1, 0, 4, 8, requires_grad=True)
    k, v = torch.randn(1, 0, 2, 8), torch.randn(1, 0, 2, 8)
    out, lse = ctxpar.attention(q, k, v, method=method, causal=True, return_lse=True)
    assert out.shape == (1, 0, 4, 8) and lse.shape == (1, 4, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape


def _empty_shards(method):
    q = torch.randn(1, 0, 4, 8, requires_grad=True)
    out = ctxpar.attention(q, q.detach(), q.detach(), method=method, causal=True)
    out.sum().backward()
    return tuple(out.shape)


@pytest.mark.parametrize("method", METHODS_1D)
def test_empty_shards_on_every_rank(run_ranks, method):
    assert run_ranks(2, _empty_shards, method) == [(1, 0, 4, 8)] * 2


@pytest.mark.parametrize("q_shape, kv_shape, pattern", [
    ((1, 4, 4, 0), (1, 4, 2, 0), "head_dim must be positive"),
    ((1, 4, 0, 8), (1, 4, 1, 8), "at least one head"),
])
def test_degenerate_shapes_raise_value_errors(q_shape, kv_shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        ctxpar.attention(torch.zeros(q_shape), torch.zeros(kv_shape), torch.zeros(kv_shape))


# -------------------------------------------------------------------------- autocast

def _autocast_vs_sdpa(method):
    n = dist.get_world_size() if dist.is_initialized() else 1
    q, k, v, dout = make_qkv(4, 1, 8 * n, 4, 2, 16, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2),
            v.to(torch.bfloat16).repeat_interleave(2, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
        ql = ctxpar.shard(q).requires_grad_()
        # RoPE-style promotion: q and k in fp32, v already bf16, as in an HF model.
        out = ctxpar.attention(ql, ctxpar.shard(k), ctxpar.shard(v.to(torch.bfloat16)),
                               method=method, causal=True)
    out.float().mul(ctxpar.shard(dout)).sum().backward()
    err = (out.detach().float() - ctxpar.shard(ref.float())).abs().max() / ref.float().abs().max()
    return out.dtype, float(err), ql.grad.dtype


def test_autocast_matches_sdpa_in_one_process():
    dtype, err, gdt = _autocast_vs_sdpa("ring")
    assert dtype == torch.bfloat16 and err < 2e-2 and gdt == torch.float32


@pytest.mark.parametrize("method", METHODS_1D)
def test_autocast_matches_sdpa_under_cp(run_ranks, method):
    for dtype, err, gdt in run_ranks(2, _autocast_vs_sdpa, method):
        assert dtype == torch.bfloat16 and err < 2e-2 and gdt == torch.float32


# -------------------------------------------------------------------- groups and helpers

def _group_without_me():
    sub = dist.new_group([0, 1])
    try:
        ctxpar.shard(torch.zeros(1, 8, 2), group=sub)
    except ValueError as e:
        return str(e)
    return "ok"


def test_a_group_without_the_caller_is_a_value_error(run_ranks):
    res = run_ranks(3, _group_without_me)
    assert res[:2] == ["ok", "ok"]
    assert "does not contain this process" in res[2]


def _pad_on_a_mesh(layout):
    from ctxpar.dist.mesh import cp_mesh

    mesh = cp_mesh([2, 2])
    x = torch.arange(13.0).view(1, 13, 1)
    padded, info = ctxpar.pad_for_cp(x, group=mesh, layout=layout)
    back = ctxpar.unshard(ctxpar.shard(padded, group=mesh, layout=layout), group=mesh, layout=layout)
    return padded.shape[1], torch.equal(back[:, :13], x), int(info.pad_mask.sum())


@pytest.mark.parametrize("layout, total", [("zigzag", 16), ("contiguous", 16), ("striped", 16)])
def test_pad_for_cp_accepts_a_mesh(run_ranks, layout, total):
    for length, same, pads in run_ranks(4, _pad_on_a_mesh, layout):
        assert (length, same, pads) == (total, True, total - 13)


@pytest.mark.parametrize("cu", [[0, 8.5, 32], torch.tensor([0.0, 8.5, 32.0])])
def test_float_boundaries_are_refused(cu):
    with pytest.raises(ValueError, match="integer token boundaries"):
        parse_cu_seqlens(cu)
    with pytest.raises(ValueError, match="integer token boundaries"):
        ctxpar.shard_packed(torch.zeros(1, 32, 2), cu)


def test_integral_float_boundaries_are_accepted():
    assert parse_cu_seqlens(torch.tensor([0.0, 8.0, 32.0])) == (0, 8, 32)


def _unshard_mismatch():
    n = 6 if dist.get_rank() == 1 else 4
    ctxpar.unshard(torch.zeros(1, n, 2), layout="contiguous")


def test_unshard_with_different_shard_lengths_raises_everywhere(run_ranks):
    with pytest.raises(RankError) as info:
        run_ranks(3, _unshard_mismatch, timeout=30)
    assert sorted(info.value.failures) == [0, 1, 2]
    assert set(info.value.exc_types.values()) == {"ValueError"}
    assert "S_local differs on rank(s) [1]" in info.value.failures[0]
