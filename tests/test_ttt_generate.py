"""``generate()`` on models converted to In-Place TTT (issue 13, item 2): teacher forcing.

A prompt of P tokens followed by M generated tokens gives, at every decoded position, the
logits of one full forward over the P + M tokens of that row alone (left padding in a
batch changes nothing: pads are out of the update and each row's chunk grid starts at its
first real token). The float64 logits are taken from the model's own output (a forward
hook), since ``generate(output_logits=True)`` rounds them to float32. One process with
:class:`TTTCache`, and under CP (2 and 4 ranks, contiguous and zigzag) through
:func:`ctxpar.integrations.transformers.generate`. Also: the layer-level state machine
against the layer's forward, the decode cost (O(|W|) per token, the same at two prompt
lengths) and the errors."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

from ctxpar.integrations.transformers import generate, register  # noqa: E402
from ctxpar.integrations.ttt_generation import TTTCache  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from ctxpar.ttt import InPlaceTTTMLP, convert  # noqa: E402
from ctxpar.ttt.stream import TTTStates, cached_forward  # noqa: E402
from ctxpar.dist.topology import resolve  # noqa: E402
from _ttt_cases import TOL as TOL_LAYER, make_layer  # noqa: E402
from test_hf_integration import VOCAB, _model  # noqa: E402

C = 4
NEW = 9
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _converted(kind="llama", dtype=torch.float64, target="hidden_states", attn="sdpa", **options):
    """A tiny model with both layers converted and every TTT weight away from its init."""
    model = _model(kind, dtype, attn=attn).eval()
    convert(model, ttt_layers=[0, 1], ttt_chunk=options.pop("chunk", C), ttt_lr=0.5,
            ttt_target=target, **options)
    torch.manual_seed(7)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, InPlaceTTTMLP):
                mod.ttt_conv.normal_(0, 1.0)
                mod.ttt_proj.weight.normal_(0, 0.3)
    return model


def _prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), s), generator=g)
    mask = torch.ones(len(lengths), s, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :s - n], mask[b, :s - n] = 0, 0
    return ids, mask


def _run(model, ids, mask, options, cp=None):
    """``(sequences, step logits [steps, B, V] at the model's dtype)``; the prefill's
    logits (under CP only on the rank holding the last prompt token) are dropped."""
    seen = []
    hook = model.register_forward_hook(lambda mod, args, out: seen.append(out.logits[:, -1].clone()))
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True, **options)
    try:
        if cp is None:
            out = model.generate(ids, attention_mask=mask, cache=TTTCache(model), **kw)
        else:
            out = generate(model, ids, attention_mask=mask, **cp, **kw)
    finally:
        hook.remove()
    return out.sequences, torch.stack(seen[1:]), out.logits[0]


def _teacher_forcing_error(model, ids, sequences, decoded, first, lengths) -> tuple[float, float]:
    """Max relative errors, over rows, between generate's logits and a full forward over
    the row's own prompt + generated tokens (no padding): at the decoded positions, and at
    the prompt's last position (which generate() returns rounded to float32)."""
    s, worst, worst_first = ids.shape[1], 0.0, 0.0
    for b, n in enumerate(lengths):
        with torch.no_grad():
            full = model(sequences[b:b + 1, s - n:]).logits[0]
        want = full[n:n + decoded.shape[0]]   # positions P .. P+M-2 predict tokens 2..M
        scale = float(want.abs().max())
        worst = max(worst, float((decoded[:, b] - want).abs().max()) / scale)
        worst_first = max(worst_first, float((first[b].double() - full[n - 1].double()).abs().max()) / scale)
    return worst, worst_first


@pytest.mark.parametrize("kind,dtype,target,lengths,chunk,options", [
    ("llama", torch.float64, "hidden_states", [13, 6], 4, {}),
    ("qwen3", torch.float64, "input_embed", [11, 2], 3, dict(do_sample=True, top_k=5)),
    ("llama", torch.float64, "hidden_states", [7], 5, dict(clip_tau=0.05)),
    ("qwen3", torch.float32, "hidden_states", [10, 9], 4, {}),
])
def test_generate_equals_full_forward(kind, dtype, target, lengths, chunk, options):
    options = dict(options)
    clip = options.pop("clip_tau", None)
    model = _converted(kind, dtype, target, chunk=chunk, clip_tau=clip)
    ids, mask = _prompts(lengths)
    torch.manual_seed(0)
    seqs, decoded, first = _run(model, ids, mask, options)
    assert seqs.shape == (len(lengths), max(lengths) + NEW)
    err, err_first = _teacher_forcing_error(model, ids, seqs, decoded, first, lengths)
    assert err < TOL[dtype] and err_first < 1e-5, (err, err_first)
    # The TTT layers matter: the same tokens without fast weights give other logits.
    plain = copy.deepcopy(model)
    for mod in plain.modules():
        if isinstance(mod, InPlaceTTTMLP):
            mod.ttt_eta.zero_()
    with torch.no_grad():
        n = lengths[0]
        a = model(seqs[:1, -n - NEW:]).logits
        b = plain(seqs[:1, -n - NEW:]).logits
    assert (a - b).abs().max() > 100 * TOL[dtype] * b.abs().max(), float((a - b).abs().max())


def _cp_worker(world, layout, lengths, options):
    name = register(f"ctxpar_tttgen_{layout}", layout=layout)
    model = _converted("llama", torch.float64, layout=layout)
    model.set_attn_implementation(name)
    ids, mask = _prompts(lengths)
    torch.manual_seed(1 + torch.distributed.get_rank())  # generate() shares rank 0's RNG
    seqs, decoded, first = _run(model, ids, mask, options, cp=dict(layout=layout))
    return seqs, decoded, first


@pytest.mark.parametrize("world,layout,lengths,options", [
    (2, "zigzag", [13, 6], {}),
    (2, "contiguous", [13, 6], dict(do_sample=True, top_k=5)),
    (4, "zigzag", [13, 6], {}),
    (4, "contiguous", [11, 10], {}),
])
def test_cp_generate_equals_full_forward(run_ranks, world, layout, lengths, options):
    """Every rank's decoded logits equal one process's full forward (a model converted
    without a group), and its tokens one process's ``generate``."""
    results = run_ranks(world, _cp_worker, world, layout, lengths, options)
    reference = _converted("llama", torch.float64, layout=layout)
    ids, mask = _prompts(lengths)
    torch.manual_seed(1)
    want, _, _ = _run(reference, ids, mask, options)
    for seqs, decoded, first in results:
        assert torch.equal(seqs, want)
        err, err_first = _teacher_forcing_error(reference, ids, seqs, decoded, first, lengths)
        assert err < TOL[torch.float64] and err_first < 1e-5, (err, err_first)


BEAM_KW = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, min_new_tokens=6, pad_token_id=0,
               return_dict_in_generate=True, output_scores=True)


