"""Parity with the official In-Place TTT release (ByteDance-Seed/In-Place-TTT), issue 13.

``official_mlp`` below is a float64 transcription of the release's formulation, written
from its math and config semantics (not from its code):

- T (``ttt_target``: the MLP input ``hidden_states`` or the token embeddings
  ``input_embed``) and Z = act(x W_gateᵀ) ⊙ (x W_upᵀ) are zero-padded at the end to whole
  chunks of ``ttt_chunk`` tokens;
- Conv is depthwise with a centred kernel ``[D, 1, k]``, zero-padded at every chunk edge;
- V̂ = Conv(T) · W_proj with W_proj ``[D, D]`` used untransposed (``ttt_proj``), or
  V̂ = Conv(T) without projection;
- ΔW_i = V̂_iᵀ Z_i for every chunk but the last; W_(i) = W_0 + ttt_lr · Σ_{j<i} ΔW_j (an
  exclusive cumulative sum over chunks); O_i = Z_i W_(i)ᵀ, cut back to the real length.

The model-level check puts that MLP, under the release's parameter names (``ttt_conv``
an ``nn.Conv1d``, ``ttt_proj`` an ``nn.Linear``), into a copy of a tiny Qwen3 / Llama and
loads the converted model's state dict into it with ``strict=True``.
"""
import copy

import pytest
import torch
from torch import nn

from ctxpar.ttt import InPlaceTTTMLP, convert

transformers = pytest.importorskip("transformers")

C = 8
LENGTHS = (1, C - 1, C, C + 1, 3 * C + 5)
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100, max_position_embeddings=128, num_hidden_layers=3)


