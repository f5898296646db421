"""Hugging Face ``generate()`` under CP (:func:`ctxpar.integrations.transformers.generate`):
tiny random Llama / Qwen3 models give token for token the output of single-process
``generate()``, with every step's logits within the dtype's tolerance."""
import copy
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ctxpar.integrations.transformers import generate, register  # noqa: E402
from test_hf_integration import VOCAB, _model  # noqa: E402

TOL = {"float64": 1e-9, "float32": 1e-4}


def _prompts(lengths: list[int], seed: int = 5):
    """Left-padded prompts of the given lengths: ``(input_ids, attention_mask)``."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), s), generator=g)
    mask = torch.ones(len(lengths), s, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :s - n] = 0
        mask[b, :s - n] = 0
    return ids, mask


def _compare(kind: str, dt: str, layout: str, method: str, lengths: list[int], options: dict,
             cp_seed: int = 11, registered: str = "ring", mesh=None):
    """On every rank: CP generate vs single-process generate of the same model (the
    reference seeded with 11, the CP run on this rank with ``cp_seed``). The model's
    attention is registered with method ``registered`` on the world, or on
    ``cp_mesh(mesh)`` (``[a2a, p2p]``)."""
    group = None
    if mesh is not None:
        from ctxpar.dist.mesh import cp_mesh

        group = cp_mesh(mesh)
    name = register(f"ctxpar_gen_{registered}_{layout}", group=group, method=registered,
                    layout=layout)
    ref = _model(kind, getattr(torch, dt)).eval()
    cp = copy.deepcopy(ref)
    cp.set_attn_implementation(name)
    ids, mask = _prompts(lengths)
    mask = None if min(lengths) == max(lengths) else mask
    kw = dict(return_dict_in_generate=True, output_logits=True, pad_token_id=0, **options)
    torch.manual_seed(11)
    want = ref.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(cp_seed)
    got = generate(cp, ids, attention_mask=mask, group=group, layout=layout, method=method, **kw)
    err = max(float((a.double() - b.double()).abs().max() / b.double().abs().max())
              for a, b in zip(got.logits, want.logits))
    return bool(torch.equal(got.sequences, want.sequences)), err, tuple(got.sequences.shape)


GREEDY = dict(max_new_tokens=32, min_new_tokens=32)


# 13 tokens: no layout splits it on these groups (padded); batches of two lengths. The
# attention registered with each training method (ulysses where the heads allow it at
# training); generation attends through the cache whatever the method.
@pytest.mark.parametrize("world,kind,layout,method,dt,lengths,registered", [
    (2, "llama", "zigzag", "auto", "float64", [13, 6], "ring"),
    (2, "qwen3", "zigzag", "pass-q", "float32", [13, 6], "ring"),
    (2, "llama", "contiguous", "pass-kv", "float32", [13, 6], "ulysses"),
    (2, "qwen3", "contiguous", "auto", "float64", [13], "allgather"),
    (3, "qwen3", "contiguous", "pass-q", "float64", [13], "ring"),
    (3, "llama", "zigzag", "auto", "float32", [13, 6], "allgather"),
    (3, "qwen3", "zigzag", "pass-kv", "float64", [13, 6], "ring"),
    (4, "llama", "contiguous", "pass-kv", "float32", [13, 6], "ring"),
    (4, "qwen3", "zigzag", "pass-q", "float64", [13, 6], "allgather"),
    (4, "llama", "zigzag", "auto", "float64", [13], "ring")])
def test_greedy_matches_single_process(run_ranks, world, kind, layout, method, dt, lengths,
                                       registered):
    for same, err, shape in run_ranks(world, _compare, kind, dt, layout, method, lengths, GREEDY,
                                      11, registered):
        assert same and err < TOL[dt], (same, err)
        assert shape == (len(lengths), 13 + 32)


# The hybrid method on a [2, 2] mesh (a2a 2 x p2p 2): the prompt split as the hybrid layout
# splits it (13 tokens padded to the mesh's multiple), pass-KV / pass-Q over the flat tour
# of both axes, decode merged over both axes.
@pytest.mark.parametrize("kind,layout,method,dt,lengths", [
    ("llama", "zigzag", "auto", "float64", [13, 6]),
    ("qwen3", "zigzag", "pass-q", "float32", [13, 6]),
    ("qwen3", "contiguous", "pass-kv", "float64", [13]),
    ("llama", "contiguous", "pass-q", "float32", [13, 6])])
def test_hybrid_mesh_greedy_matches_single_process(run_ranks, kind, layout, method, dt, lengths):
    for same, err, shape in run_ranks(4, _compare, kind, dt, layout, method, lengths, GREEDY,
                                      11, "hybrid", [2, 2]):
        assert same and err < TOL[dt], (same, err)
        assert shape == (len(lengths), 13 + 32)


@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "contiguous")])
def test_length_limits_and_processors_read_the_prompt_as_given(run_ranks, world, layout):
    """The prompt is padded for the layout inside the prefill, not in what generate()
    sees: ``max_length`` counts the prompt as given (13 tokens, padded to 16 or 15 inside)
    and processors that read ``input_ids`` see no extra pad tokens (before, CP returned 17
    tokens for ``max_length=20``, 3 short)."""
    options = dict(max_length=20, min_length=19, repetition_penalty=1.3, no_repeat_ngram_size=2)
    for same, err, shape in run_ranks(world, _compare, "llama", "float64", layout, "auto", [13, 6],
                                      options, 11):
        assert same and err < TOL["float64"], (same, err)
        assert shape == (2, 20)


BEAMS = dict(max_new_tokens=10, min_new_tokens=10, num_beams=3, num_return_sequences=2,
             output_scores=True)


@pytest.mark.parametrize("world,kind,layout,method,dt,mesh", [
    (2, "llama", "zigzag", "auto", "float64", None),
    (3, "qwen3", "contiguous", "pass-q", "float32", None),
    (4, "llama", "zigzag", "pass-kv", "float64", [2, 2])])
def test_beam_search_matches_single_process(run_ranks, world, kind, layout, method, dt, mesh):
    """Beam search (3 beams, 2 returned per prompt, a left-padded batch): each rank's
    shard follows the beams (``CPCache.reorder_cache``), so the sequences equal one
    process's and every step's logits are within tolerance."""
    registered = "ring" if mesh is None else "hybrid"
    for same, err, shape in run_ranks(world, _compare, kind, dt, layout, method, [13, 6], BEAMS, 11,
                                      registered, mesh):
        assert same and err < TOL[dt], (same, err)
        assert shape == (4, 13 + 10)


def test_sampling_eos_and_logits_processor(run_ranks):
    """Ranks seeded differently still sample rank 0's tokens (those of one process seeded
    alike); eos stops early; a logits processor applies; several samples per prompt."""
    procs = transformers.LogitsProcessorList([transformers.RepetitionPenaltyLogitsProcessor(1.5)])
    options = dict(max_new_tokens=24, do_sample=True, top_k=8, logits_processor=procs,
                   eos_token_id=[3, 7])
    res = run_ranks(2, _compare, "llama", "float64", "zigzag", "auto", [13, 6], options, 11)
    res_other = run_ranks(2, _compare, "qwen3", "float32", "contiguous", "pass-kv", [9], options, 11)
    several = dict(options, num_return_sequences=3)
    res_several = run_ranks(2, _compare, "llama", "float64", "zigzag", "auto", [13, 6], several, 11)
    assert res_several[0][2][0] == 6  # 3 samples of each of the 2 prompts
    for same, err, _ in res + res_other + res_several:
        assert same and err < TOL["float32"], (same, err)


class _RankStop(transformers.StoppingCriteria):
    """Stops rank 1 alone after the first new token (a criterion with rank-local state)."""

    def __init__(self, prompt: int):
        self.prompt = prompt

    def __call__(self, input_ids, scores, **kwargs):
        stop = torch.distributed.get_rank() == 1 and input_ids.shape[1] > self.prompt
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)


def _bad_call(case: str):
    rank = torch.distributed.get_rank()
    name = register("ctxpar_gen_bad", layout="zigzag")
    model = _model("llama", torch.float64, attn=name).eval()
    ids, _ = _prompts([8])
    kw = dict(max_new_tokens=2, pad_token_id=0)
    try:
        if case == "prompt":
            generate(model, ids + rank, **kw)
        elif case == "option":
            generate(model, ids, max_new_tokens=2 + rank, pad_token_id=0)
        elif case == "no cache":
            generate(model, ids, use_cache=False, **kw)
        elif case == "max_time":
            generate(model, ids, max_time=30.0, **kw)
        elif case == "criterion":
            generate(model, ids, stopping_criteria=transformers.StoppingCriteriaList([_RankStop(8)]), **kw)
        else:
            generate(model, ids, layout="contiguous", **kw)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case,match", [
    ("prompt", "input_ids checksum differs"), ("option", "generation options differ"),
    ("no cache", "use_cache"), ("layout", "layout='contiguous'.*layout='zigzag'"),
    # A rank-local stop: before, rank 1 left and rank 0 waited for it in the next decode
    # step's all-gather; max_time (each rank's own clock) is refused up front.
    ("criterion", "stopping criteria checksum differs"), ("max_time", "max_time")])
def test_bad_input_same_error_everywhere(run_ranks, case, match):
    errors = run_ranks(2, _bad_call, case, timeout=60)
    assert errors[0] == errors[1], errors
    assert re.search(match, errors[0]), errors[0]


def _eos_and_kv_bytes(kind: str, prompt: int, new: int):
    """On every rank: the greedy single-process tokens; CP generate() stopped by an eos
    that the reference emits at its 5th new token (every rank must stop there too); and
    a full-length CP generate()'s KV bytes beside the single-process cache's."""
    name = register("ctxpar_gen_eos", layout="zigzag")
    ref = _model(kind, torch.float32).eval()
    cp = copy.deepcopy(ref)
    cp.set_attn_implementation(name)
    ids, _ = _prompts([prompt], seed=9)
    kw = dict(max_new_tokens=new, pad_token_id=0, return_dict_in_generate=True)
    want = ref.generate(ids, min_new_tokens=new, eos_token_id=None, **kw)
    new_tokens = want.sequences[0, prompt:].tolist()
    eos = new_tokens[4]
    stop = new_tokens.index(eos) + 1  # the first time the reference emits it
    ref_stopped = ref.generate(ids, eos_token_id=eos, **kw).sequences
    stopped = generate(cp, ids, eos_token_id=eos, **kw).sequences
    full = generate(cp, ids, min_new_tokens=new, eos_token_id=None, **kw)
    whole = sum(t.numel() * t.element_size() for layer in want.cache.layers
                for t in (layer.keys, layer.values))
    return (tuple(stopped.shape), tuple(ref_stopped.shape), stop,
            bool(torch.equal(stopped, ref_stopped)), full.cache.kv_bytes, whole)


@pytest.mark.parametrize("world,kind", [(2, "llama"), (3, "qwen3")])
def test_eos_stops_early_and_kv_bytes_per_rank(run_ranks, world, kind):
    prompt, new = 12 * world, 24
    for stopped, ref_stopped, stop, same, kv, whole in run_ranks(world, _eos_and_kv_bytes, kind,
                                                                 prompt, new):
        assert same and stopped == ref_stopped == (1, prompt + stop) and stop < new
        # One token per layer: 2 (K and V) x Hkv 2 x head dim 8 x 4 bytes x 2 layers.
        per_token = 2 * 2 * 8 * 4 * 2
        assert abs(kv - whole / world) <= per_token, (kv, whole, world)


class _RankBias:
    """A logits processor that favours another token on each rank from the 3rd new token:
    rank 1 picks the model's eos (2), and stops, unless the check catches it first."""

    def __init__(self, prompt: int):
        self.prompt = prompt

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] >= self.prompt + 2:
            scores[:, 1 + torch.distributed.get_rank()] += 1e4
        return scores


def _diverging_ranks():
    name = register("ctxpar_gen_diverge", layout="zigzag")
    model = _model("llama", torch.float32, attn=name).eval()
    ids, _ = _prompts([8])
    procs = transformers.LogitsProcessorList([_RankBias(8)])
    try:
        generate(model, ids, max_new_tokens=6, pad_token_id=0, logits_processor=procs)
    except ValueError as e:
        return str(e)
    return "no error"


def test_ranks_that_diverge_during_decode_get_the_same_error(run_ranks):
    errors = run_ranks(2, _diverging_ranks)
    assert errors[0] == errors[1] and "new token checksum differs" in errors[0], errors
