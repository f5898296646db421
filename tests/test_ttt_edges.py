"""Edge cases of the In-Place TTT layer: empty inputs (no tokens: an empty output, on one
process and under CP; never an IndexError or a hang), ``step()`` with no tokens, clear
ValueErrors from ``convert``, and the cross-rank agreement on the arguments that every
rank must share (η's value, ``learn_eta``, the layout, autocast)."""
import pytest
import torch

from ctxpar.apps.launch import RankError
from ctxpar.ttt import convert

from _ttt_cases import B, C, D, make_data, make_layer


def _empty_rank(layout, lengths):
    """This rank's input has ``lengths[rank]`` tokens (a whole number of chunks)."""
    rank = torch.distributed.get_rank()
    layer = make_layer(torch.float32, layout=layout)
    x = make_data(torch.float32, lengths[rank])[0].requires_grad_(True)
    out = layer(x)
    out.sum().backward()
    return tuple(out.shape), x.grad.shape, layer.down_proj.weight.grad.abs().sum().item()


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_no_tokens_give_an_empty_output(run_ranks, world, layout):
    for out, dx, w0_grad in run_ranks(world, _empty_rank, layout, [0] * world):
        assert out == dx == (B, 0, D)
        assert w0_grad == 0.0  # differentiable, with nothing to learn from


def test_no_tokens_on_one_rank_only_fail_on_every_rank(run_ranks):
    with pytest.raises(RankError) as info:
        run_ranks(2, _empty_rank, "zigzag", [0, 2 * C])
    assert set(info.value.exc_types) == {0, 1} and set(info.value.exc_types.values()) == {"ValueError"}
    assert all("S_local differs" in f for f in info.value.failures.values())


@pytest.mark.parametrize("with_state", [False, True])
def test_step_with_no_tokens_returns_the_state_unchanged(with_state):
    layer = make_layer(torch.float64, chunk_size=C)
    x, _ = make_data(torch.float64, 6)
    state = layer.step(x)[1] if with_state else None
    out, after = layer.step(x[:, :0], state)
    assert out.shape == (B, 0, D) and out.dtype == x.dtype
    if with_state:
        assert after is state
    else:  # a fresh state, as step() on tokens would start from
        assert after.position == 0 and after.t_buf.shape[1] == 0 and not bool(after.delta.any())


def test_convert_every_must_be_a_positive_int():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=50)
    for every in (0, -6, 1.5):
        with pytest.raises(ValueError, match=f"every must be a positive int, got {every}"):
            convert(transformers.LlamaForCausalLM(cfg), every=every)


# ------------------------------------------------------------------ cross-rank agreement
def _odd_rank_out(case):
    """Rank 1 differs from rank 0 in one thing that every rank must share."""
    odd = torch.distributed.get_rank() == 1
    options = {}
    if case == "learn_eta":
        options["learn_eta"] = not odd
    if case == "layout":  # rank 0 takes the default (zigzag), rank 1 says contiguous
        options = {"layout": "contiguous"} if odd else {}
    layer = make_layer(torch.float32, **options)
    if case == "eta" and odd:
        with torch.no_grad():
            layer.ttt_eta.fill_(0.5)
    x = make_data(torch.float32, 4 * C)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast" and odd):
        layer(x)


@pytest.mark.parametrize("case,field", [("eta", "eta differs"), ("learn_eta", "options"),
                                        ("layout", "options"), ("autocast", "autocast dtype differs")])
def test_arguments_that_differ_across_ranks_fail_on_every_rank(run_ranks, case, field):
    with pytest.raises(RankError) as info:
        run_ranks(2, _odd_rank_out, case)
    assert set(info.value.exc_types) == {0, 1} and set(info.value.exc_types.values()) == {"ValueError"}
    assert all(field in f for f in info.value.failures.values()), info.value.failures
