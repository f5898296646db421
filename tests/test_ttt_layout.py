"""The In-Place TTT layer's CP layout: its default is the library's (``ctxpar.shard``,
``ctxpar.attention``, ``shard_batch``: zigzag), so a layer built without ``layout=`` and
fed ``ctxpar.shard(x)`` equals one process."""
import inspect

import pytest
import torch

import ctxpar
from ctxpar.integrations.transformers import shard_batch
from ctxpar.ttt import InPlaceTTTMLP, TTTConfig
from ctxpar.ttt.reference import GatedMLP

from _ttt_cases import C, D, FF, TOL, close, make_data

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

