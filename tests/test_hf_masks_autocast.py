"""The Hugging Face integration refuses a padding mask it cannot honour (transformers would
otherwise drop it silently), and runs under torch.autocast like SDPA."""
import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from ctxpar import shard  # noqa: E402
from ctxpar.integrations.transformers import register, shard_batch  # noqa: E402

VOCAB = 64


def _llama(attn: str, seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def _left_padded(seq: int = 24):
    ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[0, :4] = 0  # left padding in one row
    return ids, mask


def test_a_padding_mask_is_refused_in_one_process():
    model = _llama(register("ctxpar_mask_test"))
    ids, mask = _left_padded()
    with pytest.raises(ValueError, match=r"attention_mask with padding \(zeros at 4 position"):
        model(ids, attention_mask=mask)


def test_an_all_ones_mask_equals_sdpa_in_one_process():
    ids, mask = _left_padded()
    ref = _llama("sdpa")(ids).logits
    got = _llama(register("ctxpar_mask_test"))(ids, attention_mask=torch.ones_like(mask)).logits
    assert (got - ref).abs().max() < 1e-5


def _padding_mask_under_cp():
    name = register("ctxpar_mask_cp", method="ring", layout="zigzag")
    model = _llama(name)
    ids, mask = _left_padded(6 * dist.get_world_size())
    batch = shard_batch(ids)
    local_mask = torch.ones_like(batch.input_ids)
    local_mask[0, 0] = 0
    try:
        model(**batch.model_inputs(), attention_mask=local_mask)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("world", [2, 3])
def test_a_padding_mask_is_refused_on_every_rank(run_ranks, world):
    for text in run_ranks(world, _padding_mask_under_cp):
        assert "cannot honour a padding mask" in text, text


def _autocast_logits(world_attn):
    n = dist.get_world_size() if dist.is_initialized() else 1
    ids, _ = _left_padded(8 * max(n, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _llama("sdpa")(ids).logits.float()
        name = register("ctxpar_autocast", method=world_attn)
        batch = shard_batch(ids)
        model = _llama(name)
        got = model(**batch.model_inputs()).logits.float()
    got.sum().backward()

    err = (got - shard(ref)).abs().max() / ref.abs().max()
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    return float(err), grads_ok


def test_autocast_matches_sdpa_in_one_process():
    err, grads_ok = _autocast_logits("ring")
    assert err < 2e-2 and grads_ok


@pytest.mark.parametrize("method", ["ring", "ulysses", "allgather"])
def test_autocast_matches_sdpa_under_cp(run_ranks, method):
    for err, grads_ok in run_ranks(2, _autocast_logits, method):
        assert err < 2e-2 and grads_ok
