"""``ctxpar bench --million`` in small: the measured step's code path (Mistral-style sliding
window through the registered ctxpar attention, an In-Place TTT layer, the CP loss and
gradient all-reduce) equals one process running Hugging Face's own SDPA attention with its
dense sliding-window mask; the ring carries only the window's reach; the command runs."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from ctxpar.apps.bench.million import MillionConfig, build_model, make_batch, rank_step  # noqa: E402
from ctxpar.dist.topology import SINGLE  # noqa: E402
from ctxpar.integrations.transformers import shift_labels  # noqa: E402

# S = 3072 splits into whole 256-token TTT chunks on 1, 2, 3 and 4 ranks; every shard
# (>= 768 tokens) is longer than the window, so a causal window reaches one rank back.
CFG = dict(seq_len=3072, window=512, ttt_chunk=256)
HKV, HEAD_DIM, LAYERS = 4, 16, 2  # ctxpar train's model: width 64, 4 heads, 2 layers


def _reference(cfg: MillionConfig):
    """The same step in this process without ctxpar attention: HF SDPA with its own dense
    sliding-window mask, plain mean cross-entropy, the TTT layer on one process."""
    model = build_model(cfg, "sdpa", SINGLE)
    b = make_batch(cfg)
    logits = model(input_ids=b.input_ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1), shift_labels(b.labels).flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def reference():
    return _reference(MillionConfig(nproc=1, **CFG))


def _check_exact(results, reference):
    ref_loss, ref_grads = reference
    for r in results:
        assert abs(r["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), (r["rank"], r["loss"], ref_loss)
        assert set(r["grads"]) == set(ref_grads)
        for name, g in ref_grads.items():
            # TTT's projection starts with a zero gradient (its conv is zero at init).
            rel = float((r["grads"][name] - g).norm() / g.norm().clamp_min(1e-30))
            assert rel <= 1e-5, (r["rank"], name, rel)


def test_one_rank_equals_reference(reference):
    r = rank_step(MillionConfig(nproc=1, **CFG), return_grads=True, warmup=False)
    _check_exact([r], reference)
    assert r["fwd"]["ring_recv_bytes"] == 0 and r["local_tokens"] == CFG["seq_len"]


@pytest.mark.parametrize("world", [3, 4])
def test_cp_step_equals_reference_and_ring_stops_at_window(run_ranks, reference, world):
    cfg = MillionConfig(nproc=world, **CFG)
    results = run_ranks(world, rank_step, cfg, return_grads=True, warmup=False, timeout=300)
    _check_exact(results, reference)
    s, w = CFG["seq_len"], CFG["window"]
    block = 2 * (s // world) * HKV * HEAD_DIM * 4  # one fp32 K/V block of a rank
    for r in results:
        # 2-step ring per layer: forward 1 K/V block; backward 1 K/V block + 2 dK/dV sums.
        # A full ring would receive N - 1 and 2N - 1 blocks.
        assert r["fwd"]["ring_recv_bytes"] == LAYERS * block, r["fwd"]
        assert r["bwd"]["ring_recv_bytes"] == LAYERS * 3 * block, r["bwd"]
    # Pairs evaluated per layer, over all ranks: at least the visible ones, at most the
    # sub-tiles' bound S·(W + 1 + 256); a causal mask without window would be S²/2.
    pairs = sum(r["fwd"]["score_elements"] for r in results) / LAYERS
    visible = sum(min(i + 1, w) for i in range(s))
    assert visible <= pairs <= s * (w + 1 + 256) < s * s / 2
    assert all(r["bwd"]["score_elements"] == r["fwd"]["score_elements"] for r in results)


def test_cli_runs_small(tmp_path):
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "ctxpar", "bench", "--million", "--seq-len", "2048",
                           "--window", "512", "--nproc", "2", "--ttt-chunk", "256", "--single",
                           "yes", "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| rank 1/2 |" in proc.stdout and "| one process |" in proc.stdout
    res = json.loads(out.read_text())
    losses = [r["loss"] for r in res["ranks"]] + [res["single"]["loss"]]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])
    for r in res["ranks"] + [res["single"]]:
        assert r["step_s"] >= r["fwd_s"] + r["bwd_s"] > 0
        assert r["peak_rss_bytes"] >= r["rss_before_bytes"] > 0 and r["saved_bytes"] > 0


@pytest.mark.parametrize("argv,words", [
    (["--seq-len", "5000"], ["5000", "2 x 1024"]),
    (["--window", "0"], ["window=0"]),
    (["--million-layout", "striped"], ["'striped'"]),
    (["--json", "/proc/no-such-dir/m.json"], ["--json", "/proc/no-such-dir"]),
])
def test_bad_requests_exit_with_the_values(argv, words, capsys):
    from ctxpar.apps.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--million", "--nproc", "2", *argv])
    assert e.value.code not in (0, None)
    for word in words:
        assert word in str(e.value.code), (word, e.value.code)


def test_config_validates():
    with pytest.raises(ValueError, match="multiple of nproc x ttt_chunk = 3 x 256"):
        MillionConfig(seq_len=4096, nproc=3, ttt_chunk=256)
    assert torch.is_tensor(make_batch(MillionConfig(nproc=1, **CFG)).input_ids)
