"""Generation state of :class:`~ctxpar.ttt.layer.InPlaceTTTMLP`: per-row fast weights of a
left-padded batch, advanced token by token at O(|W|) work per token.

What a generation cache carries for converted layers is a :class:`TTTStates` (one
:class:`RowStreams` per layer, torch only; the ``transformers`` glue is
:mod:`ctxpar.integrations.ttt_generation`). A converted layer handed such a cache (through
the model-level tap that :func:`ctxpar.ttt.convert` registers) runs :func:`cached_forward`:
the first call is the prompt (:func:`prefill`), later calls are decode tokens
(:func:`decode`), so that every position's output equals the full forward's (exclusive
prefix over chunks: a chunk's delta enters when the chunk completes).

Left padding. Row b of a ``[B, S]`` prompt with ``attention_mask`` zeros then ones holds
``L_b`` real tokens after ``S - L_b`` pads. Pad tokens are left out of the update *and*
the chunk grid of row b starts at its first real token, so a padded row computes what it
computes alone (the release's grid starts at the sequence start; with padding there is no
other choice that keeps a row independent of its batch). Decode tokens always count (HF's
``generate()`` extends the mask with ones).

The incremental update. The conv is centred, k = 2h + 1 taps within the chunk, so the
target v̂_p of chunk position p is final once token p + h has arrived (or the chunk ends:
zeros past its edge). A row keeps ``delta`` = Σ of its completed chunks' ΔW (each clipped),
``pending`` = Σ v̂_p ⊗ z_p over the open chunk's final tokens, the last k - 1 target sources
and the last h activations. A decode token costs one ``[D, F]`` outer product plus
``z (W_0 + η delta)ᵀ``; a token that completes a chunk adds h outer products and folds
``clip(pending)`` into ``delta``: O(|W|) per token whatever the prompt length or chunk size.

Under CP the prompt's activations and target sources are summed into every rank's full
``[B, S, D + F]`` (one all-reduce of rows placed at their global positions) and every rank
computes the rows' chunk grids itself: exact for any padding, replicated as the decode is,
at O(S·(D + F)) memory per rank during the prefill (see README: what is left open).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ctxpar.dist.collectives import all_reduce
from ctxpar.numerics import acc_dtype
from ctxpar.ttt.ops import chunk_delta, clip_delta, without_autocast

__all__ = ["TTTState", "RowStreams", "TTTStates", "row_lengths", "prefill", "decode", "cached_forward",
           "apply_fast_weight"]


@dataclasses.dataclass
class TTTState:
    """The state of :meth:`InPlaceTTTMLP.step` (one grid for the batch): ``delta`` ``[B, D, F]`` is Σ of the completed chunks' ΔW (carry dtype);
    ``t_buf`` ``[B, n, D]`` / ``z_buf`` ``[B, n, F]`` hold the n < C tokens of the open chunk."""

    delta: torch.Tensor
    t_buf: torch.Tensor
    z_buf: torch.Tensor
    position: int = 0


@dataclasses.dataclass
class RowStreams:
    """One layer's state for ``B`` rows: ``delta``/``pending`` ``[B, D, F]`` (carry dtype),
    ``t_win`` ``[B, k-1, D]`` (the open chunk's last target sources, zeros before its
    start), ``z_win`` ``[B, h, F]`` (its last activations) and ``fill`` (tokens in each
    row's open chunk, host ints: they follow from the prompt lengths)."""

    delta: torch.Tensor
    pending: torch.Tensor
    t_win: torch.Tensor
    z_win: torch.Tensor
    fill: list[int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.delta, self.pending, self.t_win, self.z_win))


class TTTStates:
    """The TTT part of a generation cache: a :class:`RowStreams` per converted layer (keyed
    by the layer module), empty until the prompt's forward."""

    def __init__(self):
        self._states: dict = {}

    def get(self, layer) -> RowStreams | None:
        return self._states.get(layer)

    def set(self, layer, state: RowStreams) -> None:
        self._states[layer] = state

    def clear(self) -> None:
        self._states.clear()

    def __len__(self) -> int:
        return len(self._states)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._states.values())


