"""In-Place TTT layer: CP fast path (worlds 1-4, contiguous/zigzag, fp64/fp32/bf16) against
the float64 token-by-token reference for the output and every gradient; causality, memory,
streaming, communication volume, exactness at init and input validation."""
import functools

import pytest
import torch
from torch import nn

import ctxpar
from ctxpar.apps.launch import RankError
from ctxpar.dist.mesh import cp_mesh
from ctxpar.ttt import InPlaceTTTMLP, TTTConfig
from ctxpar.observe.memory import saved_tensor_bytes
from ctxpar.ttt.reference import GatedMLP, all_chunk_weights_forward, documents_reference, ttt_reference

from _ttt_cases import B, C, D, FF, close, make_data, make_layer

WORLDS = [1, 2, 3, 4]
S = 96
TOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}
CU = (0, 10, 16, 45, 46, 80, 96)  # a start mid-chunk, chunk-aligned ones, two in one chunk
PARAMS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight", "ttt_conv", "ttt_proj.weight", "ttt_eta")


def _data(dtype, seq=S):
    return make_data(dtype, seq)


@functools.lru_cache(maxsize=None)
def _reference(dtype_name, clip=None, cu=None, seq=S):
    dtype = getattr(torch, dtype_name)
    layer = make_layer(dtype, clip_tau=clip)
    x, gout = _data(dtype, seq)
    p = {k: v.detach().double().requires_grad_(True) for k, v in layer.named_parameters()}
    xr = x.double().requires_grad_(True)
    out = ttt_reference(xr, w_gate=p["gate_proj.weight"], w_up=p["up_proj.weight"],
                        w_down=p["down_proj.weight"], conv_weight=p["ttt_conv"],
                        w_proj=p["ttt_proj.weight"], eta=p["ttt_eta"], chunk_size=C,
                        clip_tau=clip, cu_seqlens=cu)
    (out * gout).sum().backward()
    return out.detach(), xr.grad, {k: v.grad for k, v in p.items()}


def _cp_rank(dtype_name, layout, clip=None, cu=None, algorithm="allgather", seq=S, overlap=True,
             mesh_sizes=None):
    dtype = getattr(torch, dtype_name)
    group = None if mesh_sizes is None else cp_mesh(hierarchical_context_parallel_sizes=mesh_sizes)
    layer = make_layer(dtype, group=group, layout=layout, clip_tau=clip, scan_algorithm=algorithm,
                   overlap=overlap)
    x, gout = _data(dtype, seq)
    x_local = ctxpar.shard(x, group=group, layout=layout).detach().requires_grad_(True)
    with ctxpar.comm_counters() as counters:
        out = layer(x_local, cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32))
        (out.double() * ctxpar.shard(gout, group=group, layout=layout)).sum().backward()
    return dict(pos=ctxpar.position_ids(seq, group=group, layout=layout), out=out.detach(), dx=x_local.grad,
                grads={k: v.grad for k, v in layer.named_parameters()},
                bytes=counters.bytes_recv, dtype=out.dtype)


def _assemble(results, key):
    first = results[0][key]
    full = torch.zeros(first.shape[0], S, *first.shape[2:], dtype=torch.float64)
    for r in results:
        full[:, r["pos"]] = r[key].double()
    return full


def _check(results, dtype_name, clip=None, cu=None):
    ref_out, ref_dx, ref_grads = _reference(dtype_name, clip, cu)
    tol = TOL[dtype_name]
    assert all(r["dtype"] == getattr(torch, dtype_name) for r in results)
    close(_assemble(results, "out"), ref_out, tol, "output")
    close(_assemble(results, "dx"), ref_dx, tol, "input grad")
    for name in PARAMS:  # parameter gradients are per-rank shares: their sum is the total
        close(sum(r["grads"][name].double() for r in results), ref_grads[name], tol, name)


# ------------------------------------------------------------ packed documents (shard_packed)
# With cu_seqlens the tokens are sharded by ctxpar.shard_packed, as for attention: zigzag
# pads every document to a multiple of 2N and balances it on its own. When each padded
# document is whole chunks, every document starts a fresh fast weight on a chunk boundary,
# so each document's outputs and gradients equal those of the document run alone.
def _packed_docs(layout, world):
    unit = 2 * world * C if layout == "zigzag" else C
    lengths = ((unit - 1, 2 * unit - 1, unit) if layout == "zigzag"
               else (unit, (4 * world - 3) * unit, 2 * unit))  # whole chunks on every rank
    return tuple(int(x) for x in torch.tensor((0,) + lengths).cumsum(0))


