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

The prompt (:func:`prefill`): each row's real tokens are taken in global order and run a
chunk at a time on the row's own grid (outputs under the fast weight so far, then the
chunk's clipped ΔW), then its open chunk gives the decode state. Under CP the prompt
passes through every rank in global order a shard's length at a time
(:func:`prompt_windows`: one all-reduce of ``[B, S/N, D + F]`` per window): every rank
builds the same state (the chunk work replicated, as the decode is) and the outputs of
its own rows, exact for any padding, in O(S/N·(D + F)) memory.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ctxpar.dist.collectives import all_reduce
from ctxpar.numerics import acc_dtype
from ctxpar.ttt.ops import chunk_delta, clip_delta, without_autocast

__all__ = ["TTTState", "RowStreams", "TTTStates", "row_lengths", "prefill", "decode", "cached_forward",
           "apply_fast_weight", "prompt_windows"]


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

    def rows(self, index: torch.Tensor) -> "RowStreams":
        """The state of rows ``index`` ``[B']`` (beam search reorders, repeats select)."""
        index = index.to(self.delta.device)
        return RowStreams(self.delta[index], self.pending[index], self.t_win[index], self.z_win[index],
                          [self.fill[i] for i in index.tolist()])


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

    @property
    def batch_size(self) -> int | None:
        """Rows of the state (None before the prompt)."""
        return next((s.delta.shape[0] for s in self._states.values()), None)

    def select_rows(self, index: torch.Tensor) -> None:
        """Every layer's state keeps rows ``index`` (:meth:`RowStreams.rows`)."""
        self._states = {layer: state.rows(index) for layer, state in self._states.items()}

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


class _Row:
    """One row's real prompt tokens as they arrive in global order: held until they make a
    chunk, then the chunk's outputs (for this rank's tokens) and its ΔW."""

    def __init__(self, first: int, z, source, local):
        self.first = first  # global position of the row's first real token
        self.z, self.source, self.local = [z[:0]], [source[:0]], [local[:0]]  # typed, empty
        self.held = 0

    def add(self, z, source, local) -> None:
        self.z.append(z)
        self.source.append(source)
        self.local.append(local)
        self.held += z.shape[0]

    def take(self, n: int):
        """The first ``n`` held tokens: ``(z [n, F], source [n, D], local rows [n])`` (the
        pieces are joined once; the rest stays a view, so a long piece is not copied per
        chunk)."""
        z, source, local = (x[0] if len(x) == 1 else torch.cat(x) for x in (self.z, self.source, self.local))
        self.z, self.source, self.local = [z[n:]], [source[n:]], [local[n:]]
        self.held -= n
        return z[:n], source[:n], local[:n]


def _own_outputs(layer, out, b: int, z, local, delta) -> None:
    """``out[b, local[i]]`` = the output of token i, for the tokens this rank holds
    (``local >= 0``), under the fast weight ``delta`` ``[1, D, F]``."""
    mine = local >= 0
    if bool(mine.any()):
        out[b, local[mine]] = apply_fast_weight(layer, z[mine].unsqueeze(0), delta)[0].to(out.dtype)


