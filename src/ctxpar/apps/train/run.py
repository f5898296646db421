"""``ctxpar train``: train a small Llama-style model with CP and check it against one process.

With no arguments: 2 local gloo processes on CPU, a random-init ``LlamaConfig`` model (no
downloads), the key-value recall task of :mod:`ctxpar.apps.train.task` on 4096-token sequences
generated on the fly, through the Hugging Face integration
(:mod:`ctxpar.integrations.transformers`) and the CP-aware loss and explicit gradient
all-reduce of :mod:`ctxpar.loss`. It ends with a summary (:mod:`ctxpar.apps.train.report`):
recall accuracy, tokens/s, activation memory per rank, and the equivalence check: the CP
run's first-step loss and gradient norm beside a single-process run's (SDPA on the full
sequence, same initial weights, same batch).

This module is the command: flags and their checks in :mod:`~ctxpar.apps.train.config`,
the rank side in :mod:`~ctxpar.apps.train.worker`.

Under ``torchrun --nproc-per-node N -m ctxpar train ...`` each process is one rank (the
process group comes from the environment; NCCL with ``--device cuda``). A failing rank
stops every rank with its traceback and a non-zero exit; so do Ctrl-C, SIGTERM and SIGHUP
(exit 130, 143, 129: :mod:`ctxpar.apps.cli`).
"""
from __future__ import annotations

import argparse
import os
import time

from ctxpar.apps.train.config import TrainConfig, add_arguments, config_from_args

__all__ = ["TrainConfig", "add_arguments", "config_from_args", "run"]


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ctxpar train``: launch the ranks, then print/write the report."""
    from ctxpar.apps.launch import run_command_job, under_torchrun
    from ctxpar.apps.train import report as train_report
    from ctxpar.apps.train.worker import train_worker  # imports torch: not for --help

    cfg = config_from_args(args)
    if cfg.ckpt is not None:
        from ctxpar.apps.train.checkpoint import check_resume

        start = check_resume(cfg)  # before any rank starts: a bad checkpoint costs nothing
        if start and (not under_torchrun() or os.environ.get("RANK") == "0"):
            print(f"ctxpar train: resuming from {cfg.ckpt.dir} at step {start}", flush=True)
    t0 = time.perf_counter()
    # A silent rank is caught by the collectives' timeout (--timeout), not by a bound on
    # the whole run, which may take days.
    results = run_command_job("train", train_worker, cfg, nproc=cfg.nproc, device=cfg.device,
                              timeout=float("inf"), collective_timeout=cfg.timeout, threads=1)
    if results is None:
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