def _cp_beam_worker(layout, lengths):
    name = register(f"ctxpar_tttbeam_{layout}", layout=layout)
    model = _converted("llama", torch.float64, layout=layout)
    model.set_attn_implementation(name)
    ids, mask = _prompts(lengths)
    out = generate(model, ids, attention_mask=mask, layout=layout, **BEAM_KW)
    return out.sequences, out.sequences_scores


@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "contiguous")])
def test_cp_beam_search_equals_one_process(run_ranks, world, layout):
    """Under CP the fast-weight state follows the beams with the KV shards: every rank's
    beams and scores equal one process's beam search with a :class:`TTTCache`."""
    lengths = [13, 6]
    reference = _converted("llama", torch.float64, layout=layout)
    ids, mask = _prompts(lengths)
    want = reference.generate(ids, attention_mask=mask, cache=TTTCache(reference), **BEAM_KW)
    for seqs, scores in run_ranks(world, _cp_beam_worker, layout, lengths):
        assert torch.equal(seqs, want.sequences)
        torch.testing.assert_close(scores, want.sequences_scores, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------- the layer's state machine
F64 = torch.float64


@pytest.mark.parametrize("chunk,kernel,proj,clip,lengths,dtype", [
    (4, 5, True, None, [13, 6], F64), (1, 5, True, None, [5, 3], F64), (3, 3, False, 0.5, [10, 1], F64),
    (5, 1, True, None, [9, 9], F64), (8, 7, True, 0.2, [20, 17], F64),
    (4, 5, True, 0.5, [13, 6], torch.float32), (4, 5, True, None, [13, 6], torch.bfloat16)])
def test_state_machine_equals_forward(chunk, kernel, proj, clip, lengths, dtype):
    """Prompt (left-padded batch) then decode tokens one by one through
    :func:`cached_forward` give each row's :meth:`forward` over its whole sequence."""
    layer = make_layer(dtype, chunk_size=chunk, conv_kernel=kernel, proj=proj, clip_tau=clip)
    total = max(lengths) + 11
    torch.manual_seed(4)
    x = torch.randn(len(lengths), total, layer.down_proj.weight.shape[0], dtype=torch.float64).to(dtype)
    s = max(lengths)
    prompt = torch.zeros(len(lengths), s, x.shape[2], dtype=x.dtype)
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for b, n in enumerate(lengths):
        prompt[b, s - n:], mask[b, s - n:] = x[b, :n], 1
    states, topo = TTTStates(), resolve(None)
    outs = [cached_forward(layer, layer.activations(prompt), prompt, states, mask, topo, None)]
    steps = total - s
    for j in range(steps):
        tok = torch.stack([x[b, n + j] for b, n in enumerate(lengths)])[:, None]
        outs.append(cached_forward(layer, layer.activations(tok), tok, states, None, topo, None))
    decoded = torch.cat(outs[1:], 1)
    for b, n in enumerate(lengths):
        with torch.no_grad():
            want = layer(x[b:b + 1, :n + steps])[0].double()
        got = torch.cat([outs[0][b, s - n:], decoded[b]]).double()
        assert float((got - want).abs().max() / want.abs().max()) < TOL_LAYER[dtype]


class _Counter(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the new storage every op returns (what a step allocates; views and
    in-place results are not new), the largest such storage, and the op count."""

    def __init__(self):
        super().__init__()
        self.bytes = self.largest = self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.bytes += t.untyped_storage().nbytes()
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _decode_cost(layer, prompt_len: int):
    states, topo = TTTStates(), resolve(None)
    torch.manual_seed(2)
    d = layer.down_proj.weight.shape[0]
    x = torch.randn(1, prompt_len, d, dtype=torch.float64)
    with torch.no_grad():
        cached_forward(layer, layer.activations(x), x, states, None, topo, None)
        state_bytes = states.nbytes
        tok = torch.randn(1, 1, d, dtype=torch.float64)
        z = layer.activations(tok)
        costs = []
        for _ in range(layer.config.chunk_size):  # one whole chunk: every kind of step
            with FlopCounterMode(display=False) as flops, _Counter() as count:
                cached_forward(layer, z, tok, states, None, topo, None)
            costs.append((flops.get_total_flops(), count.bytes, count.ops))
    return state_bytes, costs


def test_decode_cost_is_O_W_and_independent_of_the_prompt():
    """A decode step's TTT work (flops, bytes its ops return, op count) is the same after
    prompts of 7 and 199 tokens (the same position within a chunk), and it is O(|W|): the
    apply ``z (W_0 + η delta)ᵀ`` (2 GEMVs of D·F) and one outer product v̂ ⊗ z (D·F) per
    final target, whose v̂ costs a k-tap conv and a D×D projection; a step that completes a
    chunk finalises its last h targets too. Nothing scales with the prompt or the chunk."""
    layer = make_layer(torch.float64, chunk_size=8)
    d, f = layer.down_proj.weight.shape
    k = layer.config.conv_kernel
    short, long = _decode_cost(layer, 7), _decode_cost(layer, 7 + 24 * 8)
    assert short == long, (short, long)
    state_bytes, costs = short
    w, h = d * f, k // 2
    # delta and pending [D, F] in float64, the last k-1 target sources and h activations.
    assert state_bytes == 8 * (2 * w + (k - 1) * d + h * f), state_bytes
    target = 2 * w + 2 * k * d + 2 * d * d  # one outer product and its v̂
    flops = sorted({c[0] for c in costs})
    assert flops == [2 * 2 * w + target, 2 * 2 * w + (h + 1) * target], flops
    # New storage: a typical step allocates one [D, F] (the new pending sum) and vectors;
    # the completing step a few more [D, F] (the finalised targets, the folded delta).
    allocated = [c[1] for c in costs]
    assert max(allocated[1:]) <= 8 * (w + 2 * k * (d + f)), allocated
    assert max(allocated) <= 8 * 12 * w, allocated


def _cp_prefill_worker(layout, lengths, total, mesh=None):
    """This rank's prefill of a left-padded prompt through :func:`cached_forward` (on a
    ``cp_mesh`` of ``mesh`` = [a2a, p2p] if given): its outputs, the state, and the
    largest tensor any op allocated on the way."""
    from ctxpar.dist.mesh import cp_mesh
    from ctxpar.sequence.layouts import get_layout
    from ctxpar.sequence.spec import ShardSpec

    group = None if mesh is None else cp_mesh(hierarchical_context_parallel_sizes=list(mesh))
    layer = make_layer(torch.float64, group=group, chunk_size=4, layout=layout)
    topo = resolve(group)
    torch.manual_seed(5)
    x = torch.randn(len(lengths), total, layer.down_proj.weight.shape[0], dtype=torch.float64)
    mask = torch.ones(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, :total - n], mask[b, :total - n] = 0, 0
    spec = ShardSpec.make(get_layout(layout), topo, total // topo.size, None)
    pos = spec.positions(topo.rank, x.device)
    xs = x[:, pos]
    states, count = TTTStates(), _Counter()
    with count:
        out = cached_forward(layer, layer.activations(xs), xs, states, mask, topo, pos)
    return pos, out, states.get(layer), count.largest


@pytest.mark.parametrize("world,layout,mesh", [(2, "zigzag", None), (3, "contiguous", None),
                                               (4, "zigzag", None), (4, "zigzag", (2, 2))])
def test_cp_prefill_equals_one_process_in_a_shards_memory(run_ranks, world, layout, mesh):
    """Under CP (1-D, or a hybrid mesh) every rank's prompt outputs and decode state equal
    one process's, and no op allocates the whole prompt's activations: the prompt passes
    through each rank a shard's worth at a time (before, every rank summed the whole
    ``[B, S, D + F]``)."""
    lengths, total = [46, 17], 48 if world != 3 else 54
    results = run_ranks(world, _cp_prefill_worker, layout, lengths, total, mesh)
    layer = make_layer(torch.float64, chunk_size=4, layout=layout)
    torch.manual_seed(5)
    x = torch.randn(len(lengths), total, layer.down_proj.weight.shape[0], dtype=torch.float64)
    mask = torch.ones(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, :total - n], mask[b, :total - n] = 0, 0
    states = TTTStates()
    want = cached_forward(layer, layer.activations(x), x, states, mask, resolve(None), None)
    ref = states.get(layer)
    d, f = layer.down_proj.weight.shape
    whole_prompt = len(lengths) * total * (d + f) * 8
    for pos, out, state, largest in results:
        torch.testing.assert_close(out, want[:, pos], rtol=1e-12, atol=1e-12)
        for name in ("delta", "pending", "t_win", "z_win"):
            torch.testing.assert_close(getattr(state, name), getattr(ref, name), rtol=1e-12, atol=1e-12)
        assert state.fill == ref.fill
        assert largest <= whole_prompt / world * 1.01, (largest, whole_prompt)


# ----------------------------------------------------------------------------------- errors
def test_generate_without_ttt_cache_raises():
    model = _converted()
    ids, _ = _prompts([6])
    with pytest.raises(ValueError, match="TTTCache"):
        model.generate(ids, max_new_tokens=3, pad_token_id=0)


def test_right_padding_and_cropping_raise():
    model = _converted()
    ids, _ = _prompts([6, 6])
    right = torch.ones_like(ids)
    right[1, -2:] = 0
    with pytest.raises(ValueError, match="left padding.*row 1"):
        model.generate(ids, attention_mask=right, cache=TTTCache(model), max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="cannot be cropped"):
        TTTCache(model).crop(1)


@pytest.mark.parametrize("lengths,beams", [([13, 6], 3), ([9], 4)])
def test_beam_search_equals_full_forward_beams(lengths, beams):
    """Beam search with a TTT cache (the fast-weight state reordered with the KV cache)
    picks the beams, and scores them, as beam search without a cache does, where every
    step is one full forward over each row's own prompt and beam (no padding)."""
    model = _converted()
    ids, mask = _prompts(lengths)
    kw = dict(num_beams=beams, num_return_sequences=2, max_new_tokens=6, min_new_tokens=6, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True, length_penalty=1.0)
    got = model.generate(ids, attention_mask=mask, cache=TTTCache(model), **kw)
    s = ids.shape[1]
    for b, n in enumerate(lengths):
        want = model.generate(ids[b:b + 1, s - n:], use_cache=False, **kw)
        rows = slice(2 * b, 2 * b + 2)
        assert torch.equal(got.sequences[rows, s - n:], want.sequences), b
        torch.testing.assert_close(got.sequences_scores[rows], want.sequences_scores, rtol=1e-9, atol=1e-9)
    # The TTT state matters: reordering it as identity gives other beams or scores.
    class Frozen(TTTCache):
        def reorder_cache(self, beam_idx):
            DynamicCache.reorder_cache(self, beam_idx)

    other = model.generate(ids, attention_mask=mask, cache=Frozen(model), **kw)
    assert not (torch.equal(other.sequences, got.sequences)
                and torch.allclose(other.sequences_scores, got.sequences_scores, rtol=1e-9, atol=0))
