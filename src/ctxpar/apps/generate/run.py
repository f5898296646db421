"""``ctxpar generate``: load a model saved by ``ctxpar train --out DIR``, build held-out
prompts of its recall task, prefill them under CP and decode the answers with
:func:`ctxpar.integrations.transformers.generate`.

With no arguments: 2 local gloo processes on CPU and a *random* model (said so in the
report: its recall is at chance) on 1024-token prompts. Each of ``--prompts`` prompts is a
held-out recall sequence cut after one of its queries (prompt ``b`` after query ``b``, so
the prompts differ in length and the batch is left-padded as Hugging Face does); the first
generated token is the answer. The report gives recall accuracy, prefill time (CP and one
process), decode tokens/s, the KV cache bytes of every rank (and of one process), and
whether the tokens equal a single-process ``model.generate`` of the same model (SDPA, no
ctxpar). Exit 2 when they differ.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

__all__ = ["GenerateConfig", "add_arguments", "config_from_args", "run", "summary"]


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Everything a rank needs (picklable). ``seq_len`` 0: the trained task's length."""

    model: str | None = None
    nproc: int = 2
    method: str = "auto"
    layout: str = "zigzag"
    prompts: int = 4
    new_tokens: int = 16
    seq_len: int = 0
    seed: int = 0
    reference: bool = True
    hcp: tuple[int, int] | None = None  # [a2a, p2p] of a hybrid mesh (cp_mesh); None: 1-D


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = GenerateConfig()
    p.add_argument("--model", default=None,
                   help="a folder written by `ctxpar train --out DIR` (else a random model)")
    p.add_argument("--nproc", type=int, default=d.nproc,
                   help="local processes to spawn (ignored under torchrun)")
    p.add_argument("--method", default=d.method, help="prefill: pass-kv, pass-q or auto")
    p.add_argument("--layout", default=d.layout, help="contiguous, zigzag or striped")
    p.add_argument("--hcp", type=int, nargs=2, metavar=("A", "P"), default=None,
                   help="a hybrid mesh: hierarchical_context_parallel_sizes [a2a, p2p] "
                        "(Ulysses x ring ranks; --nproc becomes A*P)")
    p.add_argument("--prompts", type=int, default=d.prompts, help="prompts in the batch")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens to decode")
    p.add_argument("--seq-len", type=int, default=d.seq_len,
                   help="length of the recall sequences the prompts are cut from (default: "
                        "the trained one; 1024 for the random model)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the single-process generate() (no time or token comparison)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before a hung run is stopped")


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    """The checked config (exits with one line naming a bad value before any rank starts)."""
    import os

    import ctxpar
    from ctxpar.apps.cli import check_hcp
    from ctxpar.attn.decode import PREFILL_METHODS

    if args.method not in PREFILL_METHODS:
        raise SystemExit(f"ctxpar generate: --method must be one of {list(PREFILL_METHODS)}; "
                         f"got {args.method!r}")
    if args.layout not in ctxpar.LAYOUTS:
        raise SystemExit(f"ctxpar generate: --layout must be one of {ctxpar.LAYOUTS}")
    for flag, value, least in (("--nproc", args.nproc, 1), ("--prompts", args.prompts, 1),
                               ("--new-tokens", args.new_tokens, 1)):
        if value < least:
            raise SystemExit(f"ctxpar generate: {flag} must be >= {least}; got {flag} {value}")
    check_hcp(args, "generate")
    if args.hcp is not None:
        args.hcp = tuple(args.hcp)
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"ctxpar generate: --model {args.model}: no config.json there (a "
                         f"folder written by `ctxpar train --out DIR`)")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateConfig)}
    return GenerateConfig(**given)


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def summary(m: dict) -> str:
    """The printed report of ``ctxpar generate``."""
    c, ref = m["config"], m.get("reference")
    lines = ["", "=" * 72,
             f"ctxpar generate: {m['world']} ranks"
             + (f" (mesh [a2a, p2p] = {list(c['hcp'])})" if c.get("hcp") else "")
             + f", prefill method={c['method']}, "
             f"layout={c['layout']}, {m['dtype']}",
             f"model: {m['source']}",
             f"prompts: {c['prompts']} held-out recall prompts of {m['prompt_lengths'][0]}.."
             f"{m['prompt_lengths'][-1]} tokens (left-padded batch), {c['new_tokens']} new "
             f"tokens each",
             f"recall accuracy (first new token = the answer): {m['accuracy']:.1%} "
             f"(chance {m['chance']:.1%})",
             f"prefill: {m['prefill_s']:.3f} s under CP"
             + (f", {ref['prefill_s']:.3f} s in one process (speedup "
                f"{ref['prefill_s'] / m['prefill_s']:.2f}x)" if ref else ""),
             (f"decode: {m['decode_tok_s']:,.1f} tokens/s under CP"
              + (f", {ref['decode_tok_s']:,.1f} tokens/s in one process" if ref else ""))
             if c["new_tokens"] > 1 else "decode: none (--new-tokens 1: the prefill gives the only token)",
             "KV cache bytes: " + ", ".join(f"rank {r} {_mib(b)}"
                                           for r, b in enumerate(m["kv_bytes"]))
             + (f"; one process {_mib(ref['kv_bytes'])}" if ref else "")]
    if ref:
        lines.append("tokens equal single-process generate(): "
                     + ("yes" if ref["tokens_equal"] else
                        f"NO ({ref['rows_differing']} of {c['prompts']} rows differ)"))
    else:
        lines.append("tokens vs single-process generate(): not compared (--no-reference)")
    lines += [f"wall time: {m['wall_s']:.1f}s", "=" * 72]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ctxpar generate``: launch the ranks, print the report."""
    from ctxpar.apps.generate.worker import generate_worker  # imports torch
    from ctxpar.apps.launch import run_command_job

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    results = run_command_job("generate", generate_worker, cfg, nproc=cfg.nproc,
                              timeout=args.timeout, threads=1)
    if results is None:
        return 1
    metrics = results[0]
    if metrics is None:  # a non-zero rank under torchrun
        return 0
    metrics["wall_s"] = time.perf_counter() - t0
    print(summary(metrics))
    ref = metrics.get("reference")
    return 2 if ref and not ref["tokens_equal"] else 0
