"""``ctxpar train``: train a small Llama-style model with CP and check it against one process.

With no arguments: 2 local gloo processes on CPU, a random-init ``LlamaConfig`` model (no
downloads), the key-value recall task of :mod:`ctxpar.apps.train.task` on 4096-token sequences
generated on the fly, through the Hugging Face integration
(:mod:`ctxpar.integrations.transformers`) and the CP-aware loss and explicit gradient
all-reduce of :mod:`ctxpar.loss`. It ends with a summary (:mod:`ctxpar.apps.train.report`):
recall accuracy, tokens/s, activation memory per rank, and the equivalence check: the CP
run's first-step loss and gradient norm beside a single-process run's (SDPA on the full
sequence, same initial weights, same batch).

Under ``torchrun --nproc-per-node N -m ctxpar train ...`` each process is one rank (the
process group comes from the environment; NCCL with ``--device cuda``). A failing rank
stops every rank with its traceback and a non-zero exit; so do Ctrl-C, SIGTERM and SIGHUP
(exit 130, 143, 129: :mod:`ctxpar.apps.cli`).
"""
from __future__ import annotations

import argparse
import warnings
import contextlib
import dataclasses
import os
import sys
import time

__all__ = ["TrainConfig", "add_arguments", "run", "train_worker"]

