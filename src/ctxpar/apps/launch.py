"""Local rank pools: N processes on this machine, joined in one torch.distributed group.

Used by the test suite (one pool per world size, spawned once per pytest session) and by
the CLI when it is not started under ``torchrun``. Rendezvous goes through a
``FileStore`` in a private temporary directory: no fixed ports, nothing to collide with.

A function shipped to the pool must be importable by name (a module-level function). Each
rank returns its result, or its traceback tagged with its rank. A rank that hangs (for
example in a collective its peers never join) makes :meth:`RankPool.run` raise
:class:`RankTimeout` after the timeout; the pool is then dead and is respawned by its owner.

Stopping: a rank exits by itself once its launcher is gone (it watches its parent), so even
a SIGKILLed launcher leaves no orphan. The ``ctxpar`` command line also wraps its work in
:func:`stop_on_signals`, which turns SIGTERM and SIGHUP into :class:`Stopped` (as Ctrl-C
raises ``KeyboardInterrupt``) so that the pools kill their ranks on the way out.
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Iterator

__all__ = ["RankPool", "RankError", "RankTimeout", "Stopped", "stop_on_signals",
           "under_torchrun", "run_job", "run_command_job", "rank_device", "sync_device"]

#: Signals that stop a launcher the way Ctrl-C does (see :func:`stop_on_signals`).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class RankError(RuntimeError):
    """One or more ranks raised; ``failures`` maps rank -> formatted traceback, and
    ``exc_types`` maps rank -> the exception's type name."""

    def __init__(self, failures: dict[int, str], exc_types: dict[int, str],
                 silent: list[int] | None = None):
        self.failures = failures
        self.exc_types = exc_types
        self.silent = list(silent or [])
        body = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        quiet = (f"; silent rank(s) {self.silent} never answered (stopped or hung; killed)"
                 if self.silent else "")
        super().__init__(f"{len(failures)} rank(s) failed: {sorted(failures)}{quiet}\n{body}")


class RankTimeout(RuntimeError):
    """Some ranks did not answer in time (a hang, e.g. in a collective)."""


