"""Hugging Face integration: a tiny Llama / Qwen2 / Qwen3 model under CP gives the same loss
and the same gradient for every parameter as one process (eager attention on the full
sequence; torch's SDPA, which computes in the input dtype, where eager's softmax is fp32 even
for fp64 models), for every method, layout, world size and dtype."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import ctxpar  # noqa: E402
from ctxpar.integrations.transformers import register, shard_batch, shift_labels  # noqa: E402
from ctxpar.loss import allreduce_gradients, cp_cross_entropy, grad_norm  # noqa: E402

# Methods that take a 1-D group (hybrid needs a 2-D mesh; auto picks one of the others).
METHODS = [m for m in ctxpar.METHODS if m not in ("hybrid", "auto")]
LAYOUTS = ["zigzag", "contiguous"]
TOL = {"float64": 1e-10, "float32": 2e-5}
VOCAB, SEQ, BATCH = 64, 64, 2


def _model(kind: str, dtype: torch.dtype, seed: int = 0, attn: str = "sdpa"):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  attention_dropout=0.0)
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.Qwen3Config(head_dim=8, **common), transformers.Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype)
    model.set_attn_implementation(attn)
    return model


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[torch.rand(BATCH, SEQ, generator=g) < 0.2] = -100  # ignored tokens
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ - 7:] = 0  # right padding in one row
    return ids, labels, mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _equivalence(kind: str, method: str, layout: str, dtypes: list[str], hcp=None) -> dict:
    """On every rank: CP loss/grads vs a single-process run of the same batch."""
    group = None
    if hcp is not None:  # hierarchical CP: method "hybrid" on a ("ring", "ulysses") mesh
        from ctxpar.dist.mesh import cp_mesh

        group = cp_mesh(hierarchical_context_parallel_sizes=hcp, device_type="cpu")
    name = register(f"ctxpar_test_{method}_{layout}", group=group, method=method,
                    layout=layout)
    ids, labels, mask = _batch()
    out = {}
    for dt in dtypes:
        dtype = getattr(torch, dt)
        ref = _model(kind, dtype)
        cp = copy.deepcopy(ref)
        cp.set_attn_implementation(name)
        # Single process: full sequence, SDPA attention, plain token-mean CE.
        target = shift_labels(labels.masked_fill(mask == 0, -100))
        logits = ref(input_ids=ids).logits
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        ref_loss = F.cross_entropy(logits.to(acc).flatten(0, 1), target.flatten(),
                                   ignore_index=-100)
        ref_loss.backward()
        # CP: this rank's shard.
        batch = shard_batch(ids, labels, group=group, layout=layout, attention_mask=mask)
        cp_loss = cp_cross_entropy(cp(**batch.model_inputs()).logits, batch.labels, group=group)
        cp_loss.backward()
        allreduce_gradients(cp, group=group)
        errs = {"loss": abs(cp_loss.item() - ref_loss.item()) / abs(ref_loss.item())}
        ref_params = dict(ref.named_parameters())
        for pname, p in cp.named_parameters():
            errs[pname] = _rel(p.grad, ref_params[pname].grad)
        errs["grad_norm"] = abs(grad_norm(cp) - grad_norm(ref)) / grad_norm(ref)
        out[dt] = errs
    return out


def _check(per_rank):
    for rank, by_dtype in enumerate(per_rank):
        for dt, errs in by_dtype.items():
            bad = {k: v for k, v in errs.items() if not v <= TOL[dt]}
            assert not bad, f"rank {rank} {dt}: {bad} > {TOL[dt]}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("world", [2, 4])
def test_llama_matches_single_process(run_ranks, world, method, layout):
    _check(run_ranks(world, _equivalence, "llama", method, layout, ["float64", "float32"]))


@pytest.mark.skipif("hybrid" not in ctxpar.METHODS, reason="no hierarchical CP")
@pytest.mark.parametrize("world,hcp", [(2, [2, 1]), (2, [1, 2]), (4, [2, 2])])
def test_llama_hybrid_matches_single_process(run_ranks, world, hcp):
    _check(run_ranks(world, _equivalence, "llama", "hybrid", "zigzag", ["float64", "float32"],
                     hcp))


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_qwen_matches_single_process(run_ranks, kind):
    _check(run_ranks(2, _equivalence, kind, "ring", "zigzag", ["float64"]))


def _striped_world_of_one():
    # A world of one (no CP) through the same path, and the `from_config` entry point.
    name = register("ctxpar_test_single", layout="striped")
    cfg = _model("llama", torch.float64).config
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    return model.config._attn_implementation


def test_from_config_accepts_registered_name():
    assert _striped_world_of_one() == "ctxpar_test_single"


def _missing_positions():
    name = register("ctxpar_test_positions", layout="zigzag")
    model = _model("llama", torch.float64)
    model.set_attn_implementation(name)
    batch = shard_batch(torch.zeros(1, SEQ, dtype=torch.long), layout="zigzag")
    try:
        model(input_ids=batch.input_ids)  # forgot position_ids
    except ValueError as e:
        return str(e)
    return None


def test_missing_global_position_ids_is_an_error(run_ranks):
    msgs = run_ranks(2, _missing_positions)
    assert "position_ids" in msgs[1]


def _packed_labels():
    ids = torch.arange(12).unsqueeze(0)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    b = shard_batch(ids, cu_seqlens=cu, layout="contiguous")
    return b.labels.tolist(), b.position_ids.tolist()


def test_shard_batch_packed_documents():
    labels, pos = _packed_labels()
    assert labels == [[1, 2, 3, 4, -100, 6, 7, 8, 9, 10, 11, -100]]
    assert pos == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]


def _packed_equivalence(layout: str, ttt: bool = False) -> dict:
    """Packed documents under CP vs each document run on its own in one process. With
    ``ttt`` the last layer is an In-Place TTT MLP (chunks of 4): the converted decoder layer
    hands it the documents, and with every padded document whole chunks each one starts a
    fresh fast weight, as when run alone."""
    name = register(f"ctxpar_test_packed_{layout}", method="ring", layout=layout)
    ref = _model("llama", torch.float64)
    if ttt:
        from ctxpar.dist.topology import CPGroup
        from ctxpar.ttt import convert

        convert(ref, layers=[1], chunk_size=4, layout=layout, group=CPGroup(None, 0, 1))
        with torch.no_grad():
            ref.model.layers[1].mlp.ttt_conv.normal_(std=0.5)
    cp = copy.deepcopy(ref)
    if ttt:
        cp.model.layers[1].mlp.group = None
    cp.set_attn_implementation(name)
    if not ttt:
        cu = torch.tensor([0, 13, 40, SEQ - 3], dtype=torch.int32)  # odd lengths: padding too
    else:  # zigzag on 2 ranks pads 13 -> 16: pieces of 4 tokens, one chunk each
        cu = torch.tensor([0, 13, 45, 61] if layout == "zigzag" else [0, 16, 48, 64], dtype=torch.int32)
    ids = torch.randint(0, VOCAB, (1, int(cu[-1])), generator=torch.Generator().manual_seed(3))
    total, count = 0.0, 0
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        doc = ids[:, a:b]
        if ttt:  # whole chunks; the extra tokens come last and reach no real token
            doc = torch.cat([doc, doc.new_zeros(1, -(b - a) % 4)], 1)
        logits = ref(input_ids=doc).logits[:, : b - a]
        total = total + F.cross_entropy(logits[0, :-1], ids[0, a + 1:b], reduction="sum")
        count += b - a - 1
    ref_loss = total / count
    ref_loss.backward()
    batch = shard_batch(ids, group=None, layout=layout, cu_seqlens=cu)
    loss = cp_cross_entropy(cp(**batch.model_inputs()).logits, batch.labels)
    loss.backward()
    allreduce_gradients(cp)
    ref_params = dict(ref.named_parameters())
    errs = {n: _rel(p.grad, ref_params[n].grad) for n, p in cp.named_parameters()}
    errs["loss"] = abs(loss.item() - ref_loss.item()) / ref_loss.item()
    return {"float64": errs}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_documents_match_separate_documents(run_ranks, layout):
    _check(run_ranks(2, _packed_equivalence, layout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_documents_with_a_ttt_layer_match_separate_documents(run_ranks, layout):
    _check(run_ranks(2, _packed_equivalence, layout, True))


def test_shard_batch_rejects_left_padding():
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="right-padded"):
        shard_batch(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]]))


def test_register_rejects_builtin_and_unknown():
    with pytest.raises(ValueError):
        register("sdpa")
    with pytest.raises(ValueError):
        register("ctxpar_x", method="nope")
