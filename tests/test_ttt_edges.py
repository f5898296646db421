"""Edge cases of the In-Place TTT layer: the cross-rank agreement on the arguments that
every rank must share (η's value, ``learn_eta``, the layout, autocast)."""
import pytest
import torch

from ctxpar.apps.launch import RankError

from _ttt_cases import C, make_data, make_layer


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