class Stopped(BaseException):
    """The launcher received ``signum`` (SIGTERM or SIGHUP) inside :func:`stop_on_signals`.

    A BaseException, like ``KeyboardInterrupt``, so that only cleanup code (``finally``,
    ``except BaseException``) sees it on its way to the command line, which exits with
    128 + ``signum``, the shell's convention for "killed by the signal"."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, ``signals`` raise :class:`Stopped` in the main thread instead of
    ending the process on the spot: the default action would skip every cleanup and leave
    the spawned ranks running. Later signals are ignored while that cleanup runs (it kills
    the ranks, bounded by a few seconds). The previous handlers come back on exit. Only
    for the launching process; a no-op outside the main thread, where Python cannot set
    handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Rank side: end this process once its launcher is gone. A launcher killed outright
    (SIGKILL, the OOM killer) runs no cleanup, and its ranks would otherwise wait for
    tasks forever; once the parent dies this process is re-parented and ``getppid``
    changes. A polling daemon thread rather than ``prctl(PR_SET_PDEATHSIG)``: that is
    Linux-only and fires when the spawning *thread* exits, not the process."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="ctxpar-exit-with-parent", daemon=True).start()


def _wait_for_peers(store, world: int, timeout_s: float) -> None:
    """Rank side: wait (up to the start timeout) until every rank has reached its store, so
    that the process group's own rendezvous, bounded by the collective timeout (which may
    be a few seconds), does not count the ranks' uneven start-up (imports on a busy
    machine)."""
    store.add("ctxpar/arrived", 1)
    deadline = time.monotonic() + timeout_s
    while int(store.add("ctxpar/arrived", 0)) < world and time.monotonic() < deadline:
        time.sleep(0.05)


def _worker(rank, world, store_path, backend, threads, tasks, results, sys_path, env, timeout_s,
            parent_pid, start_timeout_s=120.0):
    _exit_with_parent(parent_pid)
    sys.path[:] = sys_path
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if backend == "nccl":
        rank_device("cuda", rank)
    store = dist.FileStore(store_path, world)
    _wait_for_peers(store, world, start_timeout_s)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    results.put(("ready", rank, True, None, None))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args, kwargs = task
        try:
            out = fn(*args, **kwargs)
            results.put((task_id, rank, True, out, None))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the caller
            results.put((task_id, rank, False, traceback.format_exc(), type(e).__name__))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` local processes in one gloo (or nccl) group.

    >>> with RankPool(2) as pool:
    ...     outs = pool.run(my_module.fn, arg)   # [result of rank 0, result of rank 1]
    """

    def __init__(self, world_size: int, *, backend: str = "gloo", threads: int = 1,
                 env: dict[str, str] | None = None, collective_timeout_s: float = 120.0,
                 start_timeout_s: float = 120.0):
        self.world_size = world_size
        self._dir = tempfile.mkdtemp(prefix="ctxpar-pool-")
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = []
        self._next_id = 0
        self.alive = True
        try:
            for r in range(world_size):
                p = ctx.Process(
                    target=_worker,
                    args=(r, world_size, os.path.join(self._dir, "store"), backend, threads,
                          self._tasks[r], self._results, list(sys.path), dict(env or {}),
                          collective_timeout_s, os.getpid(), start_timeout_s),
                    daemon=True,
                )
                p.start()
                self._procs.append(p)
            self._collect("ready", start_timeout_s)
        except BaseException:  # Ctrl-C or a signal while starting: no owner can close us yet
            self.close(kill=True)
            raise

    def _collect(self, task_id, timeout: float, grace: float = 5.0) -> dict[int, tuple]:
        got: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.world_size:
            failed = any(not ok for ok, *_ in got.values())
            crashed = any(not p.is_alive() for p in self._procs)
            if failed or crashed:
                # A rank failed or died: its peers may be stuck waiting for it; give them
                # a short grace period, not the whole timeout.
                deadline = min(deadline, time.monotonic() + grace)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                tid, rank, ok, payload, etype = self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if tid == task_id:
                got[rank] = (ok, payload, etype)
        missing = sorted(set(range(self.world_size)) - set(got))
        failures = {r: p for r, (ok, p, _) in got.items() if not ok}
        if missing:
            self.close(kill=True)
            msg = f"ranks {missing} did not answer within {timeout:.0f}s (hang or crash)"
            if failures:
                raise RankError(failures, {r: e for r, (ok, _, e) in got.items() if not ok},
                                silent=missing) from RankTimeout(msg)
            raise RankTimeout(msg)
        return got

    def run(self, fn: Callable[..., Any], *args, timeout: float = 120.0, **kwargs) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order.
        Raises :class:`RankError` if any rank raised, :class:`RankTimeout` on a hang."""
        if not self.alive:
            raise RuntimeError("this RankPool has been closed")
        self._next_id += 1
        tid = self._next_id
        for q in self._tasks:
            q.put((tid, fn, args, kwargs))
        got = self._collect(tid, timeout)
        failures = {r: p for r, (ok, p, _) in got.items() if not ok}
        if failures:
            if len(failures) < self.world_size:
                # Mixed outcome: the survivors may have traffic in flight that the failed
                # ranks never matched. The group is no longer trustworthy.
                self.close(kill=True)
            raise RankError(failures, {r: e for r, (ok, _, e) in got.items() if not ok})
        return [got[r][1] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        if not self.alive:
            return
        self.alive = False
        if not kill:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close(kill=exc[0] is not None)


def rank_device(kind: str, rank: int | None = None):
    """This rank's ``torch.device`` for ``kind`` ("cpu" or "cuda"), made current on CUDA.

    CUDA: GPU ``LOCAL_RANK`` under torchrun (the rank on this node), else ``rank`` (default:
    the rank in the default group; a local pool's ranks all share this machine), modulo
    the visible GPUs."""
    import torch

    if kind != "cuda":
        return torch.device(kind)
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")
    import torch.distributed as dist

    if under_torchrun() and "LOCAL_RANK" in os.environ:
        rank = int(os.environ["LOCAL_RANK"])
    elif rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    local = rank % torch.cuda.device_count()
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def sync_device(device) -> None:
    """Wait for ``device``'s queued work (CUDA), so that a host clock times it; a no-op on CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def under_torchrun() -> bool:
    """True when started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_job(fn: Callable[..., Any], *args, nproc: int = 2, device: str = "cpu",
            timeout: float = 3600.0, threads: int = 1, collective_timeout: float | None = None,
            **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on every rank and return the results in rank order.

    Under torchrun this process is one rank: the process group is initialised from the
    environment (NCCL for CUDA, gloo otherwise), ``fn`` runs here, and the list holds only
    this rank's result. Otherwise ``nproc`` local processes are spawned (NCCL, one GPU
    each, for ``device="cuda"``; gloo otherwise). A rank failure raises :class:`RankError`
    carrying its traceback; Ctrl-C (and SIGTERM or SIGHUP within :func:`stop_on_signals`)
    kills every rank. ``collective_timeout`` (seconds; default: the pool's 120 s, torch's
    default under torchrun) bounds every collective of the process group, ``timeout``
    the whole job on a local pool."""
    if under_torchrun():
        import torch.distributed as dist

        if not dist.is_initialized():
            _warn_shared_store_restart()
            rank_device(device)  # before the group: NCCL binds to the current GPU
            extra = ({} if collective_timeout is None else
                     {"timeout": datetime.timedelta(seconds=collective_timeout)})
            dist.init_process_group("nccl" if device == "cuda" else "gloo", **extra)
        return [fn(*args, **kwargs)]
    pool = RankPool(nproc, threads=threads, backend="nccl" if device == "cuda" else "gloo",
                    collective_timeout_s=collective_timeout or 120.0)
    try:
        return pool.run(fn, *args, timeout=timeout, **kwargs)
    except BaseException:
        pool.close(kill=True)
        raise
    finally:
        pool.close()


def _warn_shared_store_restart() -> None:
    """A restarted torchrun group (``--max-restarts``) on the agent's shared TCP store can
    read the dead group's addresses, which have the same keys, and fail or hang while
    connecting. torch's opt-out, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's
    environment, gives every rendezvous round a fresh store; say so on rank 0."""
    if (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and os.environ.get("RANK") == "0"):
        print("ctxpar: warning: a restarted torchrun group on the shared rendezvous store may "
              "read the previous group's addresses and fail to connect; start torchrun with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for elastic restarts", file=sys.stderr)


def run_command_job(command: str, fn: Callable[..., Any], *args, **kwargs) -> list[Any] | None:
    """:func:`run_job` for ``ctxpar <command>``: the results, or None after printing one
    line (and the failing ranks' tracebacks) to stderr when a rank failed or timed out.
    Under torchrun this process is one rank: its own traceback is tagged with its rank."""
    try:
        return run_job(fn, *args, **kwargs)
    except RankError as e:
        print(f"ctxpar {command}: failed on rank(s) {sorted(e.failures)}; all ranks "
              f"stopped\n{e}", file=sys.stderr)
    except RankTimeout as e:
        print(f"ctxpar {command}: timed out ({e}); all ranks stopped", file=sys.stderr)
    except Exception:
        if not under_torchrun():
            raise
        print(f"ctxpar {command}: rank {os.environ.get('RANK')} failed (torchrun stops the "
              f"others):\n{traceback.format_exc()}", file=sys.stderr)
    return None