def _tail(t: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` rows of ``t`` ``[m, X]``, zeros in front when it has fewer."""
    return F.pad(t[max(0, t.shape[0] - n):], (0, 0, max(0, n - t.shape[0]), 0))


@torch.no_grad()
def prefill(layer, z: torch.Tensor, source: torch.Tensor, lengths: list[int], *,
            positions: torch.Tensor | None = None, pieces=None, total: int | None = None):
    """The prompt of ``total`` tokens (default ``S_local``), left-padded with row b's
    ``lengths[b]`` real tokens last -> ``(out [B, S_local, D], RowStreams)``. ``z`` ``[B,
    S_local, F]`` and ``source`` ``[B, S_local, D]`` are this process's rows: the whole
    prompt, or under CP this rank's shard at global ``positions`` ``[S_local]``, with
    ``pieces`` yielding the whole prompt in global order as ``(z [B, n, F], source [B, n,
    D], local [n])`` (``local``: each token's row in the shard, -1 where another rank
    holds it; :func:`prompt_windows`). Every rank builds the same state and the outputs of
    its own rows. Pad rows' outputs are the plain MLP's."""
    bsz, s_local, _ = z.shape
    c, dev = layer.config.chunk_size, z.device
    acc = acc_dtype(layer.down_proj.weight.dtype)
    if positions is None:
        positions = torch.arange(s_local, device=dev)
        pieces = [(z, source, positions)]
    rows = [_Row((total or s_local) - n, z[0], source[0], positions) for n in lengths]
    start = 0
    delta = torch.zeros(bsz, source.shape[2], z.shape[2], dtype=acc, device=dev)
    out = z.new_zeros(bsz, s_local, layer.down_proj.weight.shape[0])
    for zp, sp, local in pieces:
        for b, row in enumerate(rows):
            a = max(0, row.first - start)
            if a < zp.shape[1]:
                row.add(zp[b, a:], sp[b, a:], local[a:])
            while row.held >= c:  # a whole chunk: its outputs, then its ΔW
                zc, sc, lc = row.take(c)
                _own_outputs(layer, out, b, zc, lc, delta[b:b + 1])
                v = layer.targets(sc.unsqueeze(0)).to(acc)
                with without_autocast(dev.type):
                    delta[b] += chunk_delta(v, zc.unsqueeze(0).to(acc), layer.config.clip_tau)[0][0]
        start += zp.shape[1]
    state = _open_chunks(layer, out, rows, delta, lengths)
    pads = positions.view(1, -1) < torch.tensor([r.first for r in rows], device=dev).view(-1, 1)
    if bool(pads.any()):
        out = torch.where(pads.unsqueeze(-1), layer.down_proj(z).to(out.dtype), out)
    return out, state


def _open_chunks(layer, out, rows: list[_Row], delta, lengths: list[int]) -> RowStreams:
    """After the prompt: each row's open chunk (its last ``lengths[b] % C`` tokens, maybe
    none) gives its outputs and the decode state (see the module docstring: only targets
    whose conv window has arrived, ``p <= n - 1 - h``, enter ``pending``)."""
    k = layer.config.conv_kernel
    h, c = k // 2, layer.config.chunk_size
    pending, t_win, z_win = torch.zeros_like(delta), [], []
    for b, row in enumerate(rows):
        zo, so, lo = row.take(row.held)
        _own_outputs(layer, out, b, zo, lo, delta[b:b + 1])
        n = zo.shape[0]
        if n > h:
            v = layer.targets(F.pad(so, (0, 0, 0, c - n)).unsqueeze(0))[0, :n - h].to(delta.dtype)
            with without_autocast(zo.device.type):
                pending[b] = v.transpose(0, 1) @ zo[:n - h].to(delta.dtype)
        t_win.append(_tail(so, k - 1))
        z_win.append(_tail(zo, h))
    return RowStreams(delta, pending, torch.stack(t_win), torch.stack(z_win), [n % c for n in lengths])


def prompt_windows(z: torch.Tensor, source: torch.Tensor, topo, positions: torch.Tensor):
    """Under CP, the whole prompt in global order, ``S_local`` positions at a time, on every
    rank: ``(z [B, S_local, F], source [B, S_local, D], local [S_local])`` (one all-reduce
    per topology level of each window's rows placed in zeros; a sum with zeros is exact).
    A rank holds one window at a time: O(S_local) memory, whatever the layout."""
    bsz, n, d = source.shape
    owner = torch.full((n * topo.size,), -1, dtype=torch.long, device=z.device)
    owner[positions] = torch.arange(n, device=z.device)
    rows = torch.cat([source, z.to(source.dtype)], 2)
    for w0 in range(0, n * topo.size, n):
        window = source.new_zeros(bsz, n, rows.shape[2])
        here = (positions >= w0) & (positions < w0 + n)
        window[:, positions[here] - w0] = rows[:, here]
        for grp in (topo.ulysses, topo.ring):
            all_reduce(grp, window)
        yield window[..., d:].to(z.dtype), window[..., :d], owner[w0:w0 + n]


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


def cached_forward(layer, z, source, states: TTTStates, mask, topo, positions):
    """A converted layer's forward inside ``generate()``: the prompt (this rank's shard
    under CP, rows at ``positions``; ``mask`` the full ``[B, S]`` left padding) or decode
    tokens (the same on every rank)."""
    state = states.get(layer)
    if state is not None:
        out, state = decode(layer, z, source, state)
    else:
        lengths = row_lengths(mask, z.shape[0], z.shape[1] * topo.size)
        if topo.size > 1:
            out, state = prefill(layer, z, source, lengths, positions=positions, total=z.shape[1] * topo.size,
                                 pieces=prompt_windows(z, source, topo, positions))
        else:
            out, state = prefill(layer, z, source, lengths)
    states.set(layer, state)
    return out
