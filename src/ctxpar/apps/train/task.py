"""The synthetic long-context task of ``ctxpar train``: key-value recall across the sequence.

Each sequence is generated on the fly from ``(seed, step)``, identically on every rank:

- **context** (positions ``[0, S - Q - 1)``): filler (one blank token by default), among
  which every one of the
  ``n_keys`` keys appears exactly once as a *pair token* ``(key, value)`` at a random
  position, with a value drawn at random per sequence;
- **queries** (positions ``[S - Q - 1, S - 1)``): ``Q`` query tokens ``?key``, each asking
  for the value that the context paired with ``key``; the answer is only a label (it is
  never an input), so a query cannot copy it from an earlier query: it must attend to the
  pair token, which is usually far away and, under CP, often on another rank;
- the last position is filler.

A key and its value share one token (the ``n_keys x n_values`` pair tokens) so that the
task is a single attention hop: a query's vector must match the pair token of its key and
read the value out of it. A tiny model learns this within a few hundred steps, where the
two-token ``key value`` form needs an induction circuit (two composed heads) and sits on
a long loss plateau first. Chance accuracy is ``1 / n_values``.

Labels follow the causal-LM convention of :func:`ctxpar.integrations.transformers.shard_batch`:
*unshifted*, ``labels[t + 1]`` is the target of position ``t``, so the label of a query at
``t`` sits at ``t + 1``; every other label is ``-100``.
"""
from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["RecallTask", "RecallBatch", "length_schedule", "lr_at", "build_model",
           "single_process_reference"]

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class RecallBatch:
    """One batch: ``input_ids``/``labels`` ``[B, S]`` (labels unshifted), and per query its
    position ``query_pos`` and the position of the pair token holding its answer,
    ``source_pos`` (both ``[B, Q]``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    query_pos: torch.Tensor
    source_pos: torch.Tensor


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """Vocabulary: ``[0, n_filler)`` filler, then the ``n_keys * n_values`` pair tokens,
    then ``n_keys`` query tokens, then ``n_values`` answer tokens."""

    seq_len: int
    n_keys: int = 8
    n_values: int = 16
    n_filler: int = 1
    n_queries: int = 0  # 0: seq_len // 8
    copy: bool = True  # the answer is the pair token itself (else a separate value token)

    def __post_init__(self) -> None:
        q = self.queries
        if self.seq_len - q - 1 < self.n_keys or q < 1:
            raise ValueError(f"seq_len {self.seq_len} is too short for {self.n_keys} keys and "
                             f"{q} queries")

    @property
    def queries(self) -> int:
        return self.n_queries or max(1, self.seq_len // 8)

    @property
    def pair0(self) -> int:
        return self.n_filler

    @property
    def query0(self) -> int:
        return self.pair0 + self.n_keys * self.n_values

    @property
    def answer0(self) -> int:
        return self.query0 + self.n_keys

    @property
    def vocab_size(self) -> int:
        return self.answer0 + self.n_values

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def batch(self, seed: int, step: int, batch_size: int) -> RecallBatch:
        """The batch for ``step`` of a run seeded ``seed`` (deterministic, CPU tensors)."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF)
        s, q, k, v = self.seq_len, self.queries, self.n_keys, self.n_values
        ctx = s - q - 1
        ids = torch.randint(0, self.n_filler, (batch_size, s), generator=g)
        labels = torch.full((batch_size, s), IGNORE, dtype=torch.long)
        qpos = torch.arange(ctx, ctx + q).expand(batch_size, q)
        srcs = torch.empty(batch_size, q, dtype=torch.long)
        for b in range(batch_size):
            values = torch.randint(0, v, (k,), generator=g)
            where = torch.randperm(ctx, generator=g)[:k]  # position of key i's pair token
            ids[b, where] = self.pair0 + torch.arange(k) * v + values
            asked = torch.randint(0, k, (q,), generator=g)
            ids[b, ctx:ctx + q] = self.query0 + asked
            if self.copy:
                labels[b, ctx + 1:ctx + q + 1] = self.pair0 + asked * v + values[asked]
            else:
                labels[b, ctx + 1:ctx + q + 1] = self.answer0 + values[asked]
            srcs[b] = where[asked]
        return RecallBatch(ids, labels, qpos.clone(), srcs)


# ----------------------------------------------------------------------- training recipe


