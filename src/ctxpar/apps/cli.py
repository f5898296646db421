"""The ``ctxpar`` command line: ``ctxpar verify``, ``ctxpar train``, ``ctxpar bench``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when chosen, so ``ctxpar --help`` is quick.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "verify": ("ctxpar.apps.verify", "check every method and layout against the float64 reference"),
    "train": ("ctxpar.apps.train.run", "train a small long-context model with CP and compare with one process"),
    "bench": ("ctxpar.apps.bench.run", "measure speed, communication and memory of every method"),
}


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
    return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
