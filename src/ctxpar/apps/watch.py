"""Hung ranks: a collective that outlives the process group's timeout becomes
:class:`CollectiveTimeout`, naming the phase, this rank and (after a short roll call) the
silent ranks. Used by ``ctxpar train`` (``--timeout``) on a local pool and under torchrun.

Design: the process group's ``timeout`` (:func:`ctxpar.apps.launch.run_job`'s
``collective_timeout``) bounds every collective, so a live rank blocked on a stopped peer
raises after it. Which peer is silent is then asked on a spare gloo group (the main one
may be wedged by the timed-out operation) with ``monitored_barrier(wait_all_ranks=True)``:
rank 0 waits for every rank and its error lists those that did not arrive; any other rank
only learns whether rank 0 released it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
from typing import Any, Iterator

__all__ = ["CollectiveTimeout", "HangWatch", "hang_watch", "watch_collectives"]


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the process group's timeout: some peer went
    silent (stopped, hung or dead). The message names the phase and the silent ranks."""


@dataclasses.dataclass(frozen=True)
class HangWatch:
    """What :func:`watch_collectives` needs: the collective timeout (seconds) and a spare
    gloo group for the roll call (the main group may be wedged by the timed-out op)."""

    timeout_s: float
    group: Any
    rank: int

    def close(self) -> None:
        """Release the spare group (local; no collective)."""
        import torch.distributed as dist

        dist.destroy_process_group(self.group)

    @property
    def roll_call_s(self) -> float:
        """How long the roll call waits: a quarter of the timeout, between 2 and 30 s."""
        return max(2.0, min(self.timeout_s / 4, 30.0))


def hang_watch(timeout_s: float) -> HangWatch:
    """Collective (every rank of the world): the :class:`HangWatch` of this rank."""
    import torch.distributed as dist

    # The group's own timeout only bounds its creation (the roll call passes its own):
    # generous, so that a short --timeout does not fail a slow start.
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=max(timeout_s, 120)))
    return HangWatch(timeout_s, group, dist.get_rank())


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def _roll_call(watch: HangWatch) -> str:
    """Which ranks are silent, by gloo's ``monitored_barrier`` on the spare group: rank 0
    waits for every rank (``wait_all_ranks``) and its error lists the ranks that did not
    arrive; another rank only learns whether rank 0 released it."""
    import torch.distributed as dist

    try:
        dist.monitored_barrier(group=watch.group, wait_all_ranks=True,
                               timeout=datetime.timedelta(seconds=watch.roll_call_s))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        if watch.rank == 0:
            return f"roll call: {first}"
        return (f"roll call: rank 0 did not release it within {watch.roll_call_s:.0f}s (rank 0 "
                f"is silent, or it names the silent ranks in its own error): {first}")
    return "roll call: every rank answered (a peer is alive but slower than --timeout)"


@contextlib.contextmanager
def watch_collectives(what: str, watch: HangWatch | None) -> Iterator[None]:
    """Within the block, a collective that times out (the process group's ``timeout``)
    becomes :class:`CollectiveTimeout` naming this rank, ``what`` (the phase and its
    collectives) and, after a short roll call, the silent ranks. Other errors pass."""
    try:
        yield
    except RuntimeError as e:
        if watch is None or isinstance(e, CollectiveTimeout) or not _is_timeout(e):
            raise
        raise CollectiveTimeout(
            f"rank {watch.rank}: {what}: a collective did not complete within "
            f"{watch.timeout_s:g}s (--timeout): {str(e).strip().splitlines()[0][:300]}; "
            f"{_roll_call(watch)}") from e
