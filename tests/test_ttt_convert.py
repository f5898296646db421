"""Drop-in conversion of tiny random Hugging Face models (no downloads): identical logits
after convert, and a training run whose TTT MLPs run sharded under CP on 2 ranks."""
import pytest
import torch
from torch import nn

import ctxpar
from ctxpar.dist.collectives import all_reduce
from ctxpar.dist.topology import resolve
from ctxpar.ttt import InPlaceTTTMLP, convert

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100, max_position_embeddings=128)


def _model(kind="llama", layers=2, seed=0):
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    cfg = cfg_cls(num_hidden_layers=layers, attn_implementation="eager", **SMALL)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_convert_keeps_logits_and_names(kind):
    model = _model(kind, layers=6)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    old_keys = set(model.state_dict())
    old_mlp = model.model.layers[0].mlp
    convert(model, chunk_size=8)
    converted = [i for i, l in enumerate(model.model.layers) if isinstance(l.mlp, InPlaceTTTMLP)]
    assert converted == [0]  # i % 6 == 0 by default, as the release (was 5, 11, ...: issue 13)
    assert model.model.layers[0].mlp.down_proj is old_mlp.down_proj  # reused, not copied
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    new_keys = set(model.state_dict()) - old_keys
    assert old_keys <= set(model.state_dict())  # pretrained checkpoints still load
    # The release's names (issue 13); a fixed ttt_lr (the default) is not in the state dict.
    assert new_keys == {f"model.layers.0.mlp.{n}" for n in ("ttt_conv.weight", "ttt_proj.weight")}


def test_convert_options_and_errors():
    model = _model(layers=3)
    convert(model, layers=[0, 2], chunk_size=4, learn_eta=False, target="embeddings")
    names = {n for n, p in model.named_parameters() if "ttt_" in n}
    assert names == {f"model.layers.{i}.mlp.{n}" for i in (0, 2) for n in ("ttt_conv", "ttt_proj.weight")}
    ids = torch.randint(0, 100, (1, 16))
    model(ids)  # the embedding hook feeds the target
    with pytest.raises(ValueError, match="already converted"):
        convert(model, layers=[0])
    assert model.config.ttt_layers == [0, 2] and model.config.ttt_target == "input_embed"
    with pytest.raises(ValueError, match=r"layers \[7\] out of range"):
        convert(_model(layers=2), layers=[7])


def test_document_boundaries_reach_the_mlp_only_during_its_layer():
    model = _model(layers=1)
    convert(model, layers=[0], chunk_size=4)
    layer, seen = model.model.layers[0], []
    layer.mlp.register_forward_pre_hook(lambda m, args: seen.append(m._document_tap.value))
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    model(torch.randint(0, 100, (1, 16)), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8)
    assert seen and torch.equal(seen[0], cu) and layer.mlp._document_tap.value is None
    with pytest.raises(Exception):  # a layer that raises still clears the boundaries
        layer(torch.zeros(1, 16, 3), cu_seq_lens_q=cu)
    assert layer.mlp._document_tap.value is None


# --------------------------------------------------------------------- training under CP


class _SumGradOverRanks(torch.autograd.Function):
    """Identity; the backward sums the gradient over the CP group. Upstream of a sharded
    block every rank then holds the full (replicated) gradient again."""

    @staticmethod
    def forward(ctx, x, grp):
        ctx.grp = grp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(ctx.grp, grad.contiguous().clone()), None


class _ShardedTTT(nn.Module):
    """Runs an InPlaceTTTMLP on this rank's shard of a replicated hidden state (the rest of
    the tiny model, attention included, runs replicated on the full sequence)."""

    def __init__(self, inner: InPlaceTTTMLP, layout: str):
        super().__init__()
        self.inner, self.layout = inner, layout

    def forward(self, h):
        grp = resolve(None).ring
        local = ctxpar.shard(_SumGradOverRanks.apply(h, grp), layout=self.layout)
        return ctxpar.unshard(self.inner(local), layout=self.layout)


def _train_rank(layout, steps=6):
    grp = resolve(None).ring
    model = _model(layers=3, seed=1).train()
    # The decoder layers run on the full sequence (their position ids are all of it); only
    # _ShardedTTT hands the TTT MLP a shard, so the ids do not describe its input.
    convert(model, layers=[0, 2], chunk_size=4, layout=layout, eta=0.5, check_positions=False)
    ttt_params = []
    for i in (0, 2):
        mlp = model.model.layers[i].mlp
        with torch.no_grad():
            mlp.ttt_conv.normal_(std=0.2)  # away from init so the fast weights matter
        ttt_params += list(mlp.parameters())
        model.model.layers[i].mlp = _ShardedTTT(mlp, layout)
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        for p in ttt_params:  # per-rank shares of the TTT layers' gradients
            all_reduce(grp, p.grad)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_trains_under_cp_on_two_ranks(run_ranks, layout):
    cp = run_ranks(2, _train_rank, layout)
    single = run_ranks(1, _train_rank, layout)[0]
    assert cp[0] == cp[1]  # replicated loss
    assert cp[0][-1] < cp[0][0] - 0.05, cp[0]
    torch.testing.assert_close(torch.tensor(cp[0]), torch.tensor(single), rtol=1e-4, atol=1e-5)
