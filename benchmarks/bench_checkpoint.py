"""Time one checkpoint save and one load of ``ctxpar train``'s default model (DCP, 2 gloo
ranks on CPU): ``python benchmarks/bench_checkpoint.py [--rounds 7] [--world 2]``.

Each round saves the state after a step (``apps.train.checkpoint.save``: ``dcp.save`` into
a temporary folder, the rename, the barrier) and loads it back (``restore``: the shape
check, ``dcp.load``, ``set_state_dict``); prints medians, min and max over the rounds."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))

import torch  # noqa: E402

from ctxpar.apps.launch import RankPool  # noqa: E402


def bench(directory: str, rounds: int) -> tuple[list[float], list[float], int, int]:
    """Rank side: (save seconds, load seconds, checkpoint bytes, parameters)."""
    import torch.distributed as dist

    from ctxpar.apps.train import checkpoint as ckp
    from ctxpar.apps.train.config import TrainConfig
    from ctxpar.apps.train.worker import setup

    cfg = TrainConfig(ckpt=ckp.CheckpointConfig(directory, keep=1))
    r = setup(cfg)
    opt = torch.optim.AdamW(r.params, lr=cfg.lr)
    ckp.prepare(cfg.ckpt, r.rank)
    saves, loads = [], []
    for i in range(rounds):
        dist.barrier()
        t = time.perf_counter()
        path = ckp.save(r, opt, i + 1, {"loss": [1.0] * cfg.steps})
        saves.append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        ckp.restore(r, opt, path)
        dist.barrier()
        loads.append(time.perf_counter() - t)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return saves, loads, size, sum(p.numel() for p in r.params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d, RankPool(args.world) as pool:
        saves, loads, size, n = pool.run(bench, d, args.rounds, timeout=600)[0]

    def ms(xs):
        return (f"median {statistics.median(xs) * 1e3:.0f} ms (min {min(xs) * 1e3:.0f}, "
                f"max {max(xs) * 1e3:.0f})")

    print(f"default model: {n} parameters, checkpoint {size / 2 ** 20:.2f} MiB, {args.world} "
          f"ranks, {args.rounds} rounds; save {ms(saves)}; load {ms(loads)}")


if __name__ == "__main__":
    main()
