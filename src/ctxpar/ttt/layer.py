"""In-Place Test-Time Training (arXiv 2604.06169) for gated MLPs, under context parallelism.

The math (one sequence; B sequences of a batch are independent)
----------------------------------------------------------------
H ``[S, D]`` is the MLP input, F = d_ff, C the chunk size, chunk i the rows [iC, (i+1)C).

- Gated MLP: ``Z = act(H W_gateᵀ) ⊙ (H W_upᵀ)``, ``[S, F]``; act = SiLU by default.
- Target: ``V̂ = Conv(T) W_proj``, ``[S, D]``, with W_proj ``[D, D]`` used untransposed as
  in the official release (``ttt_proj``; ``proj=False``: V̂ = Conv(T)). T is the MLP input
  (``target="hidden_states"``, default, for continual training of a pretrained model) or
  the token embeddings (``"input_embed"``). Conv is depthwise, kernel 5, centred (two
  tokens back, two ahead), zero-initialised, and zero-padded at *chunk* edges: it never
  crosses a chunk boundary, since a conv across chunks would leak token t+1 into the
  weights used at t. W_proj starts as a small random diagonal.
- Update: ``ΔW_i = V̂_iᵀ Z_i`` ``[D, F]`` (the shape of W_down), optionally scaled to Frobenius
  norm ≤ τ.
- Apply: ``W_(i) = W_0 + η Σ_{j<i} ΔW_j`` (an *exclusive* prefix: a chunk never sees its own
  delta), ``O_i = Z_i W_(i)ᵀ``, W_0 = down_proj.weight, η a learnable or fixed scalar.
- At init the conv is zero, so V̂ = 0, ΔW = 0 and the layer equals the wrapped MLP exactly.
- Any length: a trailing partial chunk uses W_(i) of the chunks before it and its delta
  feeds no later chunk (the release zero-pads to whole chunks; so does this layer on one
  process). Under CP every run of every shard must be whole chunks: pad the batch
  (``shard_batch(..., multiple_of=chunk_size)``), else a ValueError names the length.

Packed documents (``cu_seqlens``: the original global boundaries ``[0, l1, l1+l2, ..., S]``,
tokens sharded by :func:`ctxpar.shard_packed`, the same convention as attention): chunks
are counted on the padded sequence that ``shard_packed`` lays out, and chunk i *resets*
when a document starts inside it, ``iC <= start < (i+1)C``. A reset chunk and the chunks
after it see only deltas from the reset chunk on: W_(i) = W_0 for the reset chunk itself.
Deltas are per chunk, so the reset chunk's own delta (which may hold the previous
document's last tokens) still feeds the next chunks of the new document. When every
(padded) document is whole chunks, each document starts on a chunk boundary and is
computed exactly as if it ran alone. zigzag pads each document to a multiple of 2N and
splits it in 2N pieces, so that needs documents padding to multiples of 2N·C.

Context parallelism: each rank holds blocks of whole chunks, one per run of consecutive
tokens of its shard (one for ``layout="contiguous"``, two for ``"zigzag"``; on a
hierarchical mesh, the runs of its piece of the ring rank's shard; with packed zigzag,
two pieces per document, merged where they touch). Block summaries are combined by an exclusive
(segmented) scan over the global block order, :mod:`ctxpar.scan`; see :mod:`ctxpar.ttt.ops`
for the fast path, its backward and its memory.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ctxpar.dist.agreement import VerifiedSignatures
from ctxpar.dist.collectives import all_reduce
from ctxpar.dist.topology import resolve
from ctxpar.numerics import acc_dtype
from ctxpar.scan import ALGORITHMS
from ctxpar.sequence.layouts import get_layout
from ctxpar.sequence.spec import ShardSpec
from ctxpar.ttt.checks import check_agreement, positions_error
from ctxpar.ttt.names import rename_for_save, translate_for_load
from ctxpar.ttt.ops import TTTApply, chunk_delta, without_autocast
from ctxpar.ttt.plan import Plan, build_plan, extend_last_document
from ctxpar.ttt.stream import TTTState, apply_fast_weight, cached_forward

__all__ = ["TTTConfig", "InPlaceTTTMLP", "TTTState"]

TARGETS = ("hidden_states", "input_embed")  # the release's ``ttt_target`` values
TARGET_ALIASES = {"mlp_input": "hidden_states", "embeddings": "input_embed"}  # earlier names


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """Options of :class:`InPlaceTTTMLP` (validated on construction)."""

    chunk_size: int = 1024
    target: str = "hidden_states"      # or "input_embed" (aliases "mlp_input", "embeddings")
    proj: bool = True                  # ttt_proj: V̂ = Conv(T) W_proj; False: V̂ = Conv(T)
    conv_kernel: int = 5               # odd: centred on the token
    eta: float = 1e-2                  # initial η
    learn_eta: bool = True             # η is a Parameter (else a buffer)
    clip_tau: float | None = None      # Frobenius clip of each chunk's ΔW
    target_init_std: float = 0.02      # std of W_target's random diagonal
    layout: str = "zigzag"             # CP sequence layout: "zigzag" (the library's default:
                                       # ctxpar.shard, attention, shard_batch) or "contiguous"
    scan_algorithm: str = "allgather"  # see ctxpar.scan.ALGORITHMS
    overlap: bool = True               # see ctxpar.ttt.ops: gather during the chunk loop
    check_args: bool = True            # one small all-gather per call: shapes agree across ranks
    check_positions: bool = True       # position ids at hand must fit the layout (ttt.checks)

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        target = TARGET_ALIASES.get(self.target, self.target) if isinstance(self.target, str) else None
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS} (or the aliases "
                             f"{tuple(TARGET_ALIASES)}), got {self.target!r}")
        object.__setattr__(self, "target", target)  # one name per target from here on
        if not isinstance(self.proj, bool):
            raise ValueError(f"proj must be a bool, got {self.proj!r}")
        if not isinstance(self.conv_kernel, int) or self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be a positive odd int, got {self.conv_kernel!r}")
        if not math.isfinite(self.eta):
            raise ValueError(f"eta must be finite, got {self.eta!r}")
        if self.clip_tau is not None and not (self.clip_tau > 0 and math.isfinite(self.clip_tau)):
            raise ValueError(f"clip_tau must be None or a positive finite number, got {self.clip_tau!r}")
        if not self.target_init_std >= 0:
            raise ValueError(f"target_init_std must be >= 0, got {self.target_init_std!r}")
        if not get_layout(self.layout).consecutive_runs:
            raise ValueError(
                f"layout={self.layout!r} is not supported by In-Place TTT: a rank of it holds no "
                f"run of consecutive tokens, so no chunk lives on one rank; use "
                f"layout='contiguous' or 'zigzag'")
        if self.scan_algorithm not in ALGORITHMS:
            raise ValueError(f"scan_algorithm must be one of {ALGORITHMS}, got {self.scan_algorithm!r}")


class InPlaceTTTMLP(nn.Module):
    """A gated MLP whose down projection is a fast weight (see the module docstring).

    ``mlp`` needs ``gate_proj``, ``up_proj``, ``down_proj`` (``nn.Linear``) and optionally
    ``act_fn`` (SiLU if absent). Its submodules are reused, not copied: their parameters keep
    their names (``gate_proj.weight``, ...) and ``requires_grad``. New parameters, all
    trainable: ``ttt_conv`` ``[D, 1, k]`` (zeros; saved as ``ttt_conv.weight``),
    ``ttt_proj.weight`` ``[D, D]`` (W_proj, unless ``proj=False``) and ``ttt_eta`` (a
    non-persistent buffer instead if ``learn_eta=False``); state dicts follow the release,
    see :mod:`ctxpar.ttt.names`. The layer-level defaults (η learnable from 0.01) are
    ctxpar's; :func:`ctxpar.ttt.convert` uses the release's (fixed ``ttt_lr`` 0.3).

    ``forward(x [B, S_local, D], *, embeddings=None, cu_seqlens=None) -> [B, S_local, D]``.
    Under CP, ``x`` is this rank's shard in ``layout`` order on ``group`` (a ProcessGroup,
    1-D DeviceMesh or CPGroup; None = WORLD if initialised, else one process; or a
    hierarchical ``("ring", "ulysses")`` mesh from :func:`ctxpar.cp_mesh`, sharded as
    :func:`ctxpar.shard` does on it, with ``scan_algorithm="allgather"``). Parameter
    gradients are this rank's share: sum them over the group, as for any replicated weight.
    Under ``torch.autocast`` the output (of forward and step) has the autocast dtype, as the
    wrapped MLP's would, while the fast-weight accumulators, carries and streaming state stay
    float32 (:mod:`ctxpar.ttt.ops`).
    """

    def __init__(self, mlp: nn.Module, *, config: TTTConfig | None = None, group=None, **options):
        super().__init__()
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(TTTConfig)})
        if unknown:
            raise ValueError(f"unknown InPlaceTTTMLP option(s) {unknown}; see TTTConfig")
        cfg = dataclasses.replace(config or TTTConfig(), **options)
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not isinstance(getattr(mlp, name, None), nn.Linear):
                raise ValueError(f"InPlaceTTTMLP wraps a gated MLP with nn.Linear {name}; "
                                 f"{type(mlp).__name__} has {type(getattr(mlp, name, None)).__name__}")
        self.config, self.group = cfg, group
        # The signatures this layer's agreement check has passed: each is checked once
        # (no collective, no device read on later calls; ctxpar.ttt.checks).
        self._verified = VerifiedSignatures()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = getattr(mlp, "act_fn", None) or nn.SiLU()
        w0 = self.down_proj.weight
        d = w0.shape[0]
        kw = dict(dtype=w0.dtype, device=w0.device)
        self.ttt_conv = nn.Parameter(torch.zeros(d, 1, cfg.conv_kernel, **kw))
        diag = torch.randn(d, dtype=torch.float32, device=w0.device) * cfg.target_init_std
        self.ttt_proj = None
        if cfg.proj:  # skip_init: no draw from the RNG beyond the diagonal's
            self.ttt_proj = nn.utils.skip_init(nn.Linear, d, d, bias=False, **kw)
            with torch.no_grad():
                self.ttt_proj.weight.copy_(torch.diag(diag))
        eta = torch.tensor(float(cfg.eta), **kw)
        if cfg.learn_eta:
            self.ttt_eta = nn.Parameter(eta)
        else:  # the release keeps ttt_lr in its config, not in the state dict
            self.register_buffer("ttt_eta", eta, persistent=False)
        self._embedding_tap = None  # set by convert(ttt_target="input_embed")
        self._document_tap = None  # set by convert(): the decoder layer's packed documents
        self._generation_tap = None  # set by convert(): the cache's TTT state in generate()

    def extra_repr(self) -> str:
        c = self.config
        return (f"chunk_size={c.chunk_size}, target={c.target!r}, proj={c.proj}, layout={c.layout!r}, "
                f"clip_tau={c.clip_tau}, scan={c.scan_algorithm!r}")

    @property
    def ttt_target(self) -> torch.Tensor | None:
        """W_target = W_projᵀ ``[D, D]`` (a view of ``ttt_proj.weight``; None without
        projection): the earlier name and orientation, V̂ = Conv(T) W_targetᵀ."""
        return None if self.ttt_proj is None else self.ttt_proj.weight.t()

    # ------------------------------------------------------------- state dict (names.py)
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        rename_for_save(destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        translate_for_load(state_dict, prefix, conv_shape=self.ttt_conv.shape,
                           proj_shape=None if self.ttt_proj is None else self.ttt_proj.weight.shape,
                           eta=self.ttt_eta, learn_eta=self.config.learn_eta)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -------------------------------------------------------------------------- pieces
    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Z = act(x W_gateᵀ) ⊙ (x W_upᵀ): ``[B, S, F]``."""
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def targets(self, t: torch.Tensor) -> torch.Tensor:
        """V̂ = Conv(t) W_proj (W_proj untransposed, as the release; V̂ = Conv(t) with
        ``proj=False``) for ``t`` ``[B, S, D]`` with S a multiple of the chunk size; the
        conv is zero-padded at every chunk edge."""
        bsz, s, d = t.shape
        c = self.config.chunk_size
        chunks = t.reshape(bsz * (s // c), c, d).transpose(1, 2)
        conv = F.conv1d(chunks, self.ttt_conv, padding=self.config.conv_kernel // 2, groups=d)
        conv = conv.transpose(1, 2).reshape(bsz, s, d)
        return conv if self.ttt_proj is None else torch.matmul(conv, self.ttt_proj.weight)

    def _target_source(self, x, embeddings):
        if self.config.target == "hidden_states":
            return x
        if embeddings is None and self._embedding_tap is not None:
            embeddings = self._embedding_tap.value
        if embeddings is None or embeddings.shape != x.shape:
            raise ValueError(f"target='input_embed' needs embeddings shaped like the input "
                             f"{tuple(x.shape)}; got {None if embeddings is None else tuple(embeddings.shape)}")
        return embeddings

    def plan(self, local_len: int, cu_seqlens=None) -> Plan:
        """This rank's blocks of chunks, with their reset flags (see :func:`build_plan`)."""
        return build_plan(self.config, resolve(self.group), local_len, cu_seqlens)

    # ------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, embeddings=None, cu_seqlens=None,
                position_ids=None) -> torch.Tensor:
        """``x``: ``[B, S_local, D]``. ``cu_seqlens``: the original global boundaries of packed
        documents, with ``x`` sharded by :func:`ctxpar.shard_packed` (as for attention); a
        chunk where a document starts restarts the fast weight. ``position_ids``
        (``[..., S_local]``, optional): the positions ``x`` was sharded with, as
        :func:`ctxpar.position_ids` or ``shard_packed`` give them; under CP they must fit
        ``layout``, else ValueError on every rank (see :mod:`ctxpar.ttt.checks`: the layer
        cannot otherwise see how ``x`` was sharded). Inside a model converted by
        :func:`convert` both come from the decoder layer's ``cu_seq_lens_q`` and
        ``position_ids`` keywords."""
        tap = self._document_tap
        if cu_seqlens is None and tap is not None:
            cu_seqlens = tap.value
        if position_ids is None and tap is not None:
            position_ids = tap.positions
        if x.dim() != 3:
            raise ValueError(f"expected x of shape [batch, seq, hidden], got {tuple(x.shape)}")
        gen = self._generation_tap
        if gen is not None and gen.states is not None:  # generate(): see ctxpar.ttt.stream
            return self._cached_forward(x, embeddings, gen)
        source = self._checked_target_source(x, embeddings, cu_seqlens, position_ids)
        if x.shape[1] == 0:  # every rank (the check above) has no tokens: nothing to scan
            self.plan(0, cu_seqlens)
            return self.down_proj(self.activations(x))
        z = self.activations(x)
        s, pad = x.shape[1], self._tail_padding(x.shape[1])
        if pad:  # zero rows: no ΔW, and the conv sees zeros past the end, as the release
            z, source = F.pad(z, (0, 0, 0, pad)), F.pad(source, (0, 0, 0, pad))
            cu_seqlens = extend_last_document(cu_seqlens, s + pad)
        plan = self.plan(s + pad, cu_seqlens)
        v = self.targets(source)
        out = TTTApply.apply(z, v, self.down_proj.weight, self.down_proj.bias, self.ttt_eta, plan)
        return out[:, :s] if pad else out

    def _cached_forward(self, x, embeddings, gen):
        """Inside ``generate()`` (a cache with TTT state): the prompt, or decode tokens."""
        topo = resolve(self.group)
        if topo.size > 1 and gen.layout is not None and gen.layout != self.config.layout:
            raise ValueError(f"the generation cache shards the prompt with layout={gen.layout!r}, "
                             f"this TTT layer expects layout={self.config.layout!r}")
        prompt = gen.states.get(self) is None and topo.size > 1
        pos = self._positions(topo, x.shape[1], x.device) if prompt else None
        return cached_forward(self, self.activations(x), self._target_source(x, embeddings),
                              gen.states, gen.mask, topo, pos)

    def _tail_padding(self, local_len: int) -> int:
        """Rows that complete a trailing partial chunk on one process (0 under CP, where
        the shard must already be whole chunks: pad the batch, see :func:`build_plan`).
        The partial chunk's tokens use the weight of the chunks before them and its delta
        feeds no later chunk, so the padding changes no real output."""
        if resolve(self.group).size > 1:
            return 0
        return -local_len % self.config.chunk_size

    # ----------------------------------------------------------------------- streaming
    @torch.no_grad()
    def prefill_state(self, x: torch.Tensor, *, embeddings=None, length: int | None = None) -> TTTState:
        """The streaming state after a prefill: ``x`` is this rank's shard ``[B, S_local, D]``
        of the prompt, as given to :meth:`forward` (on one process, any length). Every rank
        gets the same state (Σ of the whole chunks' ΔW: the chunk sums are additive, so one
        all-reduce of a ``[B, D, F]`` carry), ready for :meth:`step` on the tokens that
        follow, on any process. ``length`` (the same on every rank): the prompt's real
        length when the shards hold a prompt padded at its end (``shard_batch(...,
        multiple_of=chunk_size)``); default all of it. The padding is left out, and the real
        tokens of a trailing partial chunk become the state's open chunk (under CP one more
        all-reduce, of ``[B, < C, D + F]``)."""
        topo = resolve(self.group)
        source = self._checked_target_source(x, embeddings, None)
        c, z = self.config.chunk_size, self.activations(x)
        pad = self._tail_padding(x.shape[1])
        self.plan(x.shape[1] + pad)  # under CP: checks that the shard is whole chunks
        total = x.shape[1] * topo.size
        length = total if length is None else length
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= total:
            raise ValueError(f"length must be an int in [0, {total}] (the prompt's tokens), got {length!r}")
        whole = length - length % c
        if pad:
            z, source = F.pad(z, (0, 0, 0, pad)), F.pad(source, (0, 0, 0, pad))
        pos = self._positions(topo, z.shape[1], z.device)
        delta = self._prompt_delta(source, z.masked_fill((pos >= whole).view(1, -1, 1), 0))
        for grp in (topo.ulysses, topo.ring):
            all_reduce(grp, delta)
        tail = (pos >= whole) & (pos < length)
        t_buf, z_buf = (t.new_zeros(t.shape[0], length - whole, t.shape[2]) for t in (source, z))
        t_buf[:, pos[tail] - whole], z_buf[:, pos[tail] - whole] = source[:, tail], z[:, tail]
        if length > whole:  # the open chunk lives on one rank: sum it into every rank's
            for buf in (t_buf, z_buf):
                for grp in (topo.ulysses, topo.ring):
                    all_reduce(grp, buf)
        return TTTState(delta, t_buf, z_buf, length)

    def _positions(self, topo, local_len: int, device) -> torch.Tensor:
        """Global positions ``[S_local]`` of this rank's rows under the layer's layout."""
        if topo.size == 1:
            return torch.arange(local_len, device=device)
        return ShardSpec.make(get_layout(self.config.layout), topo, local_len, None).positions(topo.rank, device)

    def _prompt_delta(self, source: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Σ over this rank's chunks of ΔW_i ``[B, D, F]`` in the carry dtype (rows of ``z``
        zeroed where they must not count); S a multiple of the chunk size."""
        c, acc = self.config.chunk_size, acc_dtype(self.down_proj.weight.dtype)
        v = self.targets(source)
        with without_autocast(z.device.type):  # the carry stays in acc, also under autocast
            if self.config.clip_tau is None:  # Σ_i V̂_iᵀ Z_i is one product over all rows
                return torch.bmm(v.to(acc).transpose(1, 2), z.to(acc)).contiguous()
            delta = z.new_zeros(z.shape[0], v.shape[2], z.shape[2], dtype=acc)
            for i in range(0, z.shape[1], c):
                delta += chunk_delta(v[:, i:i + c].to(acc), z[:, i:i + c].to(acc), self.config.clip_tau)[0]
            return delta

    def _checked_target_source(self, x, embeddings, cu_seqlens, position_ids=None):
        """The target source, after the cross-rank agreement check (``check_args``,
        :func:`~ctxpar.ttt.checks.check_agreement`): different shard shapes or options on two
        ranks would give them different plans, so wrong carries or a hung collective; they
        fail on every rank instead (ValueError naming the ranks). A bad ``embeddings``
        argument and position ids that do not fit the layout are checked fields, so a rank
        never raises them alone while its peers wait."""
        topo = resolve(self.group)
        try:
            source, error = self._target_source(x, embeddings), None
        except ValueError as e:
            source, error = None, e
        local = {"target source": error,
                 "position_ids": positions_error(self.config, topo, x.shape[1], cu_seqlens, position_ids)}
        check_agreement(self.config, topo, x, self.ttt_eta, cu_seqlens, local, self._verified)
        return source

    def step(self, x: torch.Tensor, state: TTTState | None = None, *, embeddings=None):
        """Streaming prefill/decode: ``x`` ``[B, n, D]`` (a prompt or one token, the full
        tokens, not a shard) -> ``(out [B, n, D], state)``. A chunk's delta enters the fast
        weight when the chunk completes (its conv looks ahead within the chunk), so the
        outputs equal the full-sequence forward. No communication: after a CP prefill
        (:meth:`prefill_state`) any process can decode. Document resets: a fresh state."""
        if state is None and resolve(self.group).size > 1:
            raise ValueError("step() without a state starts a sequence on one process, but this "
                             f"layer's group has {resolve(self.group).size} ranks; prefill "
                             "under CP with forward() and prefill_state(), then step() from that state")
        c = self.config.chunk_size
        w0 = self.down_proj.weight
        acc = acc_dtype(w0.dtype)
        bsz, d, nf = x.shape[0], w0.shape[0], w0.shape[1]
        if state is None:
            state = TTTState(torch.zeros(bsz, d, nf, dtype=acc, device=x.device),
                             x.new_zeros(bsz, 0, d), x.new_zeros(bsz, 0, nf))
        t_all, z_all = self._target_source(x, embeddings), self.activations(x)
        outs, pos = [], 0
        while pos < x.shape[1]:
            take = min(c - state.t_buf.shape[1], x.shape[1] - pos)
            z_r = z_all[:, pos:pos + take]
            outs.append(apply_fast_weight(self, z_r, state.delta))
            t_buf = torch.cat([state.t_buf, t_all[:, pos:pos + take]], 1)
            z_buf = torch.cat([state.z_buf, z_r], 1)
            delta = state.delta
            if t_buf.shape[1] == c:  # the chunk is complete: fold its delta in
                v_buf = self.targets(t_buf)
                with without_autocast(x.device.type):
                    dw, _ = chunk_delta(v_buf.to(acc), z_buf.to(acc), self.config.clip_tau)
                delta, t_buf, z_buf = delta + dw, t_buf[:, :0], z_buf[:, :0]
            state = TTTState(delta, t_buf, z_buf, state.position + take)
            pos += take
        if not outs:  # no tokens: nothing to apply, the state as it was
            return z_all.new_zeros(bsz, 0, d), state
        return torch.cat(outs, 1), state

