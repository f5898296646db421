"""``ctxpar train`` rejects bad arguments before it spawns a rank or trains a step, with
a message that names the offending value, and a non-zero exit."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

# Small enough that the code under test finishes quickly even if it would train.
TINY = ["--steps", "1", "--seq-len", "128", "--eval-batches", "1", "--no-equivalence",
        "--no-progress"]


def _train(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ctxpar", "train", *TINY, *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _assert_rejected(proc: subprocess.CompletedProcess, *named: str) -> None:
    assert proc.returncode != 0, proc.stdout
    for text in named:
        assert text in proc.stderr, (text, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "recall accuracy" not in proc.stdout, "it trained before rejecting the arguments"


def test_unwritable_out_is_rejected_before_training(tmp_path):
    (tmp_path / "file").write_text("a regular file, not a directory")
    out = tmp_path / "file" / "out"
    _assert_rejected(_train("--out", str(out)), "--out", str(out))


def test_zero_batch_size_is_rejected():
    _assert_rejected(_train("--batch-size", "0"), "--batch-size", "0")


@pytest.mark.parametrize("hcp", [("0", "2"), ("2", "-1")])
def test_nonpositive_hcp_is_rejected(hcp):
    _assert_rejected(_train("--hcp", *hcp), f"--hcp {hcp[0]} {hcp[1]}")


@pytest.mark.parametrize("args,named", [
    (("--ttt", "--ttt-layers", "0", "2"), ("--ttt-layers [2]", "--layers 2")),
    (("--ttt", "--ttt-chunk", "0"), ("--ttt-chunk", "0")),
    (("--ttt", "--ttt-lr", "nan"), ("--ttt-lr", "nan")),
    (("--ttt-chunk", "8",), ("--ttt-chunk", "need --ttt")),
    (("--ttt", "--ttt-target", "mlp_output"), ("--ttt-target", "mlp_output")),
])
def test_bad_ttt_flags_are_rejected(args, named):
    _assert_rejected(_train(*args), *named)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("argv", [["train", *TINY, "--device", "cuda"], ["verify", "--device", "cuda"],
                                  ["bench", "--quick", "--device", "cuda"],
                                  ["plan", "--calibrate", "--on", "cuda"]])
def test_cuda_without_a_gpu_is_refused_at_once(argv):
    """Before, each rank crashed and the launcher waited 120 s for them (train, verify)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "ctxpar", *argv], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode != 0 and "cuda, but this torch" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv,named", [
    (["verify", "--nproc", "0"], "--nproc 0"), (["bench", "--worlds", "0"], "--worlds"),
    (["bench", "--repeats", "0"], "--repeats 0"), (["bench", "--seq-lens", "512,x"], "'512,x'")])
def test_bad_counts_are_refused_before_any_rank(argv, named, tmp_path):
    """Before: a ZeroDivisionError (verify --nproc 0, bench --worlds 0), or a bench cell
    that ran and then had no median (--repeats 0)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    extra = ["--out", str(tmp_path / "b")] if argv[0] == "bench" else []
    proc = subprocess.run([sys.executable, "-m", "ctxpar", *argv, *extra], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode != 0 and named in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
