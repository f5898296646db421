"""Any sequence length (issue 13): a trailing partial chunk uses the weight of the chunks
before it and its delta feeds nothing, on one process (the layer pads its own chunk grid)
and under CP (``shard_batch(..., multiple_of=chunk)`` pads; otherwise a ValueError says
which length to use)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from _ttt_cases import B, C, D, make_data, make_layer
from ctxpar.ttt.reference import ttt_reference

LENGTHS = (1, C - 1, C + 1, 3 * C + 2)


def _reference(layer, x, gout, cu=None):
    """Output, input gradient and parameter gradients of the float64 token loop."""
    p = {k: v.detach().double().requires_grad_(True) for k, v in layer.named_parameters()}
    xr = x.double().requires_grad_(True)
    out = ttt_reference(xr, w_gate=p["gate_proj.weight"], w_up=p["up_proj.weight"],
                        w_down=p["down_proj.weight"], conv_weight=p["ttt_conv"],
                        w_proj=p.get("ttt_proj.weight"), eta=p["ttt_eta"], chunk_size=C, cu_seqlens=cu)
    (out * gout).sum().backward()
    return out.detach(), xr.grad, {k: v.grad for k, v in p.items()}


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("seq,packed,proj", [(s, p, True) for s in LENGTHS for p in (False, True)]
                         + [(3 * C + 2, False, False), (3 * C + 2, True, False)])
def test_any_length_equals_the_token_loop(seq, packed, proj):
    layer = make_layer(torch.float64, proj=proj)
    x, gout = make_data(torch.float64, seq)
    # One process, zigzag: inner documents of even length (each pads to 2N = 2 otherwise);
    # the last one is any length, and the layer's padding joins it.
    cu = torch.tensor([0, 2 * (seq // 4), seq] if seq >= 4 else [0, seq], dtype=torch.int32) if packed else None
    want, want_dx, want_grads = _reference(layer, x, gout, cu)
    xg = x.detach().clone().requires_grad_(True)
    out = layer(xg, cu_seqlens=cu)
    (out * gout).sum().backward()
    assert out.shape == x.shape and _rel(out, want) <= 1e-10
    assert _rel(xg.grad, want_dx) <= 1e-10
    for name, p in layer.named_parameters():
        if want_grads[name] is None or not want_grads[name].any():  # unused (one partial chunk)
            assert p.grad is None or not p.grad.any(), name
        else:
            assert _rel(p.grad, want_grads[name]) <= 1e-10, name


@pytest.mark.parametrize("prompt", [1, C - 1, C + 3])
def test_prefill_and_step_at_any_length_equal_the_forward(prompt):
    layer = make_layer(torch.float64)
    x, _ = make_data(torch.float64, prompt + C + 3)
    with torch.no_grad():
        full = layer(x)
        state = layer.prefill_state(x[:, :prompt])
        assert state.t_buf.shape[1] == prompt % C
        outs = []
        for t in range(prompt, x.shape[1]):  # decode one token at a time
            out, state = layer.step(x[:, t:t + 1], state)
            outs.append(out)
    assert _rel(torch.cat(outs, 1), full[:, prompt:]) <= 1e-10


# ----------------------------------------------------------------------------- under CP


def _cp_lengths_rank(layout: str, seq: int) -> dict:
    """A converted tiny Llama: CP on a batch padded by ``shard_batch(multiple_of=C)`` vs one
    process on the unpadded batch; loss and every gradient. Also the error without it."""
    from test_hf_integration import _model, _rel as rel

    from ctxpar.dist.topology import CPGroup
    from ctxpar.integrations.transformers import register, shard_batch
    from ctxpar.loss import allreduce_gradients, cp_cross_entropy
    from ctxpar.ttt import convert

    ref = _model("llama", torch.float64)
    convert(ref, ttt_layers=[1], ttt_chunk=C, ttt_lr=0.5, layout=layout, group=CPGroup(None, 0, 1))
    with torch.no_grad():
        ref.model.layers[1].mlp.ttt_conv.normal_(std=0.5)
    cp = copy.deepcopy(ref)
    cp.model.layers[1].mlp.group = None
    cp.set_attn_implementation(register(f"ctxpar_test_lengths_{layout}", method="ring", layout=layout))
    ids = torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(3))
    logits = ref(input_ids=ids).logits
    ref_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    ref_loss.backward()
    batch = shard_batch(ids, layout=layout, multiple_of=C)
    loss = cp_cross_entropy(cp(**batch.model_inputs()).logits, batch.labels)
    loss.backward()
    allreduce_gradients(cp)
    params = dict(ref.named_parameters())
    errs = {n: rel(p.grad, params[n].grad) for n, p in cp.named_parameters()}
    errs["loss"] = abs(loss.item() - ref_loss.item()) / ref_loss.item()
    try:
        cp(**shard_batch(ids, layout=layout).model_inputs())
        errs["unpadded"] = "did not raise"
    except ValueError as e:
        errs["unpadded"] = str(e)
    return errs


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_cp_pads_to_whole_chunks(run_ranks, layout, world):
    seq = 21
    for errs in run_ranks(world, _cp_lengths_rank, layout, seq):
        message = errs.pop("unpadded")
        mult = (2 * world if layout == "zigzag" else world) * C
        assert f"must be a multiple of {mult}: pad it to {-(-seq // mult) * mult}" in message, message
        assert f"multiple_of={C}" in message
        bad = {k: v for k, v in errs.items() if not v <= 1e-10}
        assert not bad, bad


def test_pad_for_cp_and_shard_batch_take_a_multiple():
    import ctxpar
    from ctxpar.integrations.transformers import shard_batch

    x, info = ctxpar.pad_for_cp(torch.ones(1, 21, 3), layout="zigzag", multiple_of=6)  # 2 x 6 on one rank
    assert x.shape[1] == 24 and info.length == 21 and int(info.pad_mask.sum()) == 3
    batch = shard_batch(torch.ones(1, 21, dtype=torch.long), layout="contiguous", multiple_of=5)
    assert batch.input_ids.shape[1] == 25 and bool((batch.labels[0, 20:] == -100).all())
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"multiple_of must be a positive int, got {bad}"):
            ctxpar.pad_for_cp(torch.ones(1, 5), multiple_of=bad)


def _cp_prefill_rank(layout: str, prompt: int, total: int) -> float:
    """A prompt padded to whole chunks per shard, prefilled under CP with its real length,
    then decoded token by token on this rank: the outputs of one process's forward."""
    import ctxpar
    from ctxpar.dist.topology import CPGroup

    layer = make_layer(torch.float64, layout=layout)
    alone = copy.deepcopy(layer)
    alone.group = CPGroup(None, 0, 1)
    x, _ = make_data(torch.float64, total)
    junk = torch.randn(B, 64, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    padded, _ = ctxpar.pad_for_cp(x[:, :prompt], layout=layout, multiple_of=C)
    padded = torch.cat([x[:, :prompt], junk[:, : padded.shape[1] - prompt]], 1)  # any padding
    with torch.no_grad():
        state = layer.prefill_state(ctxpar.shard(padded, layout=layout), length=prompt)
        outs = []
        for t in range(prompt, total):
            out, state = layer.step(x[:, t:t + 1], state)
            outs.append(out)
        want = alone(x)[:, prompt:]
    return _rel(torch.cat(outs, 1), want)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("prompt", [C * 4, 21])
def test_cp_prefill_of_a_padded_prompt_then_decode(run_ranks, layout, prompt):
    assert max(run_ranks(2, _cp_prefill_rank, layout, prompt, prompt + C + 2)) <= 1e-10


def test_prefill_length_is_checked():
    layer = make_layer(torch.float64)
    x, _ = make_data(torch.float64, 6)
    with pytest.raises(ValueError, match=r"length must be an int in \[0, 6\].*got 7"):
        layer.prefill_state(x, length=7)
