"""``ctxpar verify``'s rank body: its attention and In-Place TTT cases pass on 2 ranks, and
a case that cannot run is reported as a failure, not skipped."""
from ctxpar.apps.verify import TOLERANCE, Case, build_cases, verify_rank


def test_cases_pass_and_cover_ttt(run_ranks):
    cases = build_cases(["ring", "ttt"], ["contiguous", "zigzag"], ["float64", "float32"])
    assert sum(c.method == "ttt" for c in cases) == 2 * 2 + 2  # layouts x dtypes, + packed
    per_rank = run_ranks(2, verify_rank, cases, "cpu", 32)
    for case, *errs in zip(cases, *per_rank):
        assert all(isinstance(e, float) and e <= TOLERANCE[case.dtype] for e in errs), (case, errs)


def test_broken_case_is_reported(run_ranks):
    bad = [Case("nope", "zigzag", True, "float64"), Case("ttt", "zigzag", True, "float64")]
    for errs in run_ranks(2, verify_rank, bad, "cpu", 36):  # 36: TTT runs of 9 tokens, chunk 4
        assert isinstance(errs[0], str) and "ValueError" in errs[0] and "nope" in errs[0]
        assert isinstance(errs[1], str) and "chunk_size=4 does not divide the shard" in errs[1]


def test_every_case_passes_on_a_world_that_does_not_divide_eight_heads(run_ranks):
    # 3 ranks: Ulysses must get head counts that split over them (a healthy install must
    # get a clean verdict on any world), and the K/V heads are replicated to fit.
    import ctxpar

    methods = [m for m in ctxpar.METHODS if m not in ("auto", "hybrid")] + ["ttt"]
    cases = build_cases(methods, ctxpar.LAYOUTS, ["float64"])
    per_rank = run_ranks(3, verify_rank, cases, "cpu", 8 * 2 * 3)
    for case, *errs in zip(cases, *per_rank):
        assert all(isinstance(e, float) and e <= TOLERANCE[case.dtype] for e in errs), (case, errs)


def test_ttt_bfloat16_case_holds_on_a_long_sequence():
    # 96 tokens = 24 chunks: the length of the TTT case on 6 ranks. Rounding eta and the
    # inputs to bfloat16 is no error of the layer, but through the fast weights it grows
    # with the chunks; the check must measure the layer's own arithmetic.
    from ctxpar.apps.verify import _check_ttt

    for layout in ("contiguous", "zigzag"):
        err = _check_ttt(Case("ttt", layout, True, "bfloat16"), "cpu", 96, None)
        assert err <= TOLERANCE["bfloat16"], (layout, err)


def test_ttt_bfloat16_cases_hold_on_four_ranks(run_ranks):
    # On 4 ranks eta's gradient shares cancel (their sum is ~1/5 of their magnitudes), so
    # rounding each share to bfloat16 costs 3e-2 of the total: the check measures a summed
    # gradient against the shares' magnitudes (as verify --nproc 4 runs it).
    cases = build_cases(["ttt"], ["contiguous", "zigzag"], ["bfloat16"])[:2]
    assert all(c.dtype == "bfloat16" and not c.packed for c in cases)
    for case, *errs in zip(cases, *run_ranks(4, verify_rank, cases, "cpu", 64)):
        assert all(isinstance(e, float) and e <= TOLERANCE["bfloat16"] for e in errs), (case, errs)
