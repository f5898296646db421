"""``ctxpar plan``: the cost model's pieces and the command line (help, JSON, bad requests)."""
from __future__ import annotations

import json
import random

import pytest

from ctxpar.apps.cli import main
from ctxpar.apps.plan.cost import attention_time, estimate
from ctxpar.apps.plan.rates import Rates
from ctxpar.apps.plan.specs import MODELS, ClusterSpec, ModelSpec, RunSpec, model_from_config
from ctxpar.apps.plan.work import CPChoice, visible_pairs
from ctxpar.attn.tiles import Band, Tile


def test_visible_pairs_closed_form_equals_the_mask():
    rng = random.Random(0)
    for _ in range(2000):
        lq, lk = rng.randint(1, 40), rng.randint(1, 40)
        band = Band(rng.choice([None, rng.randint(-50, 50)]), rng.choice([None, rng.randint(-50, 50)]))
        assert visible_pairs(Tile(0, lq, 0, lk, band)) == int(band.dense(lq, lk).sum()), (lq, lk, band)


def test_kernel_pairs_follow_the_kernels_causal_blocking():
    from ctxpar.apps.plan.work import kernel_pairs

    causal = Band(0, None)
    # torch's CPU flash kernel: keys in blocks of 512, so a causal 512 block is computed
    # whole, 1024 costs 3/4 of its tile, 2048 5/8 (measured within 2% of these).
    for n, frac in ((256, 1.0), (512, 1.0), (1024, 0.75), (2048, 0.625)):
        assert kernel_pairs(Tile(0, n, 0, n, causal), "cpu_flash") == (int(frac * n * n), 0), n
    # 128 x 128 blocks: causal 1024 computes the 36 blocks on and below the diagonal.
    assert kernel_pairs(Tile(0, 1024, 0, 1024, causal), "cuda") == (36 * 128 * 128, 0)
    # Shifted causal with a square remainder runs as the flag; other bands are dense masks.
    assert kernel_pairs(Tile(0, 768, 0, 512, Band(256, None)), "cpu_flash") == (512 * 512, 0)
    assert kernel_pairs(Tile(0, 512, 0, 768, Band(0, None)), "cpu_flash") == (512 * 768, 512 * 768)
    assert kernel_pairs(Tile(0, 256, 0, 512, Band(0, 300)), "cpu_flash") == (256 * 512, 256 * 512)
    assert kernel_pairs(Tile(0, 256, 0, 512, Band()), "cpu_flash") == (256 * 512, 0)
    assert kernel_pairs(Tile(0, 256, 0, 512, Band(300, None)), "cpu_flash") == (0, 0)


def test_presets_match_published_parameter_counts():
    # Published sizes: Llama-3-8B 8.03 B, Llama-3-70B 70.6 B, Llama-2-7B 6.74 B, Qwen3-8B 8.19 B.
    for name, billions in (("llama3-8b", 8.03), ("llama3-70b", 70.55), ("llama2-7b", 6.74),
                           ("qwen3-8b", 8.19)):
        assert abs(MODELS[name].params / 1e9 - billions) < 0.01 * billions, (name, MODELS[name].params)


def test_config_json_loader(tmp_path):
    cfg = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = model_from_config(str(tmp_path))
    ref = MODELS["llama3-8b"]
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.ffn, m.vocab, m.head_dim) == (
        ref.layers, ref.hidden, ref.heads, ref.kv_heads, ref.ffn, ref.vocab, ref.head_dim)


def _rates(bw: float) -> Rates:
    """No overheads, 1e12 FLOP/s attention, ``bw`` bytes/s links, no latency."""
    attn = {"64": {"fwd": (0.0, 0.0, 1e12), "bwd": (0.0, 0.0, 1e12)}}
    comm = {"2": {op: (0.0, bw) for op in ("p2p", "all_to_all", "all_gather", "reduce_scatter")}}
    return Rates("test", 80e9, 1e12, attn, {"64": 1e12}, 1e12, comm)


def test_ring_step_hides_its_transfer_only_when_compute_is_longer():
    model = ModelSpec("m", 1, 512, 8, 8, 1, 1)
    run = RunSpec(4096, dtype="float32", causal=False)
    choice = CPChoice("ring", 1, 2, "contiguous")
    # Per rank and step: 2048 x 2048 pairs x 8 heads x 4 x 64 FLOPs = 8.6 GFLOP = 8.6 ms;
    # the K/V block is 2 x 2048 x 8 x 64 x 4 B = 8.4 MB.
    compute = 2048 * 2048 * 8 * 4 * 64 / 1e12
    block = 2 * 2048 * 8 * 64 * 4
    fwd_fast, _ = attention_time(model, run, choice, _rates(1e12))
    assert fwd_fast == pytest.approx(2 * compute)  # transfer (8 us) hidden
    fwd_slow, _ = attention_time(model, run, choice, _rates(1e8))
    assert fwd_slow == pytest.approx(block / 1e8 + compute)  # transfer (84 ms) exposed


