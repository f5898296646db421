"""``ctxpar plan --calibrate`` and the timing rules it feeds: the attention samples count
the kernels' causal blocking, collectives are timed back to back and after compute, and
the cost model combines compute and transfers by what the cores can overlap."""
from __future__ import annotations

import pytest
import torch

from ctxpar.apps.plan.cost import attention_time
from ctxpar.apps.plan.rates import Rates
from ctxpar.apps.plan.specs import ModelSpec, RunSpec
from ctxpar.apps.plan.work import CPChoice

OPS = ("p2p", "all_to_all", "all_gather", "reduce_scatter")


def test_attention_samples_count_what_the_kernels_compute():
    from ctxpar.apps.plan.calibrate import ATTN_CASES, attention_samples

    samples = attention_samples(2, 16, torch.device("cpu"), torch.float32, repeats=1)
    assert len(samples) == len(ATTN_CASES)
    by_case = dict(zip(ATTN_CASES, samples))
    # torch's CPU flash kernel: causal 512 costs the whole tile, 1024 three quarters.
    assert by_case[(512, 0, True, 0)][:3] == (512 * 512, 0, 1)
    assert by_case[(1024, 0, True, 0)][:3] == (3 * 1024 * 1024 // 4, 0, 1)
    pairs, masked, tiles = by_case[(2048, 0, True, 128)][:3]
    assert (pairs, masked, tiles) == (16 * 128 * 128, 0, 16)  # one unmasked causal tile per document
    pairs, masked, tiles = by_case[(4096, 256, True, 0)][:3]
    assert tiles > 10 and 0 < masked < pairs  # a window: dense-masked sub-tiles beside causal ones
    assert all(f > 0 and b > 0 for *_, f, b in samples)


def test_collectives_are_timed_back_to_back_and_after_compute(run_ranks):
    from ctxpar.apps.plan.calibrate import SYNC, _rank_comm

    sizes = (4096, 1 << 16)
    for res in run_ranks(2, _rank_comm, "cpu", sizes, 1):
        assert res["compute"] > 0
        for op in OPS:
            for key in (op, op + SYNC):
                assert [b for b, _ in res[key]] == [s // 4 * 4 for s in sizes], key  # one peer's share
                assert all(t >= 0 for _, t in res[key]), key


def _rates(cores: int, comm_sync: dict | None = None) -> Rates:
    attn = {"64": {"fwd": (0.0, 0.0, 1e12), "bwd": (0.0, 0.0, 1e12)}}
    comm = {"2": {op: (0.0, 1e8) for op in OPS}, "4": {op: (0.0, 5e7) for op in OPS}}
    slowdown = {str(n): max(1.0, n / cores) for n in (2, 4)}  # ranks share the cores evenly
    return Rates("test", 80e9, 1e12, attn, {"64": 1e12}, 1e12, comm, cores=cores,
                 slowdown=slowdown, comm_sync=comm_sync or {})


def test_transfers_add_to_compute_when_every_core_runs_a_rank():
    model = ModelSpec("m", 1, 512, 8, 8, 1, 1)
    run = RunSpec(4096, dtype="float32", causal=False)
    choice = CPChoice("ring", 1, 2, "contiguous")
    compute = 2048 * 2048 * 8 * 4 * 64 / 1e12  # one step of one rank
    block = 2 * 2048 * 8 * 64 * 4  # one K/V block: 84 ms at 1e8 B/s
    spare = attention_time(model, run, choice, _rates(cores=4), local_ranks=2)[0]
    assert spare == pytest.approx(block / 1e8 + compute)  # max(compute, transfer) + compute
    full = attention_time(model, run, choice, _rates(cores=2), local_ranks=2)[0]
    assert full == pytest.approx(block / 1e8 + 2 * compute)  # the transfer's CPU work adds
    # Four ranks on the machine (two of them computing, on two cores): the transfer is
    # priced as measured with four ranks.
    crowded = attention_time(model, run, choice, _rates(cores=2), local_ranks=4)[0]
    assert crowded == pytest.approx(block / 5e7 + 2 * compute)


def test_a_collective_after_a_kernel_pays_the_ranks_arrival():
    rates = _rates(cores=2, comm_sync={"2": {op: (0.004, 1e8) for op in OPS}})
    assert rates.comm_time("all_to_all", 1e6, 2) == pytest.approx(0.01)
    assert rates.comm_time("all_to_all", 1e6, 2, after_compute=True) == pytest.approx(0.014)
    # Ulysses: q and out (dout and dq) follow compute, k and v (dk and dv) do not.
    model = ModelSpec("m", 1, 512, 8, 8, 1, 1)
    run = RunSpec(4096, dtype="float32", causal=False)
    choice = CPChoice("ulysses", 2, 1, "contiguous")
    with_sync = attention_time(model, run, choice, rates, local_ranks=2)[0]
    without = attention_time(model, run, choice, _rates(cores=2), local_ranks=2)[0]
    assert with_sync - without == pytest.approx(2 * 0.004)


def test_validate_predicts_bench_cells_from_a_profile(tmp_path, capsys):
    """``--validate --bench-results``: a written profile read back, one row per ctxpar
    cell (peers left out) with the cost model's prediction beside the measurement."""
    import json

    from ctxpar.apps.cli import main
    from ctxpar.apps.plan.calibrate import write_profile
    from ctxpar.apps.plan.validate import cell_specs, predict_cell
    from ctxpar.apps.plan.rates import load_profile

    attn = {"64": {k: [1e-4, 1e-5, 5e10, 1e-9] for k in ("fwd", "bwd")}}
    comm = {"2": {op: [1e-4, 1e9] for op in OPS}}
    profile = {"device": "cpu", "name": "test", "memory": 8e9, "attn": attn, "matmul": {"64": 5e10},
               "mem_bw": 5e9, "comm": comm, "comm_sync": {"2": {op: [2e-3, 1e9] for op in OPS}},
               "cores": 2, "slowdown": {"2": 1.1}, "sub_tile_rows": 256, "probe_s": 0.05}
    write_profile(profile, str(tmp_path / "p.json"))
    base = dict(world=2, seq_len=1024, batch=1, heads=8, kv_heads=8, head_dim=64, dtype="float32",
                causal=True, hybrid=None, peer=False, fwd_s=0.01, tot_s=0.04, tot_spread_s=0.001)
    cells = [dict(base, method="ring", layout="zigzag"), dict(base, method="ulysses", layout="contiguous"),
             dict(base, method="deepspeed-ulysses", layout="contiguous", peer=True)]
    (tmp_path / "r.json").write_text(json.dumps({"cells": cells}))
    assert main(["plan", "--validate", "--profile", str(tmp_path / "p.json"),
                 "--bench-results", str(tmp_path / "r.json"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    rates = load_profile(str(tmp_path / "p.json"))
    assert rates.kernel == "cpu_flash" and rates.comm_sync["2"]["all_to_all"] == (2e-3, 1e9)
    assert [(r["method"], r["layout"]) for r in rows] == [("ring", "zigzag"), ("ulysses", "contiguous")]
    for row, cell in zip(rows, cells):
        assert row["pred_tot"] == pytest.approx(predict_cell(cell, rates)[1])
        assert row["ratio"] == pytest.approx(row["pred_tot"] / 0.04)
        assert row["ok"] == (abs(row["ratio"] - 1) <= 0.2)
    model, run, choice = cell_specs(cells[1])
    assert (choice.a2a, choice.p2p, model.heads, run.seq_len) == (2, 1, 8, 1024)
