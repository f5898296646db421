"""The ``ctxpar`` command line: ``verify``, ``train``, ``generate`` and ``bench``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when chosen, so ``ctxpar --help`` is quick.

Stopping: Ctrl-C, SIGTERM and SIGHUP stop every rank the command spawned and exit with
128 + the signal's number (130, 143, 129); see :func:`ctxpar.apps.launch.stop_on_signals`.
Under ``torchrun`` this process is one rank and torchrun owns the signals.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys

SUBCOMMANDS = {
    "verify": ("ctxpar.apps.verify", "check every method and layout against the float64 reference"),
    "train": ("ctxpar.apps.train.run", "train a small long-context model with CP and compare with one process"),
    "generate": ("ctxpar.apps.generate.run", "prefill held-out recall prompts under CP and decode "
                                             "the answers; compare with one process"),
    "bench": ("ctxpar.apps.bench.run", "measure speed, communication and memory of every method"),
    "plan": ("ctxpar.apps.plan.run", "pick the CP method, [a2a, p2p] and layout; predict time and memory"),
}


def writable_dir(path: str, command: str, flag: str = "--out") -> str:
    """Create directory ``path`` if needed and check that a file can be written in it,
    before any work starts (a run should not fail at its very end because of its output
    folder); else exit with one line naming ``flag`` and the path."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise SystemExit(f"ctxpar {command}: {flag} {path}: not a writable directory "
                         f"({e.strerror or e})") from None
    return path


def check_hcp(args: argparse.Namespace, command: str) -> None:
    """``--hcp A P`` (a hybrid ``[a2a, p2p]`` mesh): sizes >= 1, else one line and exit;
    ``--nproc`` becomes ``A*P`` (local processes; under torchrun the world is given)."""
    if args.hcp is None:
        return
    a2a, p2p = args.hcp
    if min(a2a, p2p) < 1:
        raise SystemExit(f"ctxpar {command}: --hcp sizes must be >= 1; got --hcp {a2a} {p2p}")
    if "WORLD_SIZE" not in os.environ:
        args.nproc = a2a * p2p


def parse_ints(text: str, flag: str) -> list[int]:
    """A comma-separated list of integers given to ``flag`` (empty items skipped); a
    ValueError naming the flag and the text otherwise."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ctxpar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    _check_cuda(args)
    command = importlib.import_module(SUBCOMMANDS[args.command][0])
    return _run_stoppable(command.run, args)


def _check_cuda(args: argparse.Namespace) -> None:
    """``--device cuda`` (``--on cuda`` for ``plan --calibrate``) where torch sees no GPU:
    one line now, not a crash on every rank with the launcher waiting for them."""
    on = getattr(args, "on", None) if getattr(args, "calibrate", False) else None
    wanted = [flag for flag, value in (("--device", getattr(args, "device", None)), ("--on", on))
              if value == "cuda"]
    if not wanted:
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"ctxpar {args.command}: {wanted[0]} cuda, but this torch ({torch.__version__}) "
                         "sees no CUDA device")


def _run_stoppable(run, args: argparse.Namespace) -> int:
    """``run(args)``; a stop (Ctrl-C, or SIGTERM/SIGHUP to the launcher) becomes one line
    and the exit code 128 + the signal's number, once the ranks are gone."""
    from ctxpar.apps.launch import Stopped, stop_on_signals, under_torchrun

    handlers = contextlib.nullcontext() if under_torchrun() else stop_on_signals()
    try:
        with handlers:
            return int(run(args) or 0)
    except KeyboardInterrupt:
        signum = signal.SIGINT
    except Stopped as e:
        signum = e.signum
    print(f"\nctxpar {args.command}: stopped by {signal.Signals(signum).name}; every rank was "
          f"stopped", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