@functools.lru_cache(maxsize=None)
def _packed_reference(docs, clip=None):
    """Each document alone through the float64 token loop (zero-padded to whole chunks)."""
    x, gout = _data(torch.float64, docs[-1])
    return documents_reference(make_layer(torch.float64, clip_tau=clip), x, gout, docs, clip)


def _packed_rank(docs, layout, clip=None, algorithm="allgather", overlap=True, mesh_sizes=None):
    group = None if mesh_sizes is None else cp_mesh(hierarchical_context_parallel_sizes=mesh_sizes)
    layer = make_layer(torch.float64, group=group, layout=layout, clip_tau=clip, scan_algorithm=algorithm,
                   overlap=overlap)
    x, gout = _data(torch.float64, docs[-1])
    cu = torch.tensor(docs, dtype=torch.int32)
    x_local = ctxpar.shard_packed(x, cu, group=group, layout=layout).tokens.requires_grad_(True)
    out = layer(x_local, cu_seqlens=cu)
    (out * ctxpar.shard_packed(gout, cu, group=group, layout=layout).tokens).sum().backward()
    return dict(out=ctxpar.unshard_packed(out.detach(), cu, group=group, layout=layout),
                dx=ctxpar.unshard_packed(x_local.grad, cu, group=group, layout=layout),
                grads={k: v.grad for k, v in layer.named_parameters()})


def _check_packed(results, docs, clip=None):
    ref_out, ref_dx, ref_grads = _packed_reference(docs, clip)
    for r in results:
        close(r["out"], ref_out, TOL["float64"], "output")
        close(r["dx"], ref_dx, TOL["float64"], "input grad")
    for name in PARAMS:
        close(sum(r["grads"][name] for r in results), ref_grads[name], TOL["float64"], name)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", WORLDS)
def test_packed_documents_equal_each_document_alone(run_ranks, world, layout):
    docs = _packed_docs(layout, world)
    _check_packed(run_ranks(world, _packed_rank, docs, layout), docs)
    _check_packed(run_ranks(world, _packed_rank, docs, layout, 0.5, "allgather", False), docs, 0.5)