def _shifted_conv(t: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise centred conv of ``t`` ``[B, n, C, D]`` within each chunk (zeros outside):
    out[c] = Σ_k kernel[:, k] · t[c + k - k//2]."""
    half, size = kernel.shape[-1] // 2, t.shape[2]
    out = torch.zeros_like(t)
    for k in range(kernel.shape[-1]):
        shift = k - half
        lo, hi = max(0, -shift), min(size, size - shift)
        if hi > lo:
            out[:, :, lo:hi] += t[:, :, lo + shift:hi + shift] * kernel[:, 0, k]
    return out


def official_mlp(x, t, *, w_gate, w_up, w_down, conv, proj, lr, chunk, act=torch.nn.functional.silu):
    """The release's TTT MLP in float64: x, t ``[B, S, D]`` -> ``[B, S, D]`` (module docstring)."""
    x, t = x.double(), t.double()
    z = act(x @ w_gate.double().T) * (x @ w_up.double().T)
    bsz, s, _ = x.shape
    n = -(-s // chunk)
    pad = n * chunk - s
    zc = torch.nn.functional.pad(z, (0, 0, 0, pad)).reshape(bsz, n, chunk, -1)
    tc = torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(bsz, n, chunk, -1)
    v = _shifted_conv(tc, conv.double())
    if proj is not None:
        v = v @ proj.double()
    deltas = torch.einsum("bncd,bncf->bndf", v[:, :-1], zc[:, :-1]) * lr
    w = torch.cat([w_down.double().expand(bsz, 1, *w_down.shape), deltas], 1).cumsum(1)
    out = torch.einsum("bncf,bndf->bncd", zc, w)
    return out.reshape(bsz, n * chunk, -1)[:, :s]


class OfficialMLP(nn.Module):
    """A gated MLP with the release's TTT parameters and names, running :func:`official_mlp`."""

    def __init__(self, mlp, *, lr, chunk, proj: bool, embeddings=None):
        super().__init__()
        d = mlp.down_proj.weight.shape[0]
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.ttt_conv = nn.Conv1d(d, d, 5, padding=2, groups=d, bias=False).double()
        self.ttt_proj = nn.Linear(d, d, bias=False).double() if proj else None
        self.lr, self.chunk, self.embeddings = lr, chunk, embeddings

    def forward(self, x):
        t = x if self.embeddings is None else self.embeddings[0]
        return official_mlp(x, t, w_gate=self.gate_proj.weight, w_up=self.up_proj.weight,
                            w_down=self.down_proj.weight, conv=self.ttt_conv.weight,
                            proj=None if self.ttt_proj is None else self.ttt_proj.weight,
                            lr=self.lr, chunk=self.chunk, act=self.act_fn)


def _tiny(kind: str, **ttt):
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[kind]
    torch.manual_seed(0)
    cfg = cfg_cls(attn_implementation="eager", **SMALL)
    for name, value in ttt.items():  # official-style config attributes
        setattr(cfg, name, value)
    return model_cls(cfg).double().eval()


def _official_twin(model, converted, layers, lr, proj, target):
    """``model``'s copy (taken before convert) with the release's MLPs at ``layers``."""
    twin, embeddings = copy.deepcopy(model), [None]
    if target == "input_embed":
        twin.get_input_embeddings().register_forward_hook(lambda m, a, out: embeddings.__setitem__(0, out))
    for i in layers:
        twin.model.layers[i].mlp = OfficialMLP(twin.model.layers[i].mlp, lr=lr, chunk=C, proj=proj,
                                               embeddings=embeddings if target == "input_embed" else None)
    twin.load_state_dict(converted.state_dict(), strict=True)  # official names and orientation
    return twin


def _randomise(model, layers):
    torch.manual_seed(5)
    with torch.no_grad():
        for i in layers:
            mlp = model.model.layers[i].mlp
            mlp.ttt_conv.normal_(std=0.3)
            if mlp.ttt_proj is not None:
                mlp.ttt_proj.weight.normal_(std=0.2)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("proj,target", [(True, "hidden_states"), (False, "hidden_states"),
                                         (True, "input_embed"), (False, "input_embed")])
def test_converted_model_matches_the_official_formulation(kind, proj, target):
    layers, lr = [0, 2], 3.0
    model = _tiny(kind, ttt_layers=layers, ttt_lr=lr, ttt_chunk=C, ttt_proj=proj, ttt_target=target)
    converted = convert(copy.deepcopy(model))  # every setting from the model config
    assert [i for i, l in enumerate(converted.model.layers) if isinstance(l.mlp, InPlaceTTTMLP)] == layers
    _randomise(converted, layers)
    twin = _official_twin(model, converted, layers, lr, proj, target)
    # ...and back: a fresh conversion loads the official twin's state dict.
    back = convert(copy.deepcopy(model), ttt_layers=layers, ttt_lr=lr, ttt_chunk=C, ttt_proj=proj,
                   ttt_target=target)
    back.load_state_dict(twin.state_dict(), strict=True)
    ids = torch.randint(0, 100, (2, max(LENGTHS)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for s in LENGTHS:
            want = twin(ids[:, :s]).logits
            assert _rel(converted(ids[:, :s]).logits, want) <= 1e-10, (s, "converted")
            assert _rel(back(ids[:, :s]).logits, want) <= 1e-10, (s, "round trip")
        plain = model(ids).logits  # the fast weights matter at this scale
        assert _rel(converted(ids).logits, plain) > 1e-3


def test_default_settings_follow_the_release():
    model = convert(_tiny_layers(13))
    assert [i for i, l in enumerate(model.model.layers) if isinstance(l.mlp, InPlaceTTTMLP)] == [0, 6, 12]
    cfg = model.model.layers[0].mlp.config
    assert (cfg.eta, cfg.learn_eta, cfg.proj, cfg.target, cfg.chunk_size) == (0.3, False, True, "hidden_states", 1024)
    assert (model.config.ttt_mode, model.config.ttt_layers, model.config.ttt_lr) == (True, [0, 6, 12], 0.3)
    assert not any("ttt_eta" in k for k in model.state_dict())
    learn = convert(_tiny_layers(2), learn_eta=True, ttt_lr=3)
    assert isinstance(learn.model.layers[0].mlp.ttt_eta, nn.Parameter) and float(learn.model.layers[0].mlp.ttt_eta.detach()) == 3
    legacy = convert(_tiny_layers(2), target="embeddings")  # earlier names are aliases
    assert legacy.model.layers[0].mlp.config.target == "input_embed"


def _tiny_layers(n: int):
    cfg = transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": n})
    return transformers.LlamaForCausalLM(cfg)


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="conv_kernel must be a positive odd int, got 4"):
        convert(_tiny_layers(2), conv_kernel=4)
    with pytest.raises(ValueError, match="target must be one of .*got 'logits'"):
        convert(_tiny_layers(2), ttt_target="logits")
    with pytest.raises(ValueError, match=r"layers \[2, 9\] out of range for a model with 2 layers"):
        convert(_tiny_layers(2), ttt_layers=[0, 2, 9])
    with pytest.raises(ValueError, match="ttt_lr must be a number, got '3'"):
        convert(_tiny_layers(2), ttt_lr="3")
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        convert(_tiny_layers(2), ttt_chunk=0)
    with pytest.raises(ValueError, match=r"pass one of 'layers' and 'ttt_layers'"):
        convert(_tiny_layers(2), layers=[0], ttt_layers=[1])
    model = convert(_tiny_layers(2), ttt_layers=[1])
    sd = model.state_dict()
    bad = dict(sd, **{"model.layers.1.mlp.ttt_proj.weight": torch.zeros(32, 31)})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.ttt_proj.weight has shape \(32, 31\); .*\(32, 32\)"):
        model.load_state_dict(bad)
    bad = dict(sd, **{"model.layers.1.mlp.ttt_conv.weight": torch.zeros(32, 1, 3)})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.ttt_conv.weight has shape \(32, 1, 3\); .*\(32, 1, 5\)"):
        model.load_state_dict(bad)
    no_proj = convert(_tiny_layers(2), ttt_layers=[1], ttt_proj=False)
    with pytest.raises(ValueError, match="ttt_proj.weight but the layer was built with ttt_proj=False"):
        no_proj.load_state_dict(sd)


def test_earlier_ctxpar_state_dicts_still_load():
    layer = InPlaceTTTMLP(_tiny_layers(1).model.layers[0].mlp, chunk_size=4, learn_eta=False)
    with torch.no_grad():
        layer.ttt_conv.normal_()
    old = {"ttt_conv": layer.ttt_conv.detach().clone(), "ttt_target": torch.randn(32, 32),
           "ttt_eta": torch.tensor(0.7), **{k: v for k, v in layer.state_dict().items() if "proj.weight" in k
                                            and not k.startswith("ttt")}}
    layer.load_state_dict(old, strict=True)
    assert torch.equal(layer.ttt_proj.weight, old["ttt_target"].T) and torch.equal(layer.ttt_target, old["ttt_target"])
    assert float(layer.ttt_eta) == pytest.approx(0.7)