def length_schedule(seq_len: int, steps: int, *, min_len: int, multiple: int,
                    first: float = 0.4, middle: float = 0.2) -> list[int]:
    """Sequence length of every step: a length warm-up. The shortest length (``min_len``
    or the next power-of-two fraction of ``seq_len`` above it) takes the first ``first``
    of the steps, the doublings between it and ``seq_len`` share the next ``middle``, and
    the rest run at ``seq_len``. Every length is a multiple of ``multiple`` (the layout's
    granularity). Pair it with a constant token count per step (batch = tokens / length).

    A tiny model from random init first learns *where* to look on short sequences, where a
    query's answer is one of few candidates and a step holds many sequences; retrieval by
    content then carries over to long ones (RoPE is relative) and keeps being trained
    there. With ``min_len >= seq_len`` every step is at ``seq_len``."""
    lengths = []
    n = seq_len
    while n // 2 >= max(min_len, multiple) and (n // 2) % multiple == 0:
        n //= 2
        lengths.append(n)
    lengths.reverse()  # short to long, seq_len excluded
    if not lengths:
        return [seq_len] * steps
    n_first = int(steps * first)
    n_mid = int(steps * middle) if len(lengths) > 1 else 0
    out = [lengths[0]] * n_first
    rest = lengths[1:]
    out += [rest[i * len(rest) // n_mid] for i in range(n_mid)] if rest else []
    return out + [seq_len] * (steps - len(out))


def lr_at(step: int, steps: int, lr: float, warmup: int = 20, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor * lr``."""
    warmup = max(1, min(warmup, steps // 5))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def build_model(*, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
                max_len: int, seed: int, dtype: torch.dtype, device, attn: str):
    """A small random-init Llama (``transformers.LlamaConfig``; no download), identical on
    every rank for one ``seed``, using attention implementation ``attn``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_len, rope_theta=10000.0, attention_dropout=0.0,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.set_attn_implementation(attn)
    return model


TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}


def single_process_reference(*, model_kwargs: dict, init_state: dict, batch: RecallBatch,
                             cp_loss: float, cp_grad_norm: float, cp_grads: dict,
                             convert=None) -> dict:
    """The equivalence check: the same batch through the same initial weights in this one
    process, on the full sequence with torch's SDPA attention (no ctxpar at all), and the
    plain token-mean cross-entropy. Compares the loss, the gradient norm and every
    parameter's gradient with the CP run's (relative differences; pass within the dtype's
    tolerance). Also measures the single-process activation memory (saved tensors)."""
    import torch.nn.functional as F

    from ctxpar.integrations.transformers import shift_labels
    from ctxpar.loss import grad_norm
    from ctxpar.observe.memory import SavedTensors

    dtype, device = model_kwargs["dtype"], model_kwargs["device"]
    ref = build_model(attn="sdpa", **model_kwargs)
    if convert is not None:
        ref = convert(ref)
    ref.load_state_dict(init_state)
    ids = batch.input_ids.to(device)
    target = shift_labels(batch.labels.to(device))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    with SavedTensors(exclude=ref.parameters()) as saved:
        logits = ref(input_ids=ids).logits
        loss = F.cross_entropy(logits.to(acc).flatten(0, 1), target.flatten(), ignore_index=IGNORE)
    loss.backward()
    gn = grad_norm(ref)
    worst, worst_name = 0.0, ""
    for name, p in ref.named_parameters():
        if p.grad is None or name not in cp_grads:
            continue
        g = p.grad.double()
        rel = float((cp_grads[name].double() - g).norm() / g.norm().clamp_min(1e-30))
        if rel > worst:
            worst, worst_name = rel, name
    tol = TOLERANCE.get(dtype, 1e-4)
    ref_loss = loss.item()
    loss_rel = abs(cp_loss - ref_loss) / max(abs(ref_loss), 1e-30)
    gn_rel = abs(cp_grad_norm - gn) / max(gn, 1e-30)
    return {
        "seq_len": int(ids.shape[1]), "cp_loss": cp_loss, "single_loss": ref_loss,
        "loss_rel_diff": loss_rel, "cp_grad_norm": cp_grad_norm, "single_grad_norm": gn,
        "grad_norm_rel_diff": gn_rel, "max_param_grad_rel_diff": worst,
        "worst_param": worst_name, "tolerance": tol,
        "passed": bool(max(loss_rel, gn_rel, worst) <= tol),
        "single_activation_bytes": saved.nbytes,
    }
