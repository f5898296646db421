"""Layouts: shard/unshard round trips, position ids, divisibility errors, world of one."""
import pytest
import torch

import ctxpar
from ctxpar.apps.launch import RankError
from ctxpar.sequence.layouts import get_layout

WORLDS = [1, 2, 3, 4]


def _expected_positions(layout, rank, world, seq_len):
    # Written from the definitions, independently of the segment code.
    if layout == "contiguous":
        n = seq_len // world
        return list(range(rank * n, (rank + 1) * n))
    if layout == "zigzag":
        c = seq_len // (2 * world)
        return list(range(rank * c, (rank + 1) * c)) + list(
            range((2 * world - 1 - rank) * c, (2 * world - rank) * c))
    return list(range(rank, seq_len, world))


@pytest.mark.parametrize("layout", ctxpar.LAYOUTS)
@pytest.mark.parametrize("world", WORLDS)
def test_positions_partition_the_sequence(layout, world):
    seq_len = 24
    seen = []
    for r in range(world):
        pos = get_layout(layout).positions(r, world, seq_len).tolist()
        assert pos == _expected_positions(layout, r, world, seq_len)
        seen += pos
    assert sorted(seen) == list(range(seq_len))


def _roundtrip(layout):
    torch.manual_seed(0)
    full = torch.randn(2, 24, 3, requires_grad=True)
    local = ctxpar.shard(full, layout=layout)
    pos = ctxpar.position_ids(24, layout=layout)
    back = ctxpar.unshard(local, layout=layout)
    (back * torch.arange(24.0).view(1, 24, 1)).sum().backward()
    return (torch.equal(local, full.detach()[:, pos]), torch.equal(back, full.detach()),
            full.grad)


@pytest.mark.parametrize("layout", ctxpar.LAYOUTS)
@pytest.mark.parametrize("world", WORLDS)
def test_shard_unshard_roundtrip(run_ranks, layout, world):
    results = run_ranks(world, _roundtrip, layout)
    grads = []
    for ok_local, ok_back, grad in results:
        assert ok_local and ok_back
        grads.append(grad)
    # Each rank's gradient reaches exactly its own tokens; together they form the full one.
    total = sum(grads)
    assert torch.equal(total, torch.arange(24.0).view(1, 24, 1).expand(2, 24, 3))


def test_world_of_one_without_distributed():
    x = torch.randn(1, 8, 2)
    assert torch.equal(ctxpar.shard(x), x)
    assert torch.equal(ctxpar.unshard(x), x)
    assert ctxpar.position_ids(8).tolist() == list(range(8))


def _shard_bad_length():
    ctxpar.shard(torch.zeros(1, 10, 2), layout="zigzag")


def test_non_divisible_length_raises_on_every_rank(run_ranks):
    with pytest.raises(RankError) as info:
        run_ranks(3, _shard_bad_length)
    assert set(info.value.exc_types.values()) == {"ValueError"}
    assert len(info.value.failures) == 3
    assert "10 is not divisible by 6" in info.value.failures[0]


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown layout 'spiral'"):
        ctxpar.shard(torch.zeros(1, 8, 2), layout="spiral")
