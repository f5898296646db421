"""No host-device synchronisation on the hot path (issue 16 item 1).

On CPU nothing synchronises, so the test counts the calls that would: ``.item()``,
``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool/int/float(tensor)``, ``torch.equal`` and
``.nonzero()``, on *any* tensor (host or device: stricter than needed), by patching them
in the rank process for the duration of one forward+backward after a first call of the
same shape (which may plan, check the arguments and read ``cu_seqlens`` once). Each case
also runs the same call with ``check_args="always"`` under the counter, which must see
the per-call check's reads: the counter works, in the forward and in the backward.
On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` around a forward+backward.
"""
import contextlib

import pytest
import torch

import ctxpar
from ctxpar.dist.mesh import cp_mesh

from _cases import make_qkv
from _ttt_cases import make_data, make_layer

_SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero")


@contextlib.contextmanager
def _count_syncs(seen: list):
    """Record every call of a syncing Tensor method (and torch.equal) into ``seen``."""
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCING}
    saved_equal = torch.equal

    def wrap(name, fn):
        def counted(*args, **kwargs):
            seen.append(name)
            return fn(*args, **kwargs)
        return counted

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        torch.equal = wrap("equal", saved_equal)
        yield seen
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.equal = saved_equal


def _attention_inputs(case):
    method, layout, kw = case
    world = torch.distributed.get_world_size()
    group = None
    if method == "hybrid":
        group = cp_mesh(hierarchical_context_parallel_sizes=[2, world // 2])
    cu = kw.get("cu_seqlens")
    s = 48 if cu is not None else 16 * world
    q, k, v, dout = make_qkv(3, 1, s, 12, 6 if method == "ulysses" else 4, 8, torch.float32)
    if cu is not None:
        q, k, v, dout = (ctxpar.shard_packed(t, cu, group=group, layout=layout).tokens
                         for t in (q, k, v, dout))
    else:
        q, k, v, dout = (ctxpar.shard(t, group=group, layout=layout) for t in (q, k, v, dout))
    return group, [t.requires_grad_(True) for t in (q, k, v)], dout


def _attention_step(case, inputs, check_args):
    method, layout, kw = case
    group, (q, k, v), dout = inputs
    out = ctxpar.attention(q, k, v, group=group, method=method, layout=layout,
                           check_args=check_args, **kw)
    (out * dout).sum().backward()


def _count_attention(case):
    inputs = _attention_inputs(case)
    _attention_step(case, inputs, True)  # first call: plans, checks the signature once
    calls = {}
    for mode in (True, "always"):
        with _count_syncs([]) as seen:
            _attention_step(case, inputs, mode)
        calls[mode] = seen
    return calls


_CU = torch.tensor([0, 5, 20, 48], dtype=torch.int32)  # one tensor object, as in a batch
_CASES = {
    "ring zigzag causal": ("ring", "zigzag", {"causal": True}),
    "ring contiguous window": ("ring", "contiguous", {"causal": True, "window": (5, 0)}),
    "ulysses zigzag causal": ("ulysses", "zigzag", {"causal": True}),
    "allgather zigzag": ("allgather", "zigzag", {}),
    "ring packed": ("ring", "zigzag", {"causal": True, "cu_seqlens": _CU}),
    "ulysses packed": ("ulysses", "contiguous", {"causal": True, "cu_seqlens": _CU}),
}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(_CASES))
def test_attention_hot_path_reads_nothing_back(run_ranks, world, name):
    if "packed" in name and world == 3:
        pytest.skip("the packed lengths are laid out for 2 ranks")
    results = run_ranks(world, _count_attention, _CASES[name], timeout=120)
    for rank, calls in enumerate(results):
        assert calls[True] == [], f"rank {rank}: syncing calls on the hot path: {calls[True]}"
        assert calls["always"], f"rank {rank}: the counter saw nothing of the per-call check"


def test_hybrid_hot_path_reads_nothing_back(run_ranks):
    results = run_ranks(4, _count_attention, ("hybrid", "zigzag", {"causal": True}), timeout=120)
    for rank, calls in enumerate(results):
        assert calls[True] == [], f"rank {rank}: {calls[True]}"
        assert calls["always"]


def _ttt_inputs():
    x, gout = make_data(torch.float32, 8 * 4 * torch.distributed.get_world_size())
    return ctxpar.shard(x, layout="zigzag").requires_grad_(True), ctxpar.shard(gout, layout="zigzag")


def _ttt_step(layer, inputs):
    x, gout = inputs
    (layer(x).double() * gout).sum().backward()


def _count_ttt():
    inputs = _ttt_inputs()
    layer = make_layer(torch.float32).float()
    _ttt_step(layer, inputs)
    with _count_syncs([]) as hot:
        _ttt_step(layer, inputs)
    per_call = make_layer(torch.float32).float()
    per_call._verified.maxsize = 0  # remembers no signature: the check runs on every call
    _ttt_step(per_call, inputs)
    with _count_syncs([]) as checked:
        _ttt_step(per_call, inputs)
    return hot, checked


@pytest.mark.parametrize("world", [2, 3])
def test_ttt_hot_path_reads_nothing_back(run_ranks, world):
    for rank, (hot, checked) in enumerate(run_ranks(world, _count_ttt, timeout=120)):
        assert hot == [], f"rank {rank}: syncing calls in the TTT layer: {hot}"
        assert checked, f"rank {rank}: the counter saw nothing of the per-call check"


def _changed_signature():
    """The ranks agree on a first call, then all change shape together: checked again."""
    rank = torch.distributed.get_rank()
    for s in (8, 8, 16):
        q = torch.zeros(1, s, 2, 8)
        ctxpar.attention(q, q, q, causal=True, scale=0.25 + 0.01 * (s == 16 and rank == 1))


def test_a_new_signature_is_checked_again(run_ranks):
    from ctxpar.apps.launch import RankError
    with pytest.raises(RankError) as info:
        run_ranks(2, _changed_signature, timeout=60)
    assert set(info.value.exc_types.values()) == {"ValueError"}
    assert all("scale (bits) differs" in t for t in info.value.failures.values())


def _one_rank_changes_alone():
    """The ranks agree twice, then rank 1 alone changes the scale: with check_args="always"
    every call is checked, so every rank raises instead of hanging."""
    rank = torch.distributed.get_rank()
    q = torch.zeros(1, 8, 2, 8)
    for call in range(3):
        scale = 0.5 if call == 2 and rank == 1 else 0.25
        ctxpar.attention(q, q, q, causal=True, scale=scale, check_args="always")


def test_always_catches_one_rank_changing_alone(run_ranks):
    from ctxpar.apps.launch import RankError
    with pytest.raises(RankError) as info:
        run_ranks(2, _one_rank_changes_alone, timeout=60)
    assert sorted(info.value.failures) == [0, 1]
    assert all("scale (bits) differs on rank(s)" in t for t in info.value.failures.values())


def test_check_args_values():
    q = torch.zeros(1, 8, 2, 8)
    with pytest.raises(ValueError, match="check_args must be True, False, 'once' or 'always'; got 'sometimes'"):
        ctxpar.attention(q, q, q, check_args="sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="requires cuda")
def test_cuda_forward_backward_does_not_sync():
    q, k, v, dout = (t.cuda() for t in make_qkv(0, 1, 256, 4, 2, 64, torch.bfloat16))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    for method in ("ring", "allgather"):
        for _ in range(2):  # the first call may plan; the second must not sync
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = ctxpar.attention(q, k, v, method=method, causal=True)
                (out * dout).sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
