"""A launcher stopped by a signal takes its ranks with it: SIGTERM and SIGHUP to ``ctxpar
train`` stop every rank and exit 128 + the signal's number (as Ctrl-C exits 130), and a
SIGKILLed launcher, which runs no cleanup at all, leaves no orphaned rank behind either."""
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

if not os.path.isdir("/proc"):
    pytest.skip("finds the ranks through /proc", allow_module_level=True)

# Long enough that the ranks are still training when the signal arrives.
LONG_RUN = ["--nproc", "2", "--steps", "200", "--seq-len", "256", "--eval-batches", "1",
            "--no-equivalence", "--no-progress"]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pids) -> list[int]:
    return [p for p in pids if (st := _stat(p)) is not None and st[0] != "Z"]


def _ranks(launcher: int) -> list[int]:
    """The launcher's children that run ``multiprocessing.spawn`` (the ranks; not the
    resource tracker)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or (st := _stat(int(name))) is None or int(st[1]) != launcher:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def _start_and_wait_for_ranks(n: int = 2, timeout: float = 60.0):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "ctxpar", "train", *LONG_RUN],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    # Wait until every rank has loaded torch, i.e. is past its start-up imports: on a busy
    # machine those take seconds, and a rank's watch on its launcher starts right after.
    while len(ranks := _ranks(proc.pid)) < n or not all(map(_loaded_torch, ranks)):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the ranks never appeared (exit {proc.poll()}): {proc.communicate()}")
        time.sleep(0.1)
    time.sleep(1.0)  # let them get into their work
    return proc, ranks


def _loaded_torch(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return False


def _wait_launcher(proc, sig) -> None:
    """Wait for the launcher itself (not its pipes: orphaned ranks would hold them open)."""
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the launcher did not exit after {sig.name}")


def _assert_all_gone(proc, ranks, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while _alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(ranks)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in left:  # orphans may have left the group's reach only by pid
            os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks {left} outlived the launcher"


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGHUP"])
def test_signal_to_launcher_stops_every_rank(sig, code):
    proc, ranks = _start_and_wait_for_ranks()
    os.kill(proc.pid, sig)
    _wait_launcher(proc, sig)
    _assert_all_gone(proc, ranks)
    out, err = proc.communicate(timeout=10)  # EOF only once no rank holds the pipes
    assert proc.returncode == code, f"exit {proc.returncode}\n{out}\n{err}"
    assert sig.name in err and "Traceback" not in err, err


def test_killed_launcher_leaves_no_orphans():
    proc, ranks = _start_and_wait_for_ranks()
    os.kill(proc.pid, signal.SIGKILL)
    _wait_launcher(proc, signal.SIGKILL)
    _assert_all_gone(proc, ranks, within=20.0)  # a rank notices within its 0.5 s poll; slack for a busy machine
    proc.communicate(timeout=10)