DTYPES = ("float32", "float64", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a rank needs (picklable; sent to every spawned process)."""

    nproc: int = 2
    seq_len: int = 4096
    steps: int = 500
    batch_size: int = 1
    method: str = "ring"
    layout: str = "zigzag"
    hcp: tuple[int, int] | None = None
    ttt: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    lr: float = 3e-3
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    n_keys: int = 8
    n_values: int = 16
    eval_batches: int = 4
    equivalence: bool = True
    progress: bool = True
    fail_rank: int = -1
    fail_step: int = -1

    @property
    def attn_method(self) -> str:
        return "hybrid" if self.hcp else self.method


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--nproc", type=int, default=d.nproc,
                   help="local processes to spawn (ignored under torchrun)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="sequences per step at full length (shorter warm-up sequences come "
                        "in proportionally larger batches)")
    p.add_argument("--method", default=d.method,
                   help="ctxpar.attention method (ring, ulysses, allgather, auto, ...)")
    p.add_argument("--layout", default=d.layout, help="contiguous, zigzag or striped")
    p.add_argument("--hcp", type=int, nargs=2, metavar=("A", "P"), default=None,
                   help="hierarchical CP sizes [a2a, p2p]: method 'hybrid' on ctxpar.cp_mesh")
    p.add_argument("--ttt", action="store_true", help="convert the MLPs to In-Place TTT layers")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--hidden", type=int, default=d.hidden, help="model width")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="held-out sequences for the final recall accuracy")
    p.add_argument("--no-equivalence", dest="equivalence", action="store_false",
                   help="skip the single-process equivalence check")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", default=None, help="write metrics.json and loss_curve.png here")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds before a hung run is stopped")
    # Test-only: make one rank raise at one step.
    p.add_argument("--fail-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--fail-step", type=int, default=-1, help=argparse.SUPPRESS)


_MINIMUMS = {"steps": 1, "seq_len": 64, "nproc": 1, "batch_size": 1, "eval_batches": 0}


def _check_minimums(args: argparse.Namespace) -> None:
    """Exit with one line naming the flag and its value if a count is below its minimum."""
    for name, least in _MINIMUMS.items():
        value = getattr(args, name)
        if value < least:
            raise SystemExit(f"ctxpar train: --{name.replace('_', '-')} must be >= {least}; "
                             f"got {value}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    import ctxpar
    from ctxpar.apps.cli import writable_dir

    if args.hcp is not None:
        a2a, p2p = args.hcp
        if min(a2a, p2p) < 1:
            raise SystemExit(f"ctxpar train: --hcp sizes must be >= 1; got --hcp {a2a} {p2p}")
        if args.nproc != a2a * p2p and "WORLD_SIZE" not in os.environ:
            args.nproc = a2a * p2p
    elif args.method not in ctxpar.METHODS or args.method == "hybrid":
        raise SystemExit(f"ctxpar train: --method must be one of "
                         f"{[m for m in ctxpar.METHODS if m != 'hybrid']} (use --hcp A P "
                         f"for 'hybrid'); got {args.method!r}")
    if args.layout not in ctxpar.LAYOUTS:
        raise SystemExit(f"ctxpar train: --layout must be one of {ctxpar.LAYOUTS}")
    if args.ttt:
        if args.layout == "striped":
            raise SystemExit("ctxpar train: --ttt takes layout contiguous or zigzag (a striped "
                             "rank holds no run of consecutive tokens to chunk)")
    _check_minimums(args)
    if args.out:
        writable_dir(args.out, "train")
    return TrainConfig(
        nproc=args.nproc, seq_len=args.seq_len, steps=args.steps, batch_size=args.batch_size,
        method=args.method, layout=args.layout,
        hcp=tuple(args.hcp) if args.hcp else None, ttt=args.ttt, dtype=args.dtype,
        device=args.device, seed=args.seed, lr=args.lr, hidden=args.hidden,
        layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
        eval_batches=args.eval_batches, equivalence=args.equivalence,
        progress=args.progress, fail_rank=args.fail_rank, fail_step=args.fail_step)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ctxpar train``: launch the ranks, then print/write the report."""
    from ctxpar.apps.launch import RankError, RankTimeout, run_job, under_torchrun
    from ctxpar.apps.train import report as train_report

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    try:
        results = run_job(train_worker, cfg, nproc=cfg.nproc, device=cfg.device,
                          timeout=args.timeout, threads=1)
    except RankError as e:
        print(f"ctxpar train: failed on rank(s) {sorted(e.failures)}; all ranks stopped\n{e}",
              file=sys.stderr)
        return 1
    except RankTimeout as e:
        print(f"ctxpar train: timed out ({e}); all ranks stopped", file=sys.stderr)
        return 1
    except Exception:  # under torchrun this process is one rank: tag its traceback
        if not under_torchrun():
            raise
        import traceback

        print(f"ctxpar train: rank {os.environ.get('RANK')} failed (torchrun stops the "
              f"others):\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    metrics = results[0]
    if metrics is None:  # a non-zero rank under torchrun: rank 0 reports
        return 0
    metrics["wall_s"] = time.perf_counter() - t0
    metrics["launcher"] = "torchrun" if under_torchrun() else "local"
    print(train_report.summary(metrics))
    if args.out:
        for path in train_report.write_outputs(metrics, args.out):
            print(f"wrote {path}")
    return 0 if metrics["equivalence"].get("passed", True) else 2


def _device(cfg: TrainConfig, rank: int):
    import torch

    if cfg.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _ttt_chunk(cfg: TrainConfig, lengths: list[int], world: int) -> int:
    """The TTT chunk size: at most 1024 and dividing every rank's blocks at every length."""
    import math

    per = 2 * world if cfg.layout == "zigzag" else world
    chunk = 1024
    for n in set(lengths):
        chunk = math.gcd(chunk, n // per)
    return chunk


def ttt_convert(model, cfg: TrainConfig, group, chunk: int):
    """Make the last layer's MLP an In-Place TTT layer (seeded: identical everywhere)."""
    import torch
    from ctxpar import ttt

    torch.manual_seed(cfg.seed + 1)
    return ttt.convert(model, layers=[cfg.layers - 1], chunk_size=chunk, group=group,
                       layout=cfg.layout)


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


def train_worker(cfg: TrainConfig):
    """Runs on every rank; returns the metrics dict on rank 0 and None elsewhere."""

    import torch

    from ctxpar.apps.train import task as tt
    from ctxpar.dist.collectives import all_gather
    from ctxpar.dist.mesh import cp_mesh
    from ctxpar.dist.topology import SINGLE, resolve
    from ctxpar.integrations.transformers import register, shard_batch
    from ctxpar.loss import allreduce_gradients, allreduce_sum, cp_cross_entropy, grad_norm
    from ctxpar.observe.memory import SavedTensors

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations
    world_grp = resolve(None).ring
    rank, world = world_grp.rank, world_grp.size
    if "WORLD_SIZE" in os.environ and cfg.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = _device(cfg, rank)
    dtype = getattr(torch, cfg.dtype)
    group = None
    if cfg.hcp:
        group = cp_mesh(hierarchical_context_parallel_sizes=list(cfg.hcp), device_type=device.type)
    task = tt.RecallTask(cfg.seq_len, cfg.n_keys, cfg.n_values)
    per = (2 if cfg.layout == "zigzag" else 1) * world
    if cfg.seq_len % per:
        raise ValueError(f"--seq-len {cfg.seq_len} must be a multiple of {per} for "
                         f"layout={cfg.layout!r} on {world} ranks")
    lengths = tt.length_schedule(cfg.seq_len, cfg.steps, min_len=256, multiple=per)
    name = register("ctxpar_train", group=group, method=cfg.attn_method, layout=cfg.layout)
    mk = dict(vocab_size=task.vocab_size, hidden=cfg.hidden, layers=cfg.layers,
              heads=cfg.heads, kv_heads=cfg.kv_heads, max_len=cfg.seq_len, seed=cfg.seed,
              dtype=dtype, device=device)
    model = tt.build_model(attn=name, **mk)
    chunk = _ttt_chunk(cfg, lengths + [cfg.seq_len], world) if cfg.ttt else 0
    if cfg.ttt:
        model = ttt_convert(model, cfg, group, chunk)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)

    def forward_backward(batch, measure=False):
        cp = shard_batch(batch.input_ids.to(device), batch.labels.to(device), group=group,
                         layout=cfg.layout)
        saved = SavedTensors(exclude=model.parameters()) if measure else None
        with saved if saved is not None else contextlib.nullcontext():
            logits = model(**cp.model_inputs()).logits
            loss = cp_cross_entropy(logits, cp.labels, group=group)
        loss.backward()
        allreduce_gradients(params, group=group)
        return cp, logits.detach(), loss.item(), (saved.nbytes if saved else 0)

    # Equivalence, part 1: one full-length step from the initial weights (no update).
    equiv: dict = {}
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    eq_batch = task.batch(cfg.seed, 10 ** 9, cfg.batch_size)
    _, _, eq_loss, act_bytes = forward_backward(eq_batch, measure=True)
    eq_gn = grad_norm(params)
    eq_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                if p.grad is not None} if rank == 0 and cfg.equivalence else {}
    model.zero_grad(set_to_none=True)
    act_all = all_gather(world_grp, torch.tensor([act_bytes], dtype=torch.int64,
                                                 device=device)).flatten().tolist()

    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    progress = _Progress(cfg.steps, cfg.progress and rank == 0)
    hist = {"loss": [], "acc": [], "seq_len": [], "tokens": [], "step_s": [],
            "tokens_per_s": []}
    try:
        for step in range(cfg.steps):
            if step == cfg.fail_step and rank == cfg.fail_rank:
                raise RuntimeError(f"injected failure on rank {rank} at step {step} "
                                   f"(--fail-rank/--fail-step)")
            t0 = time.perf_counter()
            task_s = dataclasses.replace(task, seq_len=lengths[step])
            # Constant tokens per step: short sequences come in larger batches.
            bs = max(1, cfg.batch_size * cfg.seq_len // lengths[step])
            batch = task_s.batch(cfg.seed, step, bs)
            for g in opt.param_groups:
                g["lr"] = tt.lr_at(step, cfg.steps, cfg.lr)
            cp, logits, loss, _ = forward_backward(batch)
            gn = grad_norm(params)
            if gn > 1.0:  # clip to norm 1 (every rank holds the same reduced gradients)
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(1.0 / gn)
            opt.step()
            opt.zero_grad(set_to_none=True)
            answered = cp.labels != -100
            stats = torch.tensor([float((logits.argmax(-1)[answered] == cp.labels[answered])
                                        .sum()), float(answered.sum())], dtype=torch.float64,
                                 device=device)
            allreduce_sum(stats, group=group)
            acc = float(stats[0] / stats[1].clamp_min(1))
            dt = time.perf_counter() - t0
            tok_s = bs * lengths[step] / dt
            for k, v in (("loss", loss), ("acc", acc), ("seq_len", lengths[step]),
                         ("tokens", bs * lengths[step]), ("step_s", dt),
                         ("tokens_per_s", tok_s)):
                hist[k].append(v)
            progress.update(step, loss=loss, acc=acc, len=lengths[step], tok_s=int(tok_s))
    finally:
        progress.close()

    # Held-out recall accuracy at full length, split by where the answer lives.
    model.eval()
    ev = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(cfg.eval_batches):
            b = task.batch(cfg.seed + 1, i, 1)
            src = torch.full_like(b.labels, -1)
            src.scatter_(1, b.query_pos, b.source_pos)  # position t -> its answer's position
            cp = shard_batch(b.input_ids.to(device), b.labels.to(device), group=group,
                             layout=cfg.layout)
            pos = cp.position_ids[0]
            owner = torch.empty(cfg.seq_len, dtype=torch.long, device=device)
            owner[all_gather(world_grp, pos).flatten()] = torch.arange(
                world, device=device).repeat_interleave(pos.numel())
            pred = model(**cp.model_inputs()).logits.argmax(-1)
            ans = cp.labels != -100
            ok = (pred == cp.labels) & ans
            src_local = src.to(device)[:, pos]
            cross = ans & (owner[src_local.clamp_min(0)] != rank)
            ev += torch.tensor([float(ok.sum()), float(ans.sum()), float((ok & cross).sum()),
                                float(cross.sum())], dtype=torch.float64, device=device)
    allreduce_sum(ev, group=None)
    if rank != 0:
        return None

    if cfg.equivalence:
        convert = (lambda m: ttt_convert(m, cfg, SINGLE, chunk)) if cfg.ttt else None
        equiv = tt.single_process_reference(
            model_kwargs=mk, init_state=init_state, batch=eq_batch, convert=convert,
            cp_loss=eq_loss, cp_grad_norm=eq_gn, cp_grads=eq_grads)
    ev = ev.tolist()
    return {
        "config": dataclasses.asdict(cfg), "world": world, "params": n_params,
        "task": {"keys": task.n_keys, "values": task.n_values, "queries": task.queries,
                 "chance": task.chance, "vocab": task.vocab_size},
        "history": hist,
        "recall_accuracy": ev[0] / max(ev[1], 1), "queries": int(ev[1]),
        "cross_rank_accuracy": ev[2] / max(ev[3], 1), "cross_rank_queries": int(ev[3]),
        "activation_bytes_per_rank": act_all, "equivalence": equiv,
    }
