"""The rank side of ``ctxpar train``: :func:`train_worker` runs on every rank and chains
:func:`setup`, :func:`equivalence_step` (one full-length step from the initial weights),
:func:`train_loop` and :func:`evaluate` (held-out recall), then rank 0 runs the
single-process reference and returns the metrics.

Shapes: a batch is ``[B, S]`` token ids at the step's global length S; every rank holds
its ``[B, S / world]`` shard in the layout's order (:func:`ctxpar.integrations.transformers.shard_batch`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import warnings
from typing import Any

import torch

from ctxpar.apps.watch import hang_watch, watch_collectives
from ctxpar.apps.train.config import TrainConfig, length_multiple

__all__ = ["Rank", "setup", "equivalence_step", "train_loop", "evaluate", "train_worker",
           "ttt_convert", "ttt_chunk"]


def ttt_chunk(cfg: TrainConfig, multiple: int) -> int:
    """The TTT chunk size: ``--ttt-chunk``, else the largest power of two <= 64 that fits a
    shard block at full length (``seq_len // multiple`` tokens, ``multiple`` the layout's
    length multiple). Batches are padded to whole chunks (``shard_batch(multiple_of=)``)."""
    if cfg.ttt_chunk:
        return cfg.ttt_chunk
    block = max(1, cfg.seq_len // multiple)
    return min(64, 1 << (block.bit_length() - 1))


def ttt_convert(model, cfg: TrainConfig, group, chunk: int):
    """Convert ``--ttt-layers`` (default the last layer) to In-Place TTT with the release's
    settings from the flags (seeded: identical everywhere)."""
    from ctxpar import ttt

    torch.manual_seed(cfg.seed + 1)
    return ttt.convert(model, ttt_layers=list(cfg.ttt_layers or [cfg.layers - 1]), ttt_chunk=chunk,
                       ttt_lr=cfg.ttt_lr, ttt_target=cfg.ttt_target, group=group, layout=cfg.layout)


class _Progress:
    """tqdm on rank 0 when installed, else a plain line every ~10% of the steps."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="ctxpar train", unit="step",
                                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
            except ImportError:
                pass

    def update(self, step: int, **fields) -> None:
        if not self.enabled:
            return
        text = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in fields.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(1)
        elif step % max(1, self.total // 10) == 0 or step == self.total - 1:
            print(f"step {step + 1}/{self.total} " + " ".join(f"{k}={v}" for k, v in text.items()),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------ setup


@dataclasses.dataclass
class Rank:
    """What one rank trains with: its place in the world, the CP group (None: the whole
    world; else a hierarchical mesh), the task, the per-step lengths and the model."""

    cfg: TrainConfig
    rank: int
    world: int
    world_grp: Any  # ctxpar.dist.topology.CPGroup of every rank: metrics are gathered over it
    device: torch.device
    group: Any
    task: Any  # ctxpar.apps.train.task.RecallTask at the full length
    lengths: list[int]  # the global sequence length of every step
    model_kwargs: dict  # build_model's arguments (the single-process reference rebuilds it)
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    chunk: int  # the TTT chunk size (0 without --ttt)

    def forward_backward(self, batch, measure: bool = False):
        """Shard ``batch`` (``[B, S]``), run forward and backward, all-reduce the gradients.
        Returns the sharded batch, the detached logits ``[B, S_local, V]``, the loss and
        (``measure``) the bytes saved for backward, else 0."""
        from ctxpar.integrations.transformers import shard_batch
        from ctxpar.loss import allreduce_gradients, cp_cross_entropy
        from ctxpar.observe.memory import SavedTensors

        cp = shard_batch(batch.input_ids.to(self.device), batch.labels.to(self.device),
                         group=self.group, layout=self.cfg.layout, multiple_of=self.chunk or 1)
        saved = SavedTensors(exclude=self.model.parameters()) if measure else None
        with saved if saved is not None else contextlib.nullcontext():
            logits = self.model(**cp.model_inputs()).logits
            loss = cp_cross_entropy(logits, cp.labels, group=self.group)
        loss.backward()
        allreduce_gradients(self.params, group=self.group)
        return cp, logits.detach(), loss.item(), (saved.nbytes if saved else 0)


def setup(cfg: TrainConfig) -> Rank:
    """This rank's device, CP group, task, length schedule and model (with the TTT layer)."""
    from ctxpar.apps.launch import rank_device
    from ctxpar.apps.train import task as tt
    from ctxpar.dist.mesh import cp_mesh
    from ctxpar.dist.topology import resolve
    from ctxpar.integrations.transformers import register

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations
    world_grp = resolve(None).ring
    world = world_grp.size
    if "WORLD_SIZE" in os.environ and cfg.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = rank_device(cfg.device)
    group = None
    if cfg.hcp:
        group = cp_mesh(hierarchical_context_parallel_sizes=list(cfg.hcp), device_type=device.type)
    task = tt.RecallTask(cfg.seq_len, cfg.n_keys, cfg.n_values)
    multiple = length_multiple(cfg.layout, cfg.hcp, world)
    lengths = tt.length_schedule(cfg.seq_len, cfg.steps, min_len=256, multiple=multiple)
    name = register("ctxpar_train", group=group, method=cfg.attn_method, layout=cfg.layout)
    mk = dict(vocab_size=task.vocab_size, hidden=cfg.hidden, layers=cfg.layers,
              heads=cfg.heads, kv_heads=cfg.kv_heads, max_len=cfg.seq_len, seed=cfg.seed,
              dtype=getattr(torch, cfg.dtype), device=device)
    model = tt.build_model(attn=name, **mk)
    chunk = ttt_chunk(cfg, multiple) if cfg.ttt else 0
    if cfg.ttt:
        model = ttt_convert(model, cfg, group, chunk)
    params = [p for p in model.parameters() if p.requires_grad]
    return Rank(cfg, world_grp.rank, world, world_grp, device, group, task, lengths, mk,
                model, params, chunk)


# ------------------------------------------------------------------------ equivalence


def equivalence_step(r: Rank) -> dict:
    """Equivalence, part 1: one full-length step from the initial weights, no update.
    Returns the initial weights, the batch, the CP loss and gradient norm, rank 0's
    gradients (with the check on) and every rank's activation bytes (``[world]``)."""
    from ctxpar.dist.collectives import all_gather
    from ctxpar.loss import grad_norm

    init_state = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
    batch = r.task.batch(r.cfg.seed, 10 ** 9, r.cfg.batch_size)
    _, _, loss, act_bytes = r.forward_backward(batch, measure=True)
    grads = {n: p.grad.detach().clone() for n, p in r.model.named_parameters()
             if p.grad is not None} if r.rank == 0 and r.cfg.equivalence else {}
    step = dict(init_state=init_state, batch=batch, cp_loss=loss, cp_grad_norm=grad_norm(r.params),
                cp_grads=grads)
    r.model.zero_grad(set_to_none=True)
    act = torch.tensor([act_bytes], dtype=torch.int64, device=r.device)
    step["activation_bytes"] = all_gather(r.world_grp, act).flatten().tolist()
    return step


def single_process_check(r: Rank, step: dict) -> dict:
    """Equivalence, part 2 (rank 0): the same step in this one process without ctxpar."""
    from ctxpar.apps.train import task as tt
    from ctxpar.dist.topology import SINGLE

    convert = (lambda m: ttt_convert(m, r.cfg, SINGLE, r.chunk)) if r.cfg.ttt else None
    return tt.single_process_reference(
        model_kwargs=r.model_kwargs, init_state=step["init_state"], batch=step["batch"],
        convert=convert, cp_loss=step["cp_loss"], cp_grad_norm=step["cp_grad_norm"],
        cp_grads=step["cp_grads"])


# --------------------------------------------------------------------------- training


def _train_step(r: Rank, opt: torch.optim.Optimizer, step: int) -> dict:
    """One optimizer step at ``r.lengths[step]`` tokens, gradients clipped to norm 1;
    returns its history row (loss, accuracy over every rank, timing)."""
    from ctxpar.apps.train import task as tt
    from ctxpar.loss import allreduce_sum, grad_norm

    cfg, n = r.cfg, r.lengths[step]
    t0 = time.perf_counter()
    bs = max(1, cfg.batch_size * cfg.seq_len // n)  # constant tokens per step
    batch = dataclasses.replace(r.task, seq_len=n).batch(cfg.seed, step, bs)
    for g in opt.param_groups:
        g["lr"] = tt.lr_at(step, cfg.steps, cfg.lr)
    cp, logits, loss, _ = r.forward_backward(batch)
    gn = grad_norm(r.params)
    if gn > 1.0:  # every rank holds the same reduced gradients: the same scale everywhere
        for p in r.params:
            if p.grad is not None:
                p.grad.mul_(1.0 / gn)
    opt.step()
    opt.zero_grad(set_to_none=True)
    answered = cp.labels != -100
    hits = (logits.argmax(-1)[answered] == cp.labels[answered]).sum()
    stats = torch.tensor([float(hits), float(answered.sum())], dtype=torch.float64,
                         device=r.device)
    allreduce_sum(stats, group=r.group)
    dt = time.perf_counter() - t0
    return {"loss": loss, "acc": float(stats[0] / stats[1].clamp_min(1)), "seq_len": n,
            "tokens": bs * n, "step_s": dt, "tokens_per_s": bs * n / dt}


def train_loop(r: Rank, watch=None) -> dict[str, list]:
    """``cfg.steps`` AdamW steps; returns the history: one list per field of a step's row.
    With ``cfg.ckpt``, resumes from the latest checkpoint and saves on the way. ``watch``:
    a :class:`ctxpar.apps.watch.HangWatch` (made here if None)."""
    cfg = r.cfg
    opt = torch.optim.AdamW(r.params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    progress = _Progress(cfg.steps, cfg.progress and r.rank == 0)
    hist: dict[str, list] = {k: [] for k in ("loss", "acc", "seq_len", "tokens", "step_s",
                                             "tokens_per_s")}
    watch = watch or hang_watch(cfg.timeout)  # collective: every rank
    start = _resume(r, opt, hist, watch)
    try:
        for step in range(start, cfg.steps):
            if step == cfg.fail_step and r.rank == cfg.fail_rank:
                raise RuntimeError(f"injected failure on rank {r.rank} at step {step} "
                                   f"(--fail-rank/--fail-step)")
            _kill_switch(r, step)
            with watch_collectives(f"training step {step}", watch):
                row = _train_step(r, opt, step)
            for k, v in row.items():
                hist[k].append(v)
            progress.update(step, loss=row["loss"], acc=row["acc"], len=row["seq_len"],
                            tok_s=int(row["tokens_per_s"]))
            _maybe_save(r, opt, step + 1, hist, watch)
    finally:
        progress.close()
    return hist


# ------------------------------------------------------------------- long runs (issue 15)


def _resume(r: Rank, opt: torch.optim.Optimizer, hist: dict, watch) -> int:
    """With ``--checkpoint-dir``: clear interrupted saves, load the latest checkpoint if
    any (model, optimizer, RNG, schedule, history into ``hist``); returns the first step."""
    from ctxpar.apps.train import checkpoint

    ck = r.cfg.ckpt
    if ck is None:
        return 0
    path = checkpoint.latest(ck.dir)  # read before prepare() (which only removes .tmp-*)
    checkpoint.prepare(ck, r.rank)
    if path is None:
        return 0
    with watch_collectives(f"loading checkpoint {path}", watch):
        start, saved = checkpoint.restore(r, opt, path)
    for k in hist:
        hist[k].extend(saved.get(k, []))
    return start


def _maybe_save(r: Rank, opt: torch.optim.Optimizer, done: int, hist: dict, watch) -> None:
    """Save after ``done`` steps every ``--save-every`` steps and after the last one."""
    from ctxpar.apps.train import checkpoint

    ck = r.cfg.ckpt
    if ck is None or not (done == r.cfg.steps or (ck.save_every and done % ck.save_every == 0)):
        return
    with watch_collectives(f"checkpoint save after step {done - 1}", watch):
        checkpoint.save(r, opt, done, hist)


def _kill_switch(r: Rank, step: int) -> None:
    """Test-only (``--kill-rank/--kill-step``): SIGKILL this rank at ``step`` on the first
    attempt: torchrun counts its restarts in TORCHELASTIC_RESTART_COUNT, so the restarted
    group runs through."""
    import signal

    ck = r.cfg.ckpt
    if (ck is not None and step == ck.kill_step and r.rank == ck.kill_rank
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------- evaluation


def _eval_counts(r: Rank, batch) -> torch.Tensor:
    """This rank's float64 ``[4]`` counts on one held-out batch: correct answers, answers,
    correct answers held by another rank, answers held by another rank."""
    from ctxpar.dist.collectives import all_gather
    from ctxpar.integrations.transformers import shard_batch

    dev = r.device
    src = torch.full_like(batch.labels, -1)
    src.scatter_(1, batch.query_pos, batch.source_pos)  # position t -> its answer's position
    cp = shard_batch(batch.input_ids.to(dev), batch.labels.to(dev), group=r.group,
                     layout=r.cfg.layout, multiple_of=r.chunk or 1)
    pos = cp.position_ids[0]  # [S_local] global positions of this rank's tokens
    total = pos.numel() * r.world  # --ttt may pad the sequence: pads have no answer
    src = torch.nn.functional.pad(src, (0, total - src.shape[1]), value=-1)
    owner = torch.empty(total, dtype=torch.long, device=dev)  # [S] rank of a position
    owner[all_gather(r.world_grp, pos).flatten()] = torch.arange(
        r.world, device=dev).repeat_interleave(pos.numel())
    pred = r.model(**cp.model_inputs()).logits.argmax(-1)
    ans = cp.labels != -100
    ok = (pred == cp.labels) & ans
    cross = ans & (owner[src.to(dev)[:, pos].clamp_min(0)] != r.rank)
    return torch.tensor([float(ok.sum()), float(ans.sum()), float((ok & cross).sum()),
                         float(cross.sum())], dtype=torch.float64, device=dev)


def evaluate(r: Rank) -> dict:
    """Held-out recall accuracy at full length, over every rank, split by where the answer
    lives (on the query's rank or another)."""
    from ctxpar.loss import allreduce_sum

    r.model.eval()
    ev = torch.zeros(4, dtype=torch.float64, device=r.device)
    with torch.no_grad():
        for i in range(r.cfg.eval_batches):
            ev += _eval_counts(r, r.task.batch(r.cfg.seed + 1, i, 1))
    allreduce_sum(ev, group=None)
    ok, n, ok_cross, n_cross = ev.tolist()
    return {"recall_accuracy": ok / max(n, 1), "queries": int(n),
            "cross_rank_accuracy": ok_cross / max(n_cross, 1), "cross_rank_queries": int(n_cross)}


# ----------------------------------------------------------------------------- driver


def save_model(r: Rank) -> str:
    """Rank 0: the trained model and its task into ``cfg.save_dir``
    (:mod:`ctxpar.apps.train.saved`); returns the folder, or why it was not saved."""
    from ctxpar.apps.train.saved import save_trained

    cfg = r.cfg
    if cfg.ttt:
        return "not saved (--ttt: the TTT layer is not a Hugging Face architecture)"
    info = {"seq_len": cfg.seq_len, "n_keys": cfg.n_keys, "n_values": cfg.n_values,
            "seed": cfg.seed, "steps": cfg.steps, "method": cfg.attn_method,
            "layout": cfg.layout, "dtype": cfg.dtype}
    save_trained(r.model, cfg.save_dir, info)
    return cfg.save_dir


def train_worker(cfg: TrainConfig) -> dict | None:
    """Runs on every rank; returns the metrics dict on rank 0 and None elsewhere."""
    r = setup(cfg)
    watch = hang_watch(cfg.timeout)  # collective: every rank
    with watch_collectives("the equivalence step (forward/backward at full length)", watch):
        step = equivalence_step(r)
    hist = train_loop(r, watch)
    with watch_collectives("the held-out evaluation", watch):
        recall = evaluate(r)
    watch.close()
    if r.rank != 0:
        return None
    t = r.task
    return {"saved": save_model(r) if cfg.save_dir else "",
        "config": dataclasses.asdict(cfg), "world": r.world,
        "params": sum(p.numel() for p in r.params),
        "task": {"keys": t.n_keys, "values": t.n_values, "queries": t.queries,
                 "chance": t.chance, "vocab": t.vocab_size},
        "history": hist, **recall,
        "activation_bytes_per_rank": step["activation_bytes"],
        "equivalence": single_process_check(r, step) if cfg.equivalence else {},
    }
