"""The rank side of ``ctxpar generate``: :func:`generate_worker` runs on every rank; it
loads (or builds) the model, builds the held-out prompts and times one CP generation
(prefill, then decode), then rank 0 runs the same generation in one process (one thread,
as each rank) and returns the metrics.

Shapes: the prompts are ``input_ids``/``attention_mask`` ``[B, P]`` (left-padded, the same
on every rank) and ``answers`` ``[B]``; generation returns ``[B, P + new_tokens]``.
"""
from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Any, Callable

import torch

from ctxpar.apps.generate.run import GenerateConfig

__all__ = ["Prompts", "load", "held_out_prompts", "generate_worker"]

RANDOM_SEQ_LEN = 1024  # the random model's default sequence length


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Left-padded prompts ``input_ids``/``attention_mask`` ``[B, P]``, the answer of each
    ``answers`` ``[B]``, their unpadded lengths and the task's chance accuracy."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answers: torch.Tensor
    lengths: list[int]
    chance: float


def load(cfg: GenerateConfig, attn: str):
    """``(model, task, source)``: the saved model and its task, or a random model (seeded,
    identical on every rank) on the default task; ``source`` says which."""
    from ctxpar.apps.train import task as tt
    from ctxpar.apps.train.config import TrainConfig
    from ctxpar.apps.train.saved import load_trained

    d = TrainConfig()
    if cfg.model is None:
        task = tt.RecallTask(cfg.seq_len or RANDOM_SEQ_LEN, d.n_keys, d.n_values)
        model = tt.build_model(vocab_size=task.vocab_size, hidden=d.hidden, layers=d.layers,
                               heads=d.heads, kv_heads=d.kv_heads, max_len=task.seq_len,
                               seed=cfg.seed, dtype=torch.float32, device="cpu", attn=attn)
        return model.eval(), task, "random (no --model given: recall is at chance)"
    model, info = load_trained(cfg.model, attn, torch.device("cpu"))
    task = tt.RecallTask(cfg.seq_len or info.get("seq_len", RANDOM_SEQ_LEN),
                         info.get("n_keys", d.n_keys), info.get("n_values", d.n_values))
    trained = (f", trained {info['steps']} steps at {info['seq_len']} tokens "
               f"({info['method']}/{info['layout']})" if "steps" in info else "")
    return model, task, f"{cfg.model}{trained}"


def held_out_prompts(task, seed: int, count: int) -> Prompts:
    """``count`` sequences the training never saw (stream ``seed + 2``; training draws
    from ``seed`` and its evaluation from ``seed + 1``), sequence ``b`` cut right after its
    query ``b mod Q``: the answer is the label of the next position."""
    from ctxpar.apps.train.task import IGNORE

    batch = task.batch(seed + 2, 0, count)
    ctx = task.seq_len - task.queries - 1
    lengths = [ctx + 1 + b % task.queries for b in range(count)]
    width = max(lengths)
    ids = torch.zeros(count, width, dtype=torch.long)
    mask = torch.zeros(count, width, dtype=torch.long)
    answers = torch.empty(count, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = batch.input_ids[b, :n]
        mask[b, width - n:] = 1
        answers[b] = batch.labels[b, n]
    assert bool((answers != IGNORE).all())
    return Prompts(ids, mask, answers, lengths, task.chance)


class _Clock:
    """A ``transformers`` streamer that only notes the time of every ``put``: the prompt
    (before the prefill), then each new token. Duck-typed (``put``/``end``) so that no
    transformers import is needed here."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _run(call: Callable[..., Any], p: Prompts, new_tokens: int, sync: Callable[[], None]) -> dict:
    """One greedy generation of ``new_tokens`` with ``call``, all ranks starting together;
    returns the sequences ``[B, P + new_tokens]``, the cache, the prefill time (call to
    first new token) and the decode rate (tokens after the first, over their time)."""
    clock = _Clock()
    sync()
    t0 = time.perf_counter()
    out = call(p.input_ids, attention_mask=p.attention_mask, do_sample=False, pad_token_id=0,
               eos_token_id=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
               return_dict_in_generate=True, streamer=clock)
    first, last = clock.times[1], clock.times[-1]
    decoded = p.input_ids.shape[0] * (new_tokens - 1)
    return {"sequences": out.sequences, "cache": out.cache, "prefill_s": first - t0,
            "decode_tok_s": decoded / (last - first) if last > first else float("nan")}


def _cache_bytes(cache) -> int:
    """Bytes of the keys and values a single-process (``DynamicCache``) cache holds."""
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values))


def _reference(model, p: Prompts, cfg: GenerateConfig, cp_sequences: torch.Tensor) -> dict:
    """Rank 0: the same generation in this one process (SDPA, no ctxpar)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    got = _run(ref.generate, p, cfg.new_tokens, lambda: None)
    differ = (got["sequences"] != cp_sequences).any(1)
    return {"prefill_s": got["prefill_s"], "decode_tok_s": got["decode_tok_s"],
            "kv_bytes": _cache_bytes(got["cache"]), "tokens_equal": not bool(differ.any()),
            "rows_differing": int(differ.sum())}


def generate_worker(cfg: GenerateConfig) -> dict | None:
    """Runs on every rank; returns the metrics dict on rank 0 and None elsewhere."""
    import functools

    from ctxpar.apps.train.saved import quiet_transformers
    from ctxpar.dist.collectives import all_gather, all_reduce
    from ctxpar.dist.topology import resolve
    from ctxpar.integrations.transformers import generate, register

    warnings.filterwarnings("ignore", category=FutureWarning)
    quiet_transformers()
    grp = resolve(None).ring  # every rank: the metrics are gathered over the world
    group = None
    if cfg.hcp:
        from ctxpar.dist.mesh import cp_mesh
        group = cp_mesh(hierarchical_context_parallel_sizes=list(cfg.hcp), device_type="cpu")
    name = register("ctxpar_generate", group=group, layout=cfg.layout)
    model, task, source = load(cfg, name)
    prompts = held_out_prompts(task, cfg.seed, cfg.prompts)
    sync = functools.partial(all_reduce, grp, torch.zeros(1))
    call = functools.partial(generate, model, group=group, method=cfg.method, layout=cfg.layout)
    with torch.no_grad():
        got = _run(call, prompts, cfg.new_tokens, sync)
    kv = all_gather(grp, torch.tensor([got["cache"].kv_bytes])).flatten().tolist()
    times = all_gather(grp, torch.tensor([got["prefill_s"], got["decode_tok_s"]],
                                         dtype=torch.float64))
    if grp.rank != 0:
        return None
    seqs = got["sequences"]
    first = seqs[:, prompts.input_ids.shape[1]]
    with torch.no_grad():
        ref = _reference(model, prompts, cfg, seqs) if cfg.reference else None
    return {"config": dataclasses.asdict(cfg), "world": grp.size, "source": source,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "prompt_lengths": sorted(prompts.lengths), "chance": prompts.chance,
            "accuracy": float((first == prompts.answers).double().mean()),
            "prefill_s": float(times[:, 0].max()), "decode_tok_s": float(times[:, 1].min()),
            "kv_bytes": [int(b) for b in kv], "reference": ref}
