"""The In-Place TTT layer's CP layout: its default is the library's (``ctxpar.shard``,
``ctxpar.attention``, ``shard_batch``: zigzag), so a layer built without ``layout=`` and
fed ``ctxpar.shard(x)`` equals one process; and where position ids are at hand (the
``position_ids`` argument, or a converted decoder layer's) a shard of another layout fails
on every rank instead of giving silently wrong outputs."""
import inspect

import pytest
import torch

import ctxpar
from ctxpar.apps.launch import RankError
from ctxpar.integrations.transformers import shard_batch
from ctxpar.ttt import InPlaceTTTMLP, TTTConfig, convert
from ctxpar.ttt.reference import GatedMLP

from _ttt_cases import C, D, FF, TOL, close, make_data, make_layer

SEQ = 48  # whole chunks per zigzag block on 2 and 3 ranks


def test_one_default_layout_across_the_library():
    defaults = {f.__qualname__: inspect.signature(f).parameters["layout"].default
                for f in (ctxpar.shard, ctxpar.unshard, ctxpar.position_ids, ctxpar.attention,
                          ctxpar.shard_packed, shard_batch)}
    assert set(defaults.values()) == {TTTConfig().layout} == {"zigzag"}, defaults


def _default_layout_rank():
    """The issue's repro: no layout anywhere, so every call takes its default."""
    torch.manual_seed(0)
    layer = InPlaceTTTMLP(GatedMLP(D, FF).double(), chunk_size=C).double()
    with torch.no_grad():
        layer.ttt_conv.normal_()
        layer.ttt_eta.fill_(0.3)
    x, gout = make_data(torch.float64, SEQ)
    x_local = ctxpar.shard(x).requires_grad_(True)
    out = layer(x_local)
    (out * ctxpar.shard(gout)).sum().backward()
    return ctxpar.unshard(out.detach()), ctxpar.unshard(x_local.grad)


@pytest.mark.parametrize("world", [2, 3])
def test_default_layout_matches_ctxpar_shard(run_ranks, world):
    want_out, want_dx = run_ranks(1, _default_layout_rank)[0]
    assert (want_out - _default_layout_rank_at_init()).abs().max() > 0.05  # TTT matters
    for out, dx in run_ranks(world, _default_layout_rank):
        close(out, want_out, TOL[torch.float64], "output")
        close(dx, want_dx, TOL[torch.float64], "input grad")


def _default_layout_rank_at_init():
    torch.manual_seed(0)
    mlp = GatedMLP(D, FF).double()
    with torch.no_grad():
        return mlp(make_data(torch.float64, SEQ)[0])


# ------------------------------------------------------------------ mismatched shards
def _positions_rank(layer_layout, shard_layout, packed):
    """A layer of ``layer_layout`` fed a shard of ``shard_layout`` with the position ids
    that sharding gives (global, or within each document for packed documents)."""
    layer = make_layer(torch.float64, layout=layer_layout)
    x, _ = make_data(torch.float64, SEQ)
    if packed:  # one chunk per zigzag piece: no padding in either layout
        unit = 2 * torch.distributed.get_world_size() * C
        cu = torch.tensor([0, unit, 2 * unit], dtype=torch.int32)
        x = x[:, : 2 * unit]
        shard = ctxpar.shard_packed(x, cu, layout=shard_layout)
        layer(shard.tokens, cu_seqlens=cu, position_ids=shard.position_ids)
    else:
        pos = ctxpar.position_ids(SEQ, layout=shard_layout).unsqueeze(0).expand(x.shape[0], -1)
        layer(ctxpar.shard(x, layout=shard_layout), position_ids=pos)
    return True


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("world", [2, 3])
def test_position_ids_of_another_layout_fail_on_every_rank(run_ranks, world, packed):
    for layout in ("zigzag", "contiguous"):
        assert run_ranks(world, _positions_rank, layout, layout, packed) == [True] * world
        other = "contiguous" if layout == "zigzag" else "zigzag"
        with pytest.raises(RankError) as info:
            run_ranks(world, _positions_rank, layout, other, packed)
        assert set(info.value.exc_types) == set(range(world))
        assert set(info.value.exc_types.values()) == {"ValueError"}
        kind = "positions within each document" if packed else "global positions"
        assert all(f"position_ids are not this rank's {kind} under layout={layout!r}" in f
                   for f in info.value.failures.values())


def _converted_rank(layout):
    """A converted tiny Llama fed shard_batch's inputs (zigzag, the default); the decoder
    layer hands its position ids to the TTT MLP."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=50,
                                   attn_implementation="eager")
    model = convert(transformers.LlamaForCausalLM(cfg), layers=[0], chunk_size=C, **layout)
    ids = torch.randint(0, 50, (1, 32), generator=torch.Generator().manual_seed(0))
    model(**shard_batch(ids).model_inputs())
    return model.model.layers[0].mlp.config.layout


def test_a_converted_model_checks_the_decoder_layer_positions(run_ranks):
    assert run_ranks(2, _converted_rank, {}) == ["zigzag", "zigzag"]  # the defaults agree
    with pytest.raises(RankError) as info:
        run_ranks(2, _converted_rank, {"layout": "contiguous"})
    assert set(info.value.exc_types.values()) == {"ValueError"} and set(info.value.exc_types) == {0, 1}
    assert all("position_ids are not this rank's global positions under layout='contiguous'" in f
               for f in info.value.failures.values())
    assert run_ranks(2, _converted_rank, {"layout": "contiguous", "check_positions": False}) == ["contiguous"] * 2