def row_lengths(mask: torch.Tensor | None, batch: int, seq_len: int) -> list[int]:
    """Real tokens per row of a left-padded ``mask`` ``[B, S]`` (zeros, then ones); None:
    all real. ValueError naming the row for any other mask (one host sync, at the prompt)."""
    if mask is None:
        return [seq_len] * batch
    if tuple(mask.shape) != (batch, seq_len):
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not match the prompt "
                         f"({batch}, {seq_len})")
    m = mask.to(torch.bool)
    lengths = m.sum(1)
    left = torch.arange(seq_len, device=m.device) >= (seq_len - lengths).unsqueeze(1)
    bad = (m != left).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"In-Place TTT generation needs left padding (each attention_mask row "
                         f"zeros then ones); row {bad[0]} is {m[bad[0]].int().tolist()}")
    return [int(n) for n in lengths.tolist()]


def _window_target(layer, window: torch.Tensor) -> torch.Tensor:
    """v̂ ``[B, D]`` of the token at the centre of ``window`` ``[B, k, D]`` (the conv taps in
    the order ``F.conv1d`` applies them, then W_proj untransposed as in ``layer.targets``)."""
    v = torch.einsum("bjd,dj->bd", window, layer.ttt_conv[:, 0].to(window.dtype))
    return v if layer.ttt_proj is None else v @ layer.ttt_proj.weight


def apply_fast_weight(layer, z: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``z (W_0 + η delta)ᵀ`` + bias for ``z`` ``[B, n, F]`` and ``delta`` ``[B, D, F]``
    (generation and :meth:`InPlaceTTTMLP.step`): the W_0 matmul as the MLP's (also under
    autocast), the fast-weight part in the carry dtype."""
    acc = delta.dtype
    base = F.linear(z, layer.down_proj.weight, layer.down_proj.bias).to(acc)
    with without_autocast(z.device.type):
        fast = torch.bmm(z.to(acc), delta.transpose(1, 2)) * layer.ttt_eta.to(acc)  # no η·delta copy
    return (base + fast).to(z.dtype)


def _roll(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row b of ``t`` ``[B, S, X]`` rotated left by ``shift[b]``."""
    s = t.shape[1]
    idx = (torch.arange(s, device=t.device) + shift.view(-1, 1)) % s
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[2]))


