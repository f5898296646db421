"""The configuration of ``ctxpar train``: :class:`TrainConfig`, its command-line flags and
their checks, all done before any rank is spawned (a bad value costs no training)."""
from __future__ import annotations

import argparse
import dataclasses
import os

from ctxpar.apps.train.checkpoint import CheckpointConfig, checkpoint_config
from ctxpar.apps.train.checkpoint import add_arguments as add_checkpoint_arguments

__all__ = ["TrainConfig", "DTYPES", "add_arguments", "config_from_args", "length_multiple"]

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
    ttt_layers: tuple[int, ...] | None = None  # --ttt-layers (default: the last layer)
    ttt_lr: float | None = None                # --ttt-lr (default: ctxpar.ttt.convert's, 0.3)
    ttt_chunk: int | None = None               # --ttt-chunk (default: see worker.ttt_chunk)
    ttt_target: str = "hidden_states"          # --ttt-target
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
    save_dir: str | None = None  # --out: rank 0 saves the trained model here (save_pretrained)
    # Long runs (issue 15): seconds a collective waits for a silent rank, and checkpoints.
    timeout: float = 600.0
    ckpt: CheckpointConfig | None = None  # --checkpoint-dir and friends (apps.train.checkpoint)

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
    p.add_argument("--ttt-layers", type=int, nargs="+", default=None, metavar="I",
                   help="--ttt: the layers to convert (the release's ttt_layers; default the last)")
    p.add_argument("--ttt-lr", type=float, default=None,
                   help="--ttt: the fixed fast-weight step size (the release's ttt_lr; default 0.3)")
    p.add_argument("--ttt-chunk", type=int, default=None,
                   help="--ttt: the chunk size (the release's ttt_chunk; default the largest power "
                        "of two <= 64 that fits a shard block); sequences are padded to whole chunks")
    p.add_argument("--ttt-target", choices=("hidden_states", "input_embed"), default=d.ttt_target,
                   help="--ttt: the fast-weight target source (the release's ttt_target)")
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
    p.add_argument("--out", default=None,
                   help="write metrics.json, loss_curve.png and the trained model (Hugging Face "
                        "save_pretrained, with ctxpar_task.json; without --ttt) here: "
                        "`ctxpar generate --model DIR` loads it")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds a rank waits in a collective for a silent peer (stopped, "
                        "hung, dead) before the run fails naming it (default %(default)s)")
    add_checkpoint_arguments(p)
    # Test-only: make one rank raise at one step.
    p.add_argument("--fail-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--fail-step", type=int, default=-1, help=argparse.SUPPRESS)


def length_multiple(layout: str, hcp: tuple[int, int] | None, world: int) -> int:
    """Every sequence length must be a multiple of this: the layout's multiple on the CP
    topology, ``hcp`` = (a2a, p2p) or else ``world`` ranks on one ring axis."""
    from ctxpar.sequence.spec import cp_multiple

    p2p, a2a = (hcp[1], hcp[0]) if hcp else (world, 1)
    return cp_multiple(layout, p2p, a2a)


_MINIMUMS = {"steps": 1, "seq_len": 64, "nproc": 1, "batch_size": 1, "eval_batches": 0}


def _check_minimums(args: argparse.Namespace) -> None:
    """Exit with one line naming the flag and its value if a count is below its minimum."""
    for name, least in _MINIMUMS.items():
        value = getattr(args, name)
        if value < least:
            raise SystemExit(f"ctxpar train: --{name.replace('_', '-')} must be >= {least}; "
                             f"got {value}")


def _check_method(args: argparse.Namespace) -> None:
    """--hcp sizes, --method and --layout; with --hcp, --nproc becomes their product."""
    import ctxpar
    from ctxpar.apps.cli import check_hcp

    check_hcp(args, "train")
    if args.hcp is None and (args.method not in ctxpar.METHODS or args.method == "hybrid"):
        raise SystemExit(f"ctxpar train: --method must be one of "
                         f"{[m for m in ctxpar.METHODS if m != 'hybrid']} (use --hcp A P "
                         f"for 'hybrid'); got {args.method!r}")
    if args.layout not in ctxpar.LAYOUTS:
        raise SystemExit(f"ctxpar train: --layout must be one of {ctxpar.LAYOUTS}")


def _check_shapes(args: argparse.Namespace) -> None:
    """--ttt needs a layout of consecutive runs; --seq-len a multiple the layout can split."""
    import ctxpar
    from ctxpar.apps.launch import under_torchrun
    from ctxpar.sequence.layouts import get_layout

    if args.ttt and not get_layout(args.layout).consecutive_runs:
        runs = [lay for lay in ctxpar.LAYOUTS if get_layout(lay).consecutive_runs]
        raise SystemExit(f"ctxpar train: --ttt takes a layout among {runs} (a {args.layout} "
                         f"rank holds no run of consecutive tokens to chunk)")
    _check_ttt(args)
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.nproc
    multiple = length_multiple(args.layout, args.hcp, world)
    if args.seq_len % multiple and not args.ttt:  # --ttt pads (shard_batch multiple_of)
        raise SystemExit(f"ctxpar train: --seq-len {args.seq_len} must be a multiple of "
                         f"{multiple} for layout={args.layout!r} on {world} ranks")


def _check_ttt(args: argparse.Namespace) -> None:
    """The --ttt-* flags: only with --ttt, layers in range, a positive chunk, a finite lr."""
    import math

    given = [f"--ttt-{n}" for n in ("layers", "lr", "chunk") if getattr(args, f"ttt_{n}") is not None]
    if args.ttt_target != TrainConfig.ttt_target:
        given.append("--ttt-target")
    if given and not args.ttt:
        raise SystemExit(f"ctxpar train: {' '.join(given)} need --ttt")
    bad = [i for i in args.ttt_layers or [] if not 0 <= i < args.layers]
    if bad:
        raise SystemExit(f"ctxpar train: --ttt-layers {bad} out of range for --layers {args.layers}")
    if args.ttt_chunk is not None and args.ttt_chunk < 1:
        raise SystemExit(f"ctxpar train: --ttt-chunk must be >= 1; got {args.ttt_chunk}")
    if args.ttt_lr is not None and not math.isfinite(args.ttt_lr):
        raise SystemExit(f"ctxpar train: --ttt-lr must be finite; got {args.ttt_lr}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The checked :class:`TrainConfig` of the parsed flags (exits with a one-line message
    naming the bad value otherwise); creates ``--out`` and checks it is writable."""
    from ctxpar.apps.cli import writable_dir

    _check_method(args)
    _check_minimums(args)
    _check_shapes(args)
    if args.out:
        writable_dir(args.out, "train")
    if not args.timeout > 0:
        raise SystemExit(f"ctxpar train: --timeout must be > 0 seconds; got {args.timeout}")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if hasattr(args, f.name)}
    return TrainConfig(**dict(given, hcp=tuple(args.hcp) if args.hcp else None,
                              ttt_layers=tuple(args.ttt_layers) if args.ttt_layers else None,
                              save_dir=args.out or None, ckpt=checkpoint_config(args)))
