"""Compute efficiency of the ring decomposition on one GPU.

One GPU cannot host several NCCL ranks, so this emulates an N-rank ring schedule: it runs
every rank's per-step block kernels and LSE merges (fwd) and block backward kernels with
their dQ/dK/dV accumulation (bwd) on the one GPU, exactly as ``ctxpar.attn.ring`` plans them,
and compares the summed time with one fused flash-attention call over the whole sequence.

    python benchmarks/bench_gpu_schedule.py --seq-len 131072 --world 8 --heads 32 --kv-heads 8 --head-dim 128

efficiency = t(one fused call) / t(all ranks' blocks), for fwd and for fwd+bwd; ideal 1.0.
"""
from __future__ import annotations

import argparse
import json

import torch

from ctxpar.dist.topology import CPGroup
from ctxpar.attn.merge import OutputAccumulator
from ctxpar.attn.tiled import backward_tiles, forward_tiles
from ctxpar.sequence.sharding import shard
from ctxpar.attn.tiles import plan_tiles


def _time(fn, repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    S, N, H, Hkv, D = a.seq_len, a.world, a.heads, a.kv_heads, a.head_dim
    scale = D ** -0.5
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, S, H, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, S, Hkv, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, S, Hkv, D, device=dev, dtype=dt, generator=g)
    dout = torch.randn_like(q)

    def _Group(r):  # stands in for rank r of an N-rank group
        return CPGroup(None, r, N)

    qs = [shard(q, group=_Group(r), layout=a.layout) for r in range(N)]
    ks = [shard(k, group=_Group(r), layout=a.layout) for r in range(N)]
    vs = [shard(v, group=_Group(r), layout=a.layout) for r in range(N)]
    dos = [shard(dout, group=_Group(r), layout=a.layout) for r in range(N)]
    plans = [[plan_tiles(a.layout, N, S, r, (r - s) % N, causal=True) for s in range(N)] for r in range(N)]
    outs, lses = [None] * N, [None] * N

    def fwd_all():
        for r in range(N):
            acc = OutputAccumulator(qs[r], D)
            for s in range(N):
                src = (r - s) % N
                forward_tiles(acc, qs[r], ks[src], vs[src], plans[r][s], scale=scale, backend="auto")
            out, lses[r] = acc.result()
            outs[r] = out.to(dt)

    def bwd_all():
        for r in range(N):
            dq = torch.zeros(qs[r].shape, device=dev, dtype=torch.float32)
            for s in range(N):
                src = (r - s) % N
                dkv = torch.zeros((2, *ks[src].shape), device=dev, dtype=torch.float32)
                backward_tiles((dq, dkv[0], dkv[1]), dos[r], qs[r], ks[src], vs[src], outs[r], lses[r],
                               plans[r][s], scale=scale, backend="auto", upcast=False)

    qt, kt, vt = [x.transpose(1, 2) for x in (q, k, v)]
    qg = qt.detach().requires_grad_()
    kg = kt.detach().requires_grad_()
    vg = vt.detach().requires_grad_()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fused_fwd():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True)

    def fused_fwd_bwd():
        o = fused_fwd()
        o.backward(dout.transpose(1, 2))

    t_fused_fwd = _time(lambda: fused_fwd(), a.repeats)
    t_fused_all = _time(fused_fwd_bwd, a.repeats)
    t_cp_fwd = _time(fwd_all, a.repeats)
    t_cp_bwd = _time(bwd_all, a.repeats)
    # Correctness of the emulation on a slice: rank 0's output vs the fused output.
    fwd_all()
    with torch.no_grad():
        ref = fused_fwd().transpose(1, 2)
    ref0 = shard(ref, group=_Group(0), layout=a.layout)
    err = ((outs[0].float() - ref0.float()).abs().max() / ref0.float().abs().max()).item()
    res = {
        "shape": dict(S=S, N=N, Hq=H, Hkv=Hkv, D=D, dtype="bf16", layout=a.layout, causal=True),
        "fused_fwd_s": t_fused_fwd, "fused_fwd_bwd_s": t_fused_all,
        "cp_fwd_s": t_cp_fwd, "cp_fwd_bwd_s": t_cp_fwd + t_cp_bwd,
        "efficiency_fwd": t_fused_fwd / t_cp_fwd,
        "efficiency_fwd_bwd": t_fused_all / (t_cp_fwd + t_cp_bwd),
        "rank0_out_rel_err_vs_fused": err,
        "device": torch.cuda.get_device_name(),
    }
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
