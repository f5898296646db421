"""The In-Place TTT layer under ``torch.autocast`` (bf16 on CPU): at init it equals the
wrapped MLP run under the same autocast, and with the fast weights active it matches the
float64 reference within bf16 tolerance; forward and backward, one process and CP."""
import functools

import pytest
import torch

import ctxpar
from ctxpar.ttt.reference import ttt_reference

from _ttt_cases import C, TOL, close, make_data, make_layer

SEQ = 48
MLP_PARAMS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def _autocast_rank(trained: bool, batch: int):
    """This rank's shard through the layer under autocast (and, at init, through the
    wrapped MLP with the same parameters); loss <out, gout> backward outside autocast."""
    layer = make_layer(torch.float32, trained=trained, layout="zigzag")
    x, gout = make_data(torch.float32, SEQ, batch)
    g_local = ctxpar.shard(gout, layout="zigzag")
    runs = {"ttt": layer} if trained else {"ttt": layer, "mlp": lambda t: layer.down_proj(layer.activations(t))}
    results = {}
    for name, fn in runs.items():
        layer.zero_grad()
        x_local = ctxpar.shard(x, layout="zigzag").requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x_local)
        (out.double() * g_local).sum().backward()
        results[name] = dict(pos=ctxpar.position_ids(SEQ, layout="zigzag"), out=out.detach(),
                             dx=x_local.grad, grads={k: p.grad.clone() for k, p in layer.named_parameters()
                                                     if p.grad is not None})
    return results


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_autocast_at_init_equals_the_wrapped_mlp(run_ranks, world, batch):
    for rank in run_ranks(world, _autocast_rank, False, batch):
        ttt, mlp = rank["ttt"], rank["mlp"]
        assert ttt["out"].dtype == mlp["out"].dtype == torch.bfloat16
        assert torch.equal(ttt["out"], mlp["out"])  # the same bf16 matmul as the MLP's
        close(ttt["dx"], mlp["dx"].double(), TOL[torch.bfloat16], "input grad")
        for name in MLP_PARAMS:  # a rank's share: its own tokens, for both
            assert ttt["grads"][name].dtype == torch.float32
            close(ttt["grads"][name], mlp["grads"][name].double(), TOL[torch.bfloat16], name)


@functools.lru_cache(maxsize=None)
def _reference():
    layer = make_layer(torch.float32)
    x, gout = make_data(torch.float32, SEQ, 1)
    p = {k: v.detach().double().requires_grad_(True) for k, v in layer.named_parameters()}
    xr = x.double().requires_grad_(True)
    out = ttt_reference(xr, w_gate=p["gate_proj.weight"], w_up=p["up_proj.weight"],
                        w_down=p["down_proj.weight"], conv_weight=p["ttt_conv"],
                        w_proj=p["ttt_proj.weight"], eta=p["ttt_eta"], chunk_size=C)
    (out * gout).sum().backward()
    return out.detach(), xr.grad, {k: v.grad for k, v in p.items()}


@pytest.mark.parametrize("world", [1, 2])
def test_autocast_matches_the_float64_reference(run_ranks, world):
    ranks = [r["ttt"] for r in run_ranks(world, _autocast_rank, True, 1)]
    ref_out, ref_dx, ref_grads = _reference()
    assert (ref_out - _reference_at_init()).abs().max() > 0.1  # the fast weights matter
    for key, want in (("out", ref_out), ("dx", ref_dx)):
        full = torch.zeros_like(want)
        for r in ranks:
            full[:, r["pos"]] = r[key].double()
        close(full, want, TOL[torch.bfloat16], key)
    for name, want in ref_grads.items():  # per-rank shares: their sum is the total
        close(sum(r["grads"][name].double() for r in ranks), want, TOL[torch.bfloat16], name)


def _reference_at_init():
    layer = make_layer(torch.float32, trained=False)
    x, _ = make_data(torch.float32, SEQ, 1)
    with torch.no_grad():
        return layer.down_proj(layer.activations(x)).double()


def test_autocast_leaves_float64_alone():
    """Autocast casts no float64 op, so neither does the layer: fp64 stays fp64, exact."""
    layer = make_layer(torch.float64, trained=False)
    x, _ = make_data(torch.float64, SEQ, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, plain = layer(x), layer.down_proj(layer.activations(x))
    assert out.dtype == torch.float64 and torch.equal(out, plain)


def test_streaming_under_autocast_keeps_float32_state():
    """prefill_state() and step() under autocast: the fast-weight state stays float32 and
    the decoded outputs match the full forward under the same autocast."""
    layer = make_layer(torch.float32, chunk_size=8)
    x, _ = make_data(torch.float32, 40, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = layer(x)
        state = layer.prefill_state(x[:, :16])
        assert state.delta.dtype == torch.float32
        outs = []
        for t in range(16, 40):
            out, state = layer.step(x[:, t:t + 1], state)
            outs.append(out)
    assert state.delta.dtype == torch.float32 and outs[0].dtype == full.dtype
    close(torch.cat(outs, 1), full[:, 16:].double(), TOL[torch.bfloat16], "decoded outputs")