def test_fsdp_divides_the_static_memory_over_dp_and_cp():
    model, run = MODELS["llama3-8b"], RunSpec(65536)
    rates = _rates(1e11)
    cl = ClusterSpec(2, 8)
    choice = CPChoice("ring", 1, 2, "zigzag")
    fsdp = estimate(model, run, choice, rates, cl)
    rep = estimate(model, RunSpec(65536, sharding="replicated"), choice, rates, cl)
    assert rep.memory["params+grads+optimizer"] == model.params * 18
    shard = rep.memory["params+grads+optimizer"] / 16  # dp x cp = 8 x 2
    layer_bf16 = model.params / model.layers * 2
    # plus two gathered layers (weights and gradients), at most 4 layers of bf16
    assert shard < fsdp.memory["params+grads+optimizer"] <= shard + 4 * layer_bf16
    assert fsdp.memory["activations"] == rep.memory["activations"]


def _cli(capsys, *argv):
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_is_clear(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("--calibrate", "--validate", "--profile", "--hcp", "--window", "examples:", "Left out"):
        assert word in out


def test_json_recommends_a_fitting_config(capsys):
    rc, out, _ = _cli(capsys, "--model", "llama3-8b", "--seq-len", "131072", "--nodes", "2",
                      "--device", "h100", "--json")
    assert rc == 0
    res = json.loads(out)
    best = res["recommended"]
    assert best["fits_without_recomputation"] and best["cp"] * best["dp"] == 16
    assert res["ranked"][0] == best
    steps = [r["tokens_per_s_per_device"] for r in res["ranked"] if r["fits_without_recomputation"]]
    assert steps == sorted(steps, reverse=True)


def test_table_and_code(capsys):
    rc, out, _ = _cli(capsys, "--model", "qwen3-4b", "--seq-len", "32768", "--per-node", "4")
    assert rc == 0
    assert "| # | method | [a2a, p2p]" in out and "recommended:" in out and "ctxpar.attention(" in out
    assert "torchrun --nnodes 1 --nproc-per-node 4" in out


@pytest.mark.parametrize("argv,needle", [
    (["--model", "llama9"], "unknown model 'llama9'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--per-node", "6", "--method", "ulysses"], "Hq=32 query heads (after tp=1) are not divisible by a2a=6"),
    (["--per-node", "6", "--method", "hybrid", "--hcp", "3", "2"], "not divisible by a2a=3"),
    (["--method", "hybrid"], "--method hybrid needs --hcp"),
    (["--seq-len", "100", "--docs", "30,30"], "document lengths sum to 60, not seq_len=100"),
    (["--nproc", "4"], "--nproc plans local ranks on this machine: it needs --profile"),
    (["--profile", "/nonexistent/profile.json"], "cannot read profile"),
    (["--ttt-layers", "40"], "--ttt-layers [40] outside the model's 32 layers"),
    (["--dtype", "int8"], "dtype 'int8' is not one of"),
    (["--validate"], "--validate needs --profile"),
    (["--validate", "--profile", "/nonexistent/p.json", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--calibrate", "--worlds", "0"], "--worlds takes local rank counts >= 2"),
    (["--model", "tiny", "--seq-len", "4096", "--top", "0"], "--top must be >= 1, got 0"),
])
def test_bad_requests_say_why_and_exit_nonzero(capsys, argv, needle):
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2
    assert needle in err, err


def test_does_not_fit_says_by_how_much(capsys):
    rc, out, err = _cli(capsys, "--model", "llama3-70b", "--seq-len", "1048576", "--device", "a100")
    assert rc == 3
    assert "does not fit without recomputation" in err and "GiB over the" in err


def test_fits_recover_known_coefficients():
    from ctxpar.apps.plan.calibrate import fit_affine, fit_linear

    rows = [(1, 1e9, 0), (3, 2e9, 0), (40, 4e9, 0), (1, 8e9, 0), (120, 3e9, 5e6), (8, 1e9, 0)]
    ys = [0.002 + 1e-4 * t + f / 2e10 + 3e-9 * m for t, f, m in rows]
    a, b, c, d = fit_linear(rows, ys)
    assert a == pytest.approx(0.002, rel=1e-6) and b == pytest.approx(1e-4, rel=1e-6)
    assert 1 / c == pytest.approx(2e10, rel=1e-6) and d == pytest.approx(3e-9, rel=1e-6)
    # A coefficient the data would make negative is dropped, the others refitted.
    a, b, c, d = fit_linear(rows, [0.002 + f / 2e10 - 1e-12 * m for t, f, m in rows])
    assert d == 0.0 and min(a, b, c) >= 0.0
    lat, per_byte = fit_affine([4096, 1 << 20, 1 << 22], [1e-4 + x / 1e9 for x in (4096, 1 << 20, 1 << 22)])
    assert lat == pytest.approx(1e-4, rel=1e-6) and 1 / per_byte == pytest.approx(1e9, rel=1e-6)


def test_validation_covers_the_default_bench_matrix():
    from ctxpar.apps.plan.validate import default_cells

    cells = default_cells()
    # N=1: one cell per length; N=2: 3 methods x 2 layouts; N=4: 4 methods (hybrid [2, 2]) x 2 layouts
    assert len(cells) == 2 + 2 * 6 + 2 * 8
    assert {tuple(c["hybrid"]) for c in cells if c["method"] == "hybrid"} == {(2, 2)}