def _tail(t: torch.Tensor, ends: torch.Tensor, starts: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` rows of ``t`` ``[B, S, X]`` before ``ends[b]``, zero where before ``starts[b]``."""
    idx = ends.view(-1, 1) - n + torch.arange(n, device=t.device)
    keep = (idx >= starts.view(-1, 1)).unsqueeze(-1)
    got = t.gather(1, idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, t.shape[2]))
    return got * keep


@torch.no_grad()
def prefill(layer, z: torch.Tensor, source: torch.Tensor, lengths: list[int]):
    """The prompt: ``z`` ``[B, S, F]``, ``source`` ``[B, S, D]`` left-padded with row b's
    ``lengths[b]`` real tokens last -> ``(out [B, S, D], RowStreams)``. Pad rows' outputs
    are the plain MLP's."""
    bsz, s, _ = z.shape
    c, k = layer.config.chunk_size, layer.config.conv_kernel
    h, acc = k // 2, acc_dtype(layer.down_proj.weight.dtype)
    dev = z.device
    lens = torch.tensor(lengths, device=dev)
    real = (torch.arange(s, device=dev) < lens.view(-1, 1)).unsqueeze(-1)
    zr, sr = _roll(z, s - lens) * real, _roll(source, s - lens) * real  # real tokens first
    pad = -s % c
    zr, sr = F.pad(zr, (0, 0, 0, pad)), F.pad(sr, (0, 0, 0, pad))
    delta = torch.zeros(bsz, source.shape[2], z.shape[2], dtype=acc, device=dev)
    pending = torch.zeros_like(delta)
    outs = []
    for i in range(0, s + pad, c):
        z_i = zr[:, i:i + c]
        outs.append(apply_fast_weight(layer, z_i, delta))
        full = [b for b, n in enumerate(lengths) if n >= i + c]
        open_ = [b for b, n in enumerate(lengths) if i <= n < i + c and n % c]
        if not (full or open_):
            continue
        v_i = layer.targets(sr[:, i:i + c]).to(acc)
        with without_autocast(dev.type):
            if full:
                dw, _ = chunk_delta(v_i[full], z_i[full].to(acc), layer.config.clip_tau)
                delta[full] += dw
            if open_:  # final tokens of the open chunk: p <= n - 1 - h
                last = torch.tensor([lengths[b] - i - 1 - h for b in open_], device=dev)
                keep = (torch.arange(c, device=dev) <= last.view(-1, 1)).unsqueeze(-1)
                pending[open_] = torch.bmm(v_i[open_].transpose(1, 2), (z_i[open_] * keep).to(acc))
    out = _roll(torch.cat(outs, 1)[:, :s], lens - s)
    plain = layer.down_proj(z)
    out = torch.where(real.flip(1), out, plain) if s else out  # pads (now first again): plain MLP
    ends = lens
    starts = lens - lens % c
    state = RowStreams(delta, pending, _tail(sr, ends, starts, k - 1), _tail(zr, ends, starts, h),
                       [n % c for n in lengths])
    return out, state


@torch.no_grad()
def decode(layer, z: torch.Tensor, source: torch.Tensor, state: RowStreams):
    """Tokens after the prompt, ``z`` ``[B, n, F]``, ``source`` ``[B, n, D]`` (every row
    real) -> ``(out [B, n, D], state)``, one token at a time (see the module docstring)."""
    c, clip = layer.config.chunk_size, layer.config.clip_tau
    acc = state.delta.dtype
    outs = []
    for j in range(z.shape[1]):
        z_t, s_t = z[:, j:j + 1], source[:, j:j + 1]
        outs.append(apply_fast_weight(layer, z_t, state.delta))
        tw = torch.cat([state.t_win, s_t], 1)
        zw = torch.cat([state.z_win, z_t], 1)
        with without_autocast(z.device.type):
            v = _window_target(layer, tw).to(acc)
            pending = torch.baddbmm(state.pending, v.unsqueeze(2), zw[:, :1].to(acc))
        fill = [n + 1 for n in state.fill]
        delta = state.delta
        done = [b for b, n in enumerate(fill) if n == c]
        if done:  # the chunk completes: its last h targets see zeros past its edge
            pending, delta = pending.clone(), delta.clone()
            win, zs = tw[done], zw[done]
            part = pending[done]
            for i in range(1, zs.shape[1]):
                win = torch.cat([win[:, 1:], torch.zeros_like(win[:, :1])], 1)
                with without_autocast(z.device.type):
                    part = torch.baddbmm(part, _window_target(layer, win).to(acc).unsqueeze(2),
                                         zs[:, i:i + 1].to(acc))
            delta[done] += clip_delta(part, clip)
            pending[done] = 0
            tw, zw = tw.clone(), zw.clone()
            tw[done], zw[done] = 0, 0
            fill = [0 if n == c else n for n in fill]
        state = RowStreams(delta, pending, tw[:, 1:], zw[:, 1:], fill)
    return torch.cat(outs, 1), state


def gather_prompt(z: torch.Tensor, source: torch.Tensor, topo, positions: torch.Tensor):
    """Every rank's ``z``/``source`` rows at their global ``positions``: ``[B, S, F]``,
    ``[B, S, D]`` on every rank (one all-reduce per topology level of the rows placed in
    zeros; a sum with zeros is exact)."""
    bsz, n, d = source.shape
    full = source.new_zeros(bsz, n * topo.size, d + z.shape[2])
    full[:, positions] = torch.cat([source, z.to(source.dtype)], 2)
    for grp in (topo.ulysses, topo.ring):
        all_reduce(grp, full)
    return full[..., d:].to(z.dtype), full[..., :d]


def cached_forward(layer, z, source, states: TTTStates, mask, topo, positions):
    """A converted layer's forward inside ``generate()``: the prompt (this rank's shard
    under CP, rows at ``positions``; ``mask`` the full ``[B, S]`` left padding) or decode
    tokens (the same on every rank)."""
    state = states.get(layer)
    if state is not None:
        out, state = decode(layer, z, source, state)
    else:
        if topo.size > 1:
            z, source = gather_prompt(z, source, topo, positions)
        out, state = prefill(layer, z, source, row_lengths(mask, z.shape[0], z.shape[1]))
        out = out[:, positions] if topo.size > 1 else out
    states.set(layer, state)
    return out
