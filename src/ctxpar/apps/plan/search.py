"""The configurations ``ctxpar plan`` considers, ranked, and why the others are impossible.

Every CP degree c dividing the devices left after TP (the rest is data parallelism), each
method (ring, all-gather, Ulysses with a2a = c, hybrid [a2a, p2p] with a2a > 1 inside a
node and p2p > 1) and each layout. Ranking: configurations that fit without
recomputation first, by tokens/s per device (ties: less memory); then the others, by
memory per device (the nearest to fitting first), then speed.
"""
from __future__ import annotations

import dataclasses

from ctxpar.apps.plan.cost import Estimate, estimate
from ctxpar.apps.plan.rates import Rates
from ctxpar.apps.plan.specs import ClusterSpec, ModelSpec, RunSpec
from ctxpar.apps.plan.work import CPChoice

__all__ = ["Rejected", "candidates", "search", "check_choice"]


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A configuration that cannot run, and why (one sentence naming the values)."""

    choice: CPChoice
    reason: str


def check_choice(model: ModelSpec, cluster: ClusterSpec, choice: CPChoice) -> str | None:
    """Why ``choice`` cannot run on ``cluster`` (None if it can)."""
    hq = model.heads // cluster.tp
    if model.heads % cluster.tp or model.kv_heads % cluster.tp and cluster.tp % model.kv_heads:
        return (f"tp={cluster.tp} does not split Hq={model.heads} / Hkv={model.kv_heads} heads")
    devices = cluster.world // cluster.tp
    if devices % choice.size:
        return (f"CP degree {choice.size} ([a2a, p2p] = [{choice.a2a}, {choice.p2p}]) does not divide "
                f"the {devices} devices left after tp={cluster.tp}")
    deg = choice.a2a if choice.method in ("ulysses", "hybrid") else 1
    if hq % deg:
        return (f"Hq={hq} query heads (after tp={cluster.tp}) are not divisible by a2a={deg}")
    if choice.method == "hybrid" and choice.a2a * cluster.tp > cluster.per_node:
        return (f"a2a={choice.a2a} x tp={cluster.tp} exceeds the {cluster.per_node} devices of a node "
                f"(the all-to-all belongs inside a node)")
    return None


def candidates(model: ModelSpec, cluster: ClusterSpec, methods, layouts, cp: int | None = None):
    """Every (method, [a2a, p2p], layout) on the cluster (CP degree ``cp`` only, if
    given): CPChoice or Rejected."""
    devices = cluster.world // cluster.tp
    degrees = [d for d in range(1, devices + 1) if devices % d == 0]
    if cp is not None:
        if cp not in degrees:
            raise ValueError(f"--cp {cp} does not divide the {devices} devices left after tp={cluster.tp}")
        degrees = [cp]
    for c in degrees:
        for m in methods:
            if m == "hybrid":
                shapes = [(a, c // a) for a in range(2, c) if c % a == 0]
            elif m == "ulysses":
                shapes = [(c, 1)] if c > 1 else []
            else:
                shapes = [(1, c)] if (c > 1 or m == "ring") else []
            for a2a, p2p in shapes:
                for lay in layouts:
                    choice = CPChoice(m, a2a, p2p, lay)
                    why = check_choice(model, cluster, choice)
                    yield choice if why is None else Rejected(choice, why)


def search(model: ModelSpec, run: RunSpec, cluster: ClusterSpec, rates: Rates, *,
           methods=("ring", "allgather", "ulysses", "hybrid"), layouts=("zigzag", "contiguous"),
           local_ranks: int | None = None, cp: int | None = None
           ) -> tuple[list[Estimate], list[Rejected]]:
    """Ranked estimates of every possible configuration, and the rejected ones."""
    ests, rejected = [], []
    for c in candidates(model, cluster, methods, layouts, cp):
        if isinstance(c, Rejected):
            rejected.append(c)
        else:
            ests.append(estimate(model, run, c, rates, cluster, local_ranks=local_ranks))
    # Fitting ones by speed; the others by how far they are from fitting, then speed.
    ests.sort(key=lambda e: (0, -e.tokens_per_s_per_device, e.peak_bytes) if e.fits else
              (1, e.peak_bytes, -e.tokens_per_s_per_device))
    return ests, rejected
