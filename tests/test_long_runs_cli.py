"""Long runs of ``ctxpar train`` from the outside (issue 15): an elastic restart under
``torchrun --max-restarts`` after a SIGKILLed rank, two torchrun agents on this machine as
two nodes (``ctxpar train --hcp 2 2`` and ``ctxpar verify``), a SIGSTOPped rank that must end
the run within ``--timeout`` naming it, and a resume that contradicts its checkpoint.

Every process runs in its own session, is bounded by a timeout and its whole group is
killed in ``finally``; these tests are slow-ish (tens of seconds) but part of the suite."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

from ctxpar.apps.train import checkpoint as ckp  # noqa: E402
from ctxpar.apps.train.config import TrainConfig  # noqa: E402
from ctxpar.apps.train.worker import train_worker  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
TINY = ["--steps", "6", "--seq-len", "192", "--hidden", "32", "--kv-heads", "2",
        "--eval-batches", "0", "--no-equivalence", "--no-progress", "--timeout", "60"]


def _env():
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(_env(), **env),
                            start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """Wait for every process (each within what is left of ``timeout``); kill every group
    in any case."""
    deadline = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, o, e))
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {timeout}s")
    finally:
        for p in procs:
            _kill_group(p)
    return out


def _torchrun(port: int, nnodes: int, node_rank: int, *args: str) -> subprocess.Popen:
    # A fresh store per rendezvous round: on torch's shared one a restarted group can read
    # the dead group's addresses (see ctxpar.apps.launch).
    return _start(["-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank",
                   str(node_rank), "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{port}", *args],
                  TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def test_elastic_restart_after_sigkill_matches_uninterrupted_run(rank_pools, tmp_path):
    # Rank 1 SIGKILLs itself at step 3 on the first attempt; torchrun restarts the group,
    # which resumes from the step-2 checkpoint.
    ck, out = tmp_path / "ck", tmp_path / "out"
    proc = _torchrun(_free_port(), 1, 0, "--max-restarts", "2", "-m", "ctxpar", "train",
                     *TINY, "--checkpoint-dir", str(ck), "--save-every", "2",
                     "--kill-rank", "1", "--kill-step", "3", "--out", str(out))
    (code, stdout, stderr), = _finish([proc], 240)
    assert code == 0, stderr[-3000:]
    assert "exitcode: -9" in stderr and "resuming from" in stdout, (stdout, stderr[-3000:])
    got = json.loads((out / "metrics.json").read_text())["history"]["loss"]
    # The uninterrupted run, on this session's 2-rank pool.
    ref_dir = tmp_path / "ref"
    cfg = TrainConfig(nproc=2, seq_len=192, steps=6, hidden=32, kv_heads=2, eval_batches=0,
                      equivalence=False, progress=False, timeout=60.0,
                      ckpt=ckp.CheckpointConfig(str(ref_dir), save_every=2))
    ref = rank_pools.get(2).run(train_worker, cfg, timeout=180)[0]["history"]["loss"]
    print("step  uninterrupted        killed at step 3, resumed from step 2")
    for i, (a, b) in enumerate(zip(ref, got)):
        print(f"{i + 1:4d}  {a:.10f}  {b:.10f}")
    # Equal up to the threads' summation order (torchrun ranks take cores // world threads).
    assert got == pytest.approx(ref, rel=1e-6) and len(got) == 6
    mine, theirs = ckp.read_state(ckp.latest(str(ck))), ckp.read_state(ckp.latest(str(ref_dir)))
    for k in (k for k in theirs if k.startswith("model.")):
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-7)


def test_two_torchrun_agents_run_hybrid_train_and_verify(tmp_path):
    # Two agents = two nodes of 2 ranks; --hcp 2 2 puts each Ulysses pair on one node,
    # which cp_mesh checks (GROUP_RANK) before training.
    for command in (["train", *TINY, "--hcp", "2", "2", "--layout", "zigzag"],
                    ["verify", "--methods", "hybrid,ring", "--dtypes", "float32"]):
        port = _free_port()
        procs = [_torchrun(port, 2, i, "-m", "ctxpar", *command) for i in (0, 1)]
        results = _finish(procs, 240)
        for code, o, e in results:
            assert code == 0, f"{command[0]}: exit {code}\n{o[-2000:]}\n{e[-3000:]}"
        text = "".join(o for _, o, _ in results)
        if command[0] == "train":
            assert "4 ranks (torchrun, cpu), method=hybrid (hcp a2a=2 p2p=2)" in text, text
        else:
            assert "world=4" in text and "FAIL" not in text and "hybrid" in text, text


def _children(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except (OSError, ValueError):
            continue
        if int(fields[1]) == pid and spawned:
            kids.append(int(name))
    return sorted(kids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks through /proc")
def test_sigstopped_rank_fails_the_run_within_timeout(tmp_path):
    timeout = 10
    proc = _start(["-m", "ctxpar", "train", "--nproc", "2", "--steps", "2000", "--seq-len",
                   "192", "--hidden", "32", "--kv-heads", "2", "--no-progress",
                   "--no-equivalence", "--eval-batches", "0", "--timeout", str(timeout),
                   "--checkpoint-dir", str(tmp_path), "--save-every", "1"])
    try:
        deadline = time.monotonic() + 120
        while not ckp.latest(str(tmp_path)):  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        ranks = _children(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGSTOP)  # the pool spawns rank 0 first: rank 1's pid is higher
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=timeout + 60)
        elapsed = time.monotonic() - stopped
    finally:
        _kill_group(proc)
    assert proc.returncode == 1, err[-3000:]
    # The collective timeout (from when the live rank starts waiting: it may be mid-step),
    # a roll call of timeout/4 (>= 2 s), the launcher's 5 s grace, slack for a busy machine.
    assert elapsed < timeout + 2.5 + 5 + 20, elapsed
    print(err[-2500:])
    assert "silent rank(s) [1] never answered" in err, err[-3000:]
    assert f"did not complete within {timeout}s (--timeout)" in err, err[-3000:]
    assert "roll call: Ranks 1 failed to pass monitoredBarrier" in err or "rank 0" in err
    assert "training step" in err or "checkpoint save" in err, err[-3000:]
    time.sleep(1.0)
    assert not [p for p in ranks if _alive(p)], "a rank outlived the run"


def test_contradicting_resume_exits_before_any_rank(tmp_path):
    ck = tmp_path / "ck"
    (ck / "step-00000002").mkdir(parents=True)
    (ck / "step-00000002" / ".metadata").write_bytes(b"\x00garbage")
    proc = _start(["-m", "ctxpar", "train", *TINY, "--checkpoint-dir", str(ck), "--resume",
                   "--out", str(tmp_path / "out")])
    (code, _, err), = _finish([proc], 120)
    assert code != 0 and "step-00000002 is missing or corrupt" in err, err
    assert sorted(os.listdir(ck)) == ["step-00000002"]
    assert not os.listdir(tmp_path / "out")  # nothing written