@pytest.mark.parametrize("dtype_name", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", WORLDS)
def test_cp_layer_matches_reference(run_ranks, world, layout, dtype_name):
    _check(run_ranks(world, _cp_rank, dtype_name, layout), dtype_name)


@pytest.mark.parametrize("algorithm", ["hillis_steele", "ring"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_resets_clip_and_scan_algorithms(run_ranks, world, layout, algorithm):
    _check(run_ranks(world, _cp_rank, "float64", layout, 0.5, None, algorithm), "float64", 0.5)
    if layout == "contiguous":  # documents in place: mid-chunk starts reset their chunk
        for clip in (None, 0.5):
            _check(run_ranks(world, _cp_rank, "float64", layout, clip, CU, algorithm), "float64", clip, CU)
    docs = _packed_docs(layout, world)
    _check_packed(run_ranks(world, _packed_rank, docs, layout, 0.5, algorithm), docs, 0.5)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_without_overlap(run_ranks, world, layout):
    _check(run_ranks(world, _cp_rank, "float32", layout, None, None, "allgather", S, False), "float32")
    docs = _packed_docs(layout, world)
    _check_packed(run_ranks(world, _packed_rank, docs, layout, 0.5, "ring", False), docs, 0.5)


def test_resets_and_clip_allgather_and_fp32(run_ranks):
    _check(run_ranks(3, _cp_rank, "float64", "contiguous", 0.5, CU), "float64", 0.5, CU)
    _check(run_ranks(2, _cp_rank, "float32", "contiguous", 0.5, CU), "float32", 0.5, CU)
    _check(run_ranks(1, _cp_rank, "float64", "contiguous", None, CU), "float64", None, CU)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("sizes", [[2, 2], [3, 1], [1, 2]], ids=str)
def test_hierarchical_mesh_matches_reference(run_ranks, sizes, layout):
    """Hybrid CP: the shard of ring rank r is split over its Ulysses group; with an odd a2a
    and zigzag one rank's piece spans both zigzag blocks (two runs of chunks)."""
    world = sizes[0] * sizes[1]
    _check(run_ranks(world, _cp_rank, "float64", layout, None, None, "allgather", S, True, sizes), "float64")
    docs = _packed_docs(layout, world)
    _check_packed(run_ranks(world, _packed_rank, docs, layout, 0.5, "allgather", False, sizes), docs, 0.5)
    _check(run_ranks(world, _cp_rank, "bfloat16", layout, None, None, "allgather", S, True, sizes), "bfloat16")


def test_mesh_with_pieces_spanning_both_zigzag_blocks(run_ranks):
    """[a2a, p2p] = [3, 2]: the middle Ulysses rank of each ring rank holds two runs (the end
    of zigzag block r and the start of block 2*p2p-1-r), the one mesh shape whose pieces are
    two scan elements; 6 ranks."""
    sizes = [3, 2]
    _check(run_ranks(6, _cp_rank, "float64", "zigzag", 0.5, None, "allgather", S, True, sizes), "float64", 0.5)
    docs = _packed_docs("zigzag", 6)
    _check_packed(run_ranks(6, _packed_rank, docs, "zigzag", None, "allgather", False, sizes), docs)


def test_bytes_per_rank_do_not_depend_on_sequence_length(run_ranks):
    world = 2
    per_s = {}
    for seq in (32, 64):
        per_s[seq] = [r["bytes"] for r in run_ranks(world, _cp_rank, "float32", "contiguous", None, None,
                                                     "allgather", seq)]
    # One all-gather of the fp32 block summary [B, D, F] forward, one backward, and the
    # argument check's all-gather of 11 int64 fields.
    expected = 2 * (world - 1) * B * D * FF * 4 + (world - 1) * 11 * 8
    assert per_s[32] == per_s[64] == [expected] * world


def _causality_rank(layout, t):
    layer = make_layer(torch.float32, layout=layout)
    x, _ = _data(torch.float32)
    x2 = x.clone()
    x2[:, t + 1] += 1.0
    outs = []
    for inp in (x, x2):
        outs.append(ctxpar.unshard(layer(ctxpar.shard(inp, layout=layout)), layout=layout).detach())
    return outs


@pytest.mark.parametrize("world,layout", [(1, "contiguous"), (1, "zigzag"), (2, "contiguous"), (3, "zigzag")])
def test_causality_probe(run_ranks, world, layout):
    for t in (5, 7, 8, 40, 47, 94):  # inside a chunk, at chunk ends, at shard/block ends
        a, b = run_ranks(world, _causality_rank, layout, t)[0]
        assert torch.equal(a[:, : t + 1], b[:, : t + 1]), t
        assert not torch.equal(a[:, t + 1:], b[:, t + 1:])  # the perturbation is visible later


def test_equals_wrapped_mlp_at_init():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        torch.manual_seed(0)
        mlp = GatedMLP(D, FF).to(dtype)
        layer = InPlaceTTTMLP(mlp, chunk_size=C)
        x = torch.randn(B, 32, D).to(dtype)
        assert torch.equal(layer(x), mlp(x)), dtype
        assert layer.gate_proj is mlp.gate_proj and layer.down_proj.weight is mlp.down_proj.weight
        # The target projection is a small random diagonal; the conv starts at zero.
        assert torch.count_nonzero(layer.ttt_target - torch.diag(torch.diagonal(layer.ttt_target))) == 0
        assert torch.count_nonzero(layer.ttt_conv) == 0






def test_saved_tensors_do_not_grow_with_chunks():
    seq = 64
    x = torch.randn(1, seq, D, dtype=torch.float32)
    ours, naive = {}, {}
    for chunk in (4, 8, 16, 32):
        layer = make_layer(torch.float32, chunk_size=chunk)
        ours[chunk] = saved_tensor_bytes(lambda: layer(x))
        naive[chunk] = saved_tensor_bytes(lambda: all_chunk_weights_forward(layer, x, chunk))
    assert len(set(ours.values())) == 1, ours  # 2 to 16 chunks: identical saved bytes
    assert naive[4] - naive[32] >= (16 - 2) * D * FF * 4 // 2, naive  # the probe sees growth
    # Clipping saves nothing per chunk either (the factors are recomputed with ΔW).
    clipped = {ck: saved_tensor_bytes(lambda: make_layer(torch.float32, chunk_size=ck, clip_tau=0.5)(x)) for ck in (4, 32)}
    assert clipped[4] == clipped[32] == ours[4]


@pytest.mark.parametrize("clip", [None, 0.5])
def test_streaming_matches_full_forward(clip):
    layer = make_layer(torch.float64, chunk_size=8, clip_tau=clip)
    x, _ = _data(torch.float64, seq=40)
    with torch.no_grad():
        full = layer(x)
        out, state = layer.step(x[:, :11])  # prefill: one full chunk and 3 tokens
        outs = [out]
        for t in range(11, 40):
            out, state = layer.step(x[:, t:t + 1], state)
            outs.append(out)
    assert state.position == 40 and state.t_buf.shape[1] == 0
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    plain = make_layer(torch.float64, chunk_size=8, trained=False)(x)
    assert (full - plain).abs().max() > 1e-3  # the fast weights do change the output


def _prefill_then_decode_rank(layout, clip):
    """Prefill the first S tokens under CP, then decode 2C more one token at a time."""
    layer = make_layer(torch.float64, layout=layout, clip_tau=clip)
    x, _ = _data(torch.float64, S + 2 * C)
    with torch.no_grad():
        state = layer.prefill_state(ctxpar.shard(x[:, :S], layout=layout))
        prefilled, outs = state.delta, []
        for t in range(S, S + 2 * C):
            out, state = layer.step(x[:, t:t + 1], state)
            outs.append(out)
    return torch.cat(outs, 1), prefilled


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "contiguous"), (4, "zigzag")])
def test_decode_after_a_cp_prefill(run_ranks, world, layout, clip):
    per_rank = run_ranks(world, _prefill_then_decode_rank, layout, clip)
    layer = make_layer(torch.float64, clip_tau=clip)
    x, _ = _data(torch.float64, S + 2 * C)
    p = dict(layer.named_parameters())
    with torch.no_grad():
        ref = ttt_reference(x, w_gate=p["gate_proj.weight"], w_up=p["up_proj.weight"],
                            w_down=p["down_proj.weight"], conv_weight=p["ttt_conv"],
                            w_proj=p["ttt_proj.weight"], eta=p["ttt_eta"], chunk_size=C, clip_tau=clip)
        _, single = layer.step(x[:, :S])  # the one-process state after the same prompt
    for tail, delta in per_rank:
        torch.testing.assert_close(tail, ref[:, S:], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(delta, single.delta, rtol=1e-10, atol=1e-10)
    assert (single.delta.abs().max() > 0.1)  # the prompt did move the fast weight


def test_embeddings_target():
    layer = make_layer(torch.float64, chunk_size=8, target="embeddings")
    x, _ = _data(torch.float64, seq=32)
    emb = torch.randn_like(x)
    p = dict(layer.named_parameters())
    ref = ttt_reference(x, w_gate=p["gate_proj.weight"], w_up=p["up_proj.weight"], w_down=p["down_proj.weight"],
                        conv_weight=p["ttt_conv"], w_proj=p["ttt_proj.weight"], eta=p["ttt_eta"],
                        chunk_size=8, target=emb)
    torch.testing.assert_close(layer(x, embeddings=emb), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="target='input_embed' needs embeddings"):
        layer(x)


def test_down_proj_bias():
    torch.manual_seed(0)
    mlp = GatedMLP(D, FF).double()
    mlp.down_proj = nn.Linear(FF, D, bias=True).double()
    layer = InPlaceTTTMLP(mlp, chunk_size=4)
    x = torch.randn(B, 16, D, dtype=torch.float64)
    assert torch.equal(layer(x), mlp(x))  # exact at init, bias included
    with torch.no_grad():
        layer.ttt_conv.normal_()
    p = dict(layer.named_parameters())
    ref = ttt_reference(x, w_gate=p["gate_proj.weight"], w_up=p["up_proj.weight"], w_down=p["down_proj.weight"],
                        conv_weight=p["ttt_conv"], w_proj=p["ttt_proj.weight"], eta=p["ttt_eta"],
                        chunk_size=4, bias=p["down_proj.bias"])
    (gb_ref,) = torch.autograd.grad((ref * x).sum(), p["down_proj.bias"])
    out = layer(x)
    (gb,) = torch.autograd.grad((out * x).sum(), p["down_proj.bias"])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-10, atol=1e-10)


