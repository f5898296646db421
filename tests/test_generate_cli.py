"""``ctxpar generate`` as a user runs it: ``ctxpar train --out DIR`` saves the model,
``ctxpar generate --model DIR`` loads it, decodes held-out recall prompts under CP and
reports tokens equal to one process; without ``--model`` it says the model is random;
bad flags are refused before any rank starts."""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def _ctxpar(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ctxpar", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_train_saves_and_generate_loads(tmp_path):
    out = _ok(_ctxpar("train", "--steps", "2", "--seq-len", "128", "--eval-batches", "1",
                      "--no-equivalence", "--no-progress", "--out", str(tmp_path)))
    assert f"model saved to {tmp_path}" in out
    task = json.loads((tmp_path / "ctxpar_task.json").read_text())
    assert task["seq_len"] == 128 and (tmp_path / "config.json").exists()
    out = _ok(_ctxpar("generate", "--model", str(tmp_path), "--nproc", "3", "--method", "pass-q",
                      "--layout", "contiguous", "--prompts", "2", "--new-tokens", "4"))
    assert f"model: {tmp_path}, trained 2 steps at 128 tokens" in out
    assert "tokens equal single-process generate(): yes" in out
    assert re.search(r"recall accuracy \(first new token = the answer\): \d", out)
    assert re.search(r"prefill: [\d.]+ s under CP, [\d.]+ s in one process", out)
    kv = re.search(r"KV cache bytes: rank 0 ([\d.]+) MiB, rank 1 ([\d.]+) MiB, rank 2 "
                   r"([\d.]+) MiB; one process ([\d.]+) MiB", out)
    assert kv and abs(3 * float(kv.group(1)) - float(kv.group(4))) < 0.02, out


def test_hybrid_mesh_generates_what_one_process_does():
    out = _ok(_ctxpar("generate", "--hcp", "2", "2", "--layout", "contiguous", "--seq-len", "128",
                      "--prompts", "2", "--new-tokens", "3"))
    assert "ctxpar generate: 4 ranks (mesh [a2a, p2p] = [2, 2])" in out
    assert "tokens equal single-process generate(): yes" in out
    assert re.search(r"KV cache bytes: rank 0 [\d.]+ MiB, rank 1 [\d.]+ MiB, rank 2 [\d.]+ MiB, "
                     r"rank 3 [\d.]+ MiB; one process", out), out


def test_random_model_says_so():
    out = _ok(_ctxpar("generate", "--seq-len", "128", "--prompts", "3", "--new-tokens", "3"))
    assert "model: random (no --model given" in out
    assert "tokens equal single-process generate(): yes" in out
    assert "decode:" in out and "tokens/s" in out


@pytest.mark.parametrize("args,named", [
    (["--method", "ring"], "--method"), (["--new-tokens", "0"], "--new-tokens 0"),
    (["--hcp", "0", "2"], "--hcp 0 2"),
    (["--model", "/nonexistent/ctxpar"], "--model /nonexistent/ctxpar")])
def test_bad_flags_are_refused(args, named):
    proc = _ctxpar("generate", *args, timeout=60)
    assert proc.returncode != 0 and named in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "recall accuracy" not in proc.stdout
