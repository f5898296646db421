"""Bad input gets a clear ValueError naming the values, on every rank, without a hang."""
import pytest
import torch

import ctxpar
from ctxpar.apps.launch import RankError


def _qkv(s=8, hq=4, hkv=2, d=8, dtype=torch.float32):
    return (torch.zeros(1, s, hq, d, dtype=dtype), torch.zeros(1, s, hkv, d, dtype=dtype),
            torch.zeros(1, s, hkv, d, dtype=dtype))


@pytest.mark.parametrize("make, pattern", [
    (lambda: _qkv(hq=6, hkv=4), r"query heads \(6\) must be a multiple of key/value heads \(4\)"),
    (lambda: (_qkv()[0].double(), *_qkv()[1:]), r"one dtype; got torch.float64, torch.float32"),
    (lambda: (_qkv()[0], _qkv()[1].to("meta"), _qkv()[2]), r"one device; got cpu, meta"),
    (lambda: (_qkv()[0][0], *_qkv()[1:]), r"q must be \[batch, seq, heads, head_dim\] \(4 dims\); got 3"),
    (lambda: (_qkv(s=8)[0], *_qkv(s=6)[1:]), r"must agree in batch, local sequence length"),
])
def test_local_argument_errors(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        ctxpar.attention(*make())


@pytest.mark.parametrize("kwargs, pattern", [
    ({"layout": "spiral"}, "unknown layout 'spiral'"),
    ({"method": "teleport"}, "unknown method 'teleport'"),
    ({"window": (2, -3)}, r"window must be \(left, right\)"),
    ({"backend": "magic"}, "unknown backend 'magic'"),
])
def test_unknown_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ctxpar.attention(*_qkv(), **kwargs)


def _mismatch(field):
    rank = torch.distributed.get_rank()
    odd = rank == 1
    kw = {"causal": True}
    s, hq, hkv, d, dtype = 8, 4, 2, 8, torch.float32
    if field == "S_local" and odd:
        s = 4
    if field == "Hq" and odd:
        hq = 8
    if field == "head_dim" and odd:
        d = 16
    if field == "dtype" and odd:
        dtype = torch.float64
    if field == "causal" and odd:
        kw["causal"] = False
    if field == "window" and odd:
        kw["window"] = (3, 0)
    if field == "layout":
        kw["layout"] = "striped" if odd else "zigzag"
    if field == "method" and odd:
        kw["method"] = "ulysses"
    if field == "scale":
        kw["scale"] = 0.5 if odd else 0.1
    if field == "return_lse":
        kw["return_lse"] = odd
    if field == "backend":
        kw["backend"] = "math" if odd else "auto"
    if field == "cu_seqlens":
        kw["layout"] = "contiguous"
        kw["cu_seqlens"] = torch.tensor([0, 10, 24] if odd else [0, 12, 24], dtype=torch.int32)
        s = 24 // torch.distributed.get_world_size()
    ctxpar.attention(*_qkv(s, hq, hkv, d, dtype), **kw)


@pytest.mark.parametrize("field", ["S_local", "Hq", "head_dim", "dtype", "causal", "window",
                                   "layout", "method", "cu_seqlens", "scale", "return_lse",
                                   "backend"])
def test_cross_rank_mismatch_raises_everywhere(run_ranks, field):
    if field == "method" and "ulysses" not in ctxpar.METHODS:
        pytest.skip("needs a second method")
    with pytest.raises(RankError) as info:
        run_ranks(3, _mismatch, field, timeout=30)
    err = info.value
    assert sorted(err.failures) == [0, 1, 2], "every rank must raise"
    assert set(err.exc_types.values()) == {"ValueError"}
    name = {"window": "window_left", "cu_seqlens": "cu_seqlens checksum",
            "scale": "scale (bits)"}.get(field, field)
    for text in err.failures.values():
        assert f"{name} differs on rank(s) [1]" in text, text[-400:]


def _hang_then_timeout():
    if torch.distributed.get_rank() == 0:
        torch.distributed.barrier()  # the other ranks never join


def test_a_hung_collective_fails_fast(run_ranks):
    with pytest.raises(Exception) as info:
        run_ranks(2, _hang_then_timeout, timeout=5)
    assert "did not answer" in str(info.value) or "did not answer" in str(info.value.__cause__)