def _bad_chunk_rank():
    InPlaceTTTMLP(GatedMLP(D, FF), chunk_size=8, layout="zigzag")(torch.zeros(1, 12, D))


def _mismatched_rank(sizes=None):
    rank = torch.distributed.get_rank()
    group = None if sizes is None else cp_mesh(hierarchical_context_parallel_sizes=sizes)
    InPlaceTTTMLP(GatedMLP(D, FF), chunk_size=4, group=group)(torch.zeros(1, 20 if rank == 3 else 16, D))


def _embeddings_missing_on_one_rank():
    rank = torch.distributed.get_rank()
    layer = InPlaceTTTMLP(GatedMLP(D, FF), chunk_size=4, target="embeddings", scan_algorithm="ring")
    x = torch.zeros(1, 8, D)
    layer(x, embeddings=None if rank == 1 else torch.zeros_like(x))


def test_shards_that_differ_across_ranks_fail_on_every_rank(run_ranks):
    with pytest.raises(RankError) as info:  # would hang rank 0 in the ring scan otherwise
        run_ranks(2, _embeddings_missing_on_one_rank)
    assert set(info.value.exc_types) == {0, 1}
    # The rank that found the problem names it; its peer learns of it from the check.
    assert "target='input_embed' needs embeddings" in info.value.failures[1]
    assert "target source ok differs on rank(s)" in info.value.failures[0]
    for sizes in (None, [2, 2]):
        with pytest.raises(RankError) as info:
            run_ranks(4, _mismatched_rank, sizes)
        assert set(info.value.exc_types) == {0, 1, 2, 3}
        assert set(info.value.exc_types.values()) == {"ValueError"}
        if sizes is None:
            assert all("S_local differs on rank(s) [3] (values by rank: [16, 16, 16, 20])" in f
                       for f in info.value.failures.values())
        else:  # rank 0 shares neither group with rank 3: it learns of the mismatch by a flag
            assert "another rank of the mesh found a mismatch" in info.value.failures[0]
            assert "S_local differs on rank(s) [1]" in info.value.failures[3]


