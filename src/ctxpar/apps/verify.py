"""``ctxpar verify``: every method x layout x masking case against the float64 reference,
and the In-Place TTT layer against its float64 token-by-token reference.

Runs on the current world under torchrun, or on ``--nproc`` local gloo processes it spawns.
Prints a table of the worst relative error per case (maximum over ranks) over out, lse,
dq, dk and dv for attention, and over out, the input gradient and every parameter
gradient for TTT; it exits non-zero if any case is out of tolerance. It is the command to
run on a new cluster.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math

import torch

from ctxpar.numerics import rel_error
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.spec import cp_multiple

TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}
KV_HEADS, MIN_HEADS, BATCH, HEAD_DIM = 2, 8, 2, 40  # attention cases: [B, S, H, D]
TTT_DIM, TTT_FF, TTT_CHUNK = 16, 32, 4  # TTT cases: x [B, S, D], hidden F, chunks of C


def attention_heads(world: int) -> tuple[int, int]:
    """``(Hq, Hkv)`` of the attention cases on ``world`` ranks: Hkv = 2 (grouped-query),
    Hq the smallest multiple of lcm(world, Hkv) that is at least 8. Every method then runs
    on every world: Ulysses splits Hq over the ranks (and replicates the K/V heads up to
    lcm(world, Hkv)), and each query head still maps to one K/V head; 8 on 1, 2, 4, 8 ranks,
    12 on 3 or 6."""
    step = math.lcm(world, KV_HEADS)
    return -(-MIN_HEADS // step) * step, KV_HEADS


@dataclasses.dataclass(frozen=True)
class Case:
    method: str
    layout: str
    causal: bool
    dtype: str
    window: tuple[int, int] = (-1, -1)
    packed: bool = False
    mesh: bool = False  # on the [2, world/2] hierarchical mesh (always for method "hybrid")

    @property
    def name(self) -> str:
        mask = "causal" if self.causal else "full"
        if self.method == "ttt":
            mask = "chunks of 4"
        if self.window != (-1, -1):
            mask += f" window={self.window}"
        if self.packed:
            mask += " packed docs"
        if self.mesh:
            mask += " on a mesh"
        return f"{self.method:10s} {self.layout:10s} {mask:26s} {self.dtype}"


def build_cases(methods, layouts, dtypes, mesh: bool = False) -> list[Case]:
    """Attention cases for ``methods`` (plus In-Place TTT cases when "ttt" is among them;
    ``mesh``: the world also runs hierarchical meshes)."""
    ttt = "ttt" in methods
    methods = [m for m in methods if m != "ttt"]
    cases = [Case(m, lay, c, dt) for m, lay, c, dt in itertools.product(methods, layouts, (False, True), dtypes)]
    cases += [Case(m, lay, True, "float64", (5, 0)) for m, lay in itertools.product(methods, layouts)]
    cases += [Case(m, lay, c, "float64", packed=True)
              for m, lay, c in itertools.product(methods, layouts, (False, True))]
    if ttt:
        chunked = [lay for lay in layouts if get_layout(lay).consecutive_runs]  # whole chunks
        cases += [Case("ttt", lay, True, dt) for lay, dt in itertools.product(chunked, dtypes)]
        cases += [Case("ttt", lay, True, "float64", packed=True) for lay in chunked]
        if mesh:
            cases += [Case("ttt", lay, True, "float64", mesh=True) for lay in chunked]
    return cases


def _check_case(case: Case, device: str, seq_len: int, group) -> float:
    import ctxpar
    from ctxpar.attn.reference import attention_reference
    from ctxpar.dist.topology import resolve

    if case.method == "ttt":
        return _check_ttt(case, device, seq_len, group)
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(1234)
    hq, hkv = attention_heads(resolve(group).size)
    full = [torch.randn(BATCH, seq_len, h, HEAD_DIM, generator=gen, dtype=torch.float64)
            for h in (hq, hkv, hkv, hq)]
    ref_in = [t.clone().requires_grad_() for t in full[:3]]
    cu = None
    if case.packed:  # documents of 1 token, 7 tokens, a third of the rest, and the remainder
        third = (seq_len - 8) // 3
        cu = torch.tensor([0, 1, 8, 8 + third, seq_len - 3], dtype=torch.int32)
        full = [t[:, : seq_len - 3] for t in full]
        ref_in = [t.clone().requires_grad_() for t in full[:3]]
    ro, rl = attention_reference(*ref_in, causal=case.causal, window=case.window, cu_seqlens=cu)
    (ro * full[3]).sum().backward()
    if case.packed:
        return _check_packed(case, device, dtype, full, ref_in, ro, rl, cu, group)

    def shard(t, dim=1):
        return ctxpar.shard(t, group=group, layout=case.layout, dim=dim)

    local = [shard(t).to(device=device, dtype=dtype).requires_grad_() for t in full[:3]]
    out, lse = ctxpar.attention(*local, group=group, method=case.method, layout=case.layout,
                                causal=case.causal, window=case.window, return_lse=True)
    out.backward(shard(full[3]).to(device=device, dtype=dtype))
    pairs = [(out, ro), (lse, rl)] + [(t.grad, r.grad) for t, r in zip(local, ref_in)]
    return max(rel_error(x.cpu(), shard(r.detach(), 2 if x is lse else 1)) for x, r in pairs)


def _check_packed(case: Case, device, dtype, full, ref_in, ro, rl, cu, group) -> float:
    import ctxpar

    shards = [ctxpar.shard_packed(t, cu, layout=case.layout, group=group) for t in full]
    local = [sh.tokens.to(device=device, dtype=dtype).requires_grad_() for sh in shards[:3]]
    out, lse = ctxpar.attention(*local, group=group, method=case.method, layout=case.layout,
                                causal=case.causal, cu_seqlens=cu, return_lse=True)
    out.backward(shards[3].tokens.to(device=device, dtype=dtype))

    def back(x, dim=1):
        return ctxpar.unshard_packed(x.detach().cpu(), cu, layout=case.layout, dim=dim, group=group)

    pairs = [(back(out), ro), (back(lse, 2), rl)] + [(back(t.grad), r.grad) for t, r in zip(local, ref_in)]
    return max(rel_error(x, r) for x, r in pairs)


def _ttt_documents(layout: str, world: int, chunk: int, seq_len: int) -> list[int]:
    """``cu_seqlens`` of the packed TTT case. A layout that balances documents splits each
    one over the ranks, padded to whole chunks per piece: documents of U-1 and U tokens
    (U = the layout's multiple times the chunk, 2NC for zigzag) make one padded and one
    exact. Other layouts keep documents in place: 4 and S-4 tokens put a boundary inside
    the first chunk."""
    if get_layout(layout).balances_documents:
        unit = cp_multiple(layout, world) * chunk
        return [0, unit - 1, 2 * unit - 1]
    return [0, 4, seq_len]


def _ttt_layer(case: Case, group, dtype: torch.dtype):
    """The In-Place TTT layer of the TTT cases, fast weights well away from init, in
    float64 holding values of ``dtype`` (weights rounded to it)."""
    from ctxpar.ttt import InPlaceTTTMLP
    from ctxpar.ttt.reference import GatedMLP

    torch.manual_seed(1234)
    layer = InPlaceTTTMLP(GatedMLP(TTT_DIM, TTT_FF).double(), chunk_size=TTT_CHUNK,
                          layout=case.layout, group=group).double()
    with torch.no_grad():
        layer.ttt_conv.normal_()
        layer.ttt_target.normal_(std=0.3)
        layer.ttt_eta.fill_(0.3)
    return layer.to(dtype).double()


def _check_ttt(case: Case, device: str, seq_len: int, group) -> float:
    """An In-Place TTT layer on this rank's shard vs the float64 token loop; packed: the
    documents of :func:`_ttt_documents`, each checked against itself run alone.

    The reference sees the weights and inputs rounded to the case's dtype (as ``ctxpar
    bench``'s does): that rounding is no error of the layer, yet through the fast weights
    it grows with the number of chunks, i.e. with the world (eta = 0.3 in bfloat16 alone
    costs more than the tolerance at 24 chunks); what is left is the layer's arithmetic."""
    import torch.distributed as dist

    import ctxpar
    from ctxpar.dist.topology import resolve
    from ctxpar.ttt.reference import documents_reference

    world = resolve(group).size
    dtype = getattr(torch, case.dtype)
    layer = _ttt_layer(case, group, dtype)
    cu = _ttt_documents(case.layout, world, TTT_CHUNK, seq_len) if case.packed else None
    length = seq_len if cu is None else cu[-1]
    gen = torch.Generator().manual_seed(99)
    x, g = (torch.randn(BATCH, length, TTT_DIM, generator=gen, dtype=torch.float64)
            .to(dtype).double() for _ in range(2))
    ref_out, ref_dx, ref_grads = documents_reference(layer, x, g, cu or [0, length])
    layer = layer.to(device=device, dtype=dtype)
    if cu is None:
        def shard(t):
            return ctxpar.shard(t, group=group, layout=case.layout)

        def back(t):
            return ctxpar.unshard(t.detach(), group=group, layout=case.layout).cpu()
    else:
        cu = torch.tensor(cu, dtype=torch.int32)

        def shard(t):
            return ctxpar.shard_packed(t, cu, group=group, layout=case.layout).tokens

        def back(t):
            return ctxpar.unshard_packed(t.detach(), cu, group=group, layout=case.layout).cpu()
    x_local = shard(x).to(device=device, dtype=dtype).requires_grad_()
    out = layer(x_local, cu_seqlens=cu)
    out.backward(shard(g).to(device=device, dtype=dtype))
    errs = [rel_error(back(out), ref_out), rel_error(back(x_local.grad), ref_dx)]
    for name, param in layer.named_parameters():
        grad = param.grad.double()
        scale = grad.abs().max().reshape(1)
        if world > 1:  # per-rank shares; verify's CP group is the whole world
            dist.all_reduce(grad)
            dist.all_reduce(scale)
        # Each rank's share is rounded to the dtype before the sum (as a data-parallel
        # all-reduce of low-precision gradients is), so when shares cancel (a scalar such
        # as eta's gradient) the sum's error scales with the shares, not with the total:
        # measure it against sum_r max|share_r| (equal to max|total| without cancellation).
        errs.append(rel_error(grad.cpu(), ref_grads[name], floor=max(1.0, float(scale))))
    return max(errs)


def verify_rank(cases: list[Case], device: str, seq_len: int) -> list[float | str]:
    """Run every case on this rank; return its worst error per case (or the error text)."""
    import ctxpar

    results: list[float | str] = []
    for case in cases:
        group = None
        if case.method == "hybrid" or case.mesh:
            import torch.distributed as dist
            world = dist.get_world_size() if dist.is_initialized() else 1
            group = ctxpar.cp_mesh(hierarchical_context_parallel_sizes=[2, world // 2],
                                   device_type=device)
        try:
            results.append(_check_case(case, device, seq_len, group))
        except Exception as e:  # noqa: BLE001 - reported in the table as a failure
            results.append(f"{type(e).__name__}: {e}")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, default=2, help="local processes to spawn (ignored under torchrun)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seq-len", type=int, default=0, help="global length (default: 8 chunks per rank)")
    p.add_argument("--methods", default="all",
                   help="comma-separated methods (and 'ttt' for the In-Place TTT layer), or 'all'")
    p.add_argument("--dtypes", default="float64,float32,bfloat16")


def run(args) -> int:
    import ctxpar
    from ctxpar.apps.launch import RankError, run_job, under_torchrun

    methods = ([m for m in ctxpar.METHODS if m != "auto"] + ["ttt"] if args.methods == "all"
               else args.methods.split(","))
    world = int(__import__("os").environ.get("WORLD_SIZE", args.nproc)) if under_torchrun() else args.nproc
    if world < 1:
        raise SystemExit(f"ctxpar verify: --nproc must be >= 1; got --nproc {args.nproc}")
    mesh = world >= 4 and world % 2 == 0
    if not mesh:
        methods = [m for m in methods if m != "hybrid"] if args.methods == "all" else methods
    # Default: 8 times a length that every layout can split over the world.
    seq_len = args.seq_len or 8 * math.lcm(*(cp_multiple(lay, world) for lay in ctxpar.LAYOUTS))
    cases = build_cases(methods, ctxpar.LAYOUTS, args.dtypes.split(","), mesh=mesh)
    try:
        per_rank = run_job(verify_rank, cases, args.device, seq_len, nproc=args.nproc, device=args.device)
    except RankError as e:
        print(e)
        return 1
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    failed = 0
    hq, hkv = attention_heads(world)
    print(f"ctxpar verify: world={world} seq_len={seq_len} (attention: B={BATCH}, Hq={hq}, "
          f"Hkv={hkv}, D={HEAD_DIM}; ttt: B={BATCH}, D={TTT_DIM}, F={TTT_FF}, C={TTT_CHUNK}); "
          f"worst relative error vs float64 over out, lse, dq, dk, dv (ttt: out, dx and every "
          f"parameter gradient, against the weights and inputs rounded to the dtype)")
    print(f"{'case':58s} {'error':>10s}  result")
    for i, case in enumerate(cases):
        errs = [r[i] for r in per_rank]
        text = next((e for e in errs if isinstance(e, str)), None)
        if text is not None:
            failed += 1
            print(f"{case.name:58s} {'-':>10s}  FAIL {text[:80]}")
            continue
        worst = max(errs)
        ok = worst <= TOLERANCE[case.dtype]
        failed += not ok
        print(f"{case.name:58s} {worst:10.2e}  {'pass' if ok else 'FAIL'}")
    print(f"{len(cases) - failed}/{len(cases)} cases passed")
    return 1 if failed else 0
