"""Shared multi-rank harness: one pool of gloo ranks per world size for the whole session.

Tests call ``run_ranks(world_size, fn, *args)`` with a module-level ``fn``; it returns the
list of per-rank results or raises ``RankError`` (tracebacks tagged by rank) /
``RankTimeout`` (a hang). A pool that timed out or ended in a mixed failure is respawned
on next use.
"""
from __future__ import annotations

import os

import pytest
import torch

from ctxpar.apps.launch import RankPool

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class _Pools:
    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}

    def get(self, world_size: int) -> RankPool:
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = RankPool(world_size, collective_timeout_s=60.0)
            self._pools[world_size] = pool
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def rank_pools():
    pools = _Pools()
    yield pools
    pools.close()


@pytest.fixture
def run_ranks(rank_pools):
    def run(world_size: int, fn, *args, timeout: float = 120.0, **kwargs):
        return rank_pools.get(world_size).run(fn, *args, timeout=timeout, **kwargs)

    return run