def _packed_misaligned_rank():
    # zigzag on 3 ranks cuts one 6-token document into pieces of 1: with chunk_size=2 rank 2
    # holds the aligned run (2, 2), ranks 0 and 1 runs of 1 token.
    cu = torch.tensor([0, 6], dtype=torch.int32)
    x = ctxpar.shard_packed(torch.zeros(1, 6, D), cu, layout="zigzag").tokens
    InPlaceTTTMLP(GatedMLP(D, FF), chunk_size=2, layout="zigzag")(x, cu_seqlens=cu)


def _step_without_state_rank():
    InPlaceTTTMLP(GatedMLP(D, FF), chunk_size=8).step(torch.zeros(1, 3, D))


def test_validation_errors(run_ranks):
    with pytest.raises(ValueError, match="striped"):
        InPlaceTTTMLP(GatedMLP(D, FF), layout="striped")
    # One process pads its own trailing partial chunk (issue 13; it used to raise here).
    assert InPlaceTTTMLP(GatedMLP(D, FF), chunk_size=8)(torch.zeros(1, 30, D)).shape == (1, 30, D)
    with pytest.raises(RankError) as info:
        run_ranks(2, _bad_chunk_rank)
    assert set(info.value.exc_types.values()) == {"ValueError"}
    assert "chunk_size=8 does not divide the shard" in info.value.failures[1]
    assert "12 tokens in runs (start, length) [(6, 12)]" in info.value.failures[1]  # touching runs join
    # Only some ranks' runs are misaligned: every rank must still raise (none left waiting).
    with pytest.raises(RankError) as info:
        run_ranks(3, _packed_misaligned_rank)
    assert set(info.value.exc_types) == {0, 1, 2} and set(info.value.exc_types.values()) == {"ValueError"}
    assert "CP rank 0" in info.value.failures[2]
    with pytest.raises(RankError) as info:
        run_ranks(2, _step_without_state_rank)
    assert all("prefill under CP with forward() and prefill_state()" in f for f in info.value.failures.values())
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and strictly increase"):
        InPlaceTTTMLP(GatedMLP(D, FF), chunk_size=4)(torch.zeros(1, 16, D), cu_seqlens=torch.tensor([0, 9, 5, 16]))
    # Packed batches follow the library's convention: tokens sharded by shard_packed.
    with pytest.raises(ValueError, match="pads to 18 tokens.*shard packed batches with ctxpar.shard_packed"):
        InPlaceTTTMLP(GatedMLP(D, FF), chunk_size=4, layout="zigzag")(
            torch.zeros(1, 16, D), cu_seqlens=torch.tensor([0, 9, 16]))
    for bad, msg in (({"chunk_size": 0}, "chunk_size must be a positive int, got 0"),
                     ({"conv_kernel": 4}, "conv_kernel must be a positive odd int, got 4"),
                     ({"target": "labels"}, "target must be one of"),
                     ({"clip_tau": -1.0}, "clip_tau must be None or a positive finite number, got -1.0"),
                     ({"scan_algorithm": "tree"}, "scan_algorithm must be one of")):
        with pytest.raises(ValueError, match=msg):
            TTTConfig(**bad)
    with pytest.raises(ValueError, match=r"unknown InPlaceTTTMLP option\(s\) \['chunk'\]"):
        InPlaceTTTMLP(GatedMLP(D, FF), chunk=4)
    with pytest.raises(ValueError, match="nn.Linear gate_proj"):
        InPlaceTTTMLP(nn.Module())
