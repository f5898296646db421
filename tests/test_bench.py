"""``ctxpar bench``: the --quick run end to end (results.json, plots, bytes vs theory), the
byte theory against the counters for every method on small shapes, and the saved-tensor
memory helper."""
import json
import subprocess
import sys

import pytest
import torch

import ctxpar
from ctxpar.apps.bench.run import DecoderLayer, theory_recv_bytes
from ctxpar.observe.memory import SavedTensors, saved_tensor_bytes

pytest.importorskip("matplotlib")


def test_quick_run(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "ctxpar", "bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | layout | N |" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert {c["method"] for c in res["cells"]} == {"ring", "ulysses", "allgather"}
    for c in res["cells"]:
        for key in ("fwd_s", "tot_s", "eff_fwd", "eff_tot", "fwd_recv", "bwd_recv", "theory_fwd",
                    "theory_bwd", "compute_s", "blocked_s", "saved_bytes", "err_out", "err_grad"):
            assert key in c, key
        assert len(c["tot_times"]) == 2 and c["tot_s"] > 0 and c["eff_tot"] > 0
        assert abs(c["bytes_ratio"] - 1) <= 0.01, (c["method"], c["bytes_ratio"])
        assert c["err_out"] < 1e-5 and c["err_grad"] < 1e-5
        assert c["saved_bytes"] > 0
    ring = next(c for c in res["cells"] if c["method"] == "ring")
    assert len(ring["events"]) == 2 and all(ring["events"])  # both ranks traced their steps
    layer = {(r["method"], r["world"]): r["saved_bytes"] for r in res["layer_memory"]}
    assert layer[("ring", 2)] <= 0.55 * layer[("(any)", 1)]
    for name in ("timeline.png", "scaling.png"):
        assert (out / name).stat().st_size > 10_000


def _measured(method, layout, hq, hkv, dtype, mesh_sizes=None):
    group = None
    if mesh_sizes is not None:
        from ctxpar.dist.mesh import cp_mesh
        group = cp_mesh(hierarchical_context_parallel_sizes=list(mesh_sizes), device_type="cpu")
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, 64, h, 16, generator=g).to(dtype) for h in (hq, hkv, hkv)]
    q, k, v = [ctxpar.shard(t, group=group, layout=layout).requires_grad_() for t in full]
    with ctxpar.comm_counters() as cf:
        out = ctxpar.attention(q, k, v, group=group, method=method, layout=layout, causal=True,
                               check_args=False)
    with ctxpar.comm_counters() as cb:
        out.sum().backward()
    return cf.bytes_recv, cb.bytes_recv, cf.bytes_sent, cb.bytes_sent


@pytest.mark.parametrize("world,method,layout,hq,hkv,dtype,mesh", [
    (2, "ring", "zigzag", 4, 2, torch.float32, None),
    (2, "ring", "contiguous", 4, 4, torch.bfloat16, None),
    (2, "ulysses", "zigzag", 4, 1, torch.float32, None),
    (2, "allgather", "striped", 4, 2, torch.bfloat16, None),
    (4, "ring", "zigzag", 4, 4, torch.float32, None),
    (4, "ulysses", "contiguous", 4, 2, torch.bfloat16, None),
    (4, "allgather", "zigzag", 4, 1, torch.float32, None),
    (4, "hybrid", "zigzag", 4, 2, torch.float32, (2, 2)),
], ids=lambda x: str(x).replace("torch.", ""))
def test_bytes_match_theory(run_ranks, world, method, layout, hq, hkv, dtype, mesh):
    res = run_ranks(world, _measured, method, layout, hq, hkv, dtype, mesh)
    cell = dict(method=method, world=world, batch=1, seq_len=64, heads=hq, kv_heads=hkv, head_dim=16,
                dtype=str(dtype).removeprefix("torch."), causal=True, layout=layout, hybrid=mesh, peer=False)
    th = theory_recv_bytes(cell)
    for rank, (fr, br, fs, bs) in enumerate(res):
        for got, want in ((fr, th[0]), (br, th[1]), (fs, th[0]), (bs, th[1])):
            assert abs(got - want) <= 0.01 * want, (rank, got, want)


def test_saved_tensor_bytes_dedups_and_excludes_parameters():
    lin = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(32, 64, requires_grad=True)
    # x is saved by the matmul and the mul (once), the weight (a parameter) is not counted.
    n = saved_tensor_bytes(lambda: (lin(x) * x).sum(), exclude=lin.parameters())
    with SavedTensors() as all_saved:
        (lin(x) * x).sum()
    assert n == 2 * x.numel() * 4  # x and lin(x), 32x64 fp32 each
    assert all_saved.nbytes == n + lin.weight.numel() * 4
    assert all_saved.count == 3


def test_decoder_layer_world_of_one():
    layer = DecoderLayer()
    x = torch.randn(1, 64, 256, requires_grad=True)
    out = layer(x, torch.arange(64))
    out.sum().backward()
    assert out.shape == x.shape and x.grad is not None
    n = saved_tensor_bytes(lambda: layer(x, torch.arange(64)), exclude=layer.parameters())
    assert 0 < n < 64 * 256 * 4 * 40
