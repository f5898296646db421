"""Checkpoints of ``ctxpar train`` (issue 15), on the session's rank pools: exact resume
(bit for bit on CPU), resharding 4 -> 3 -> 2 -> 1 and a [2, 2] mesh -> a 1-D group of 4
(fp32 tolerance), a kill inside a save, a ``--fail-rank`` failure after a checkpoint, and
the bad checkpoints (missing, corrupt, another model, contradicting options)."""
import dataclasses
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from ctxpar.apps.launch import RankError, RankTimeout  # noqa: E402
from ctxpar.apps.train import checkpoint as ckp  # noqa: E402
from ctxpar.apps.train.config import TrainConfig  # noqa: E402
from ctxpar.apps.train.worker import train_worker  # noqa: E402

STEPS = 6


def _cfg(directory, world=2, **kw) -> TrainConfig:
    ck = dict(save_every=2, keep=10)
    ck.update({k: kw.pop(k) for k in ("save_every", "keep", "die_in_save") if k in kw})
    base = dict(nproc=world, seq_len=192, steps=STEPS, hidden=32, layers=2, heads=4,
                kv_heads=2, eval_batches=0, equivalence=False, progress=False, timeout=60.0,
                ckpt=ckp.CheckpointConfig(str(directory), **ck))
    return TrainConfig(**{**base, **kw})


def _train(pools, cfg) -> dict:
    return pools.get(cfg.nproc).run(train_worker, cfg, timeout=180)[0]


def _resume_from(src_dir, step, dst_dir) -> None:
    name = f"step-{step:08d}"
    os.makedirs(dst_dir, exist_ok=True)
    shutil.copytree(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def _params(path) -> dict:
    return {k: v for k, v in ckp.read_state(path).items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def reference(rank_pools, tmp_path_factory):
    """The uninterrupted run on 2 ranks (ring, zigzag), a checkpoint after every 2 steps."""
    d = tmp_path_factory.mktemp("ref")
    return d, _train(rank_pools, _cfg(d))


def _assert_same_run(got: dict, ref_dir, ref: dict, got_dir, exact=True) -> None:
    a, b = got["history"]["loss"], ref["history"]["loss"]
    assert len(a) == len(b) == STEPS
    final_a, final_b = _params(ckp.latest(str(got_dir))), _params(ckp.latest(str(ref_dir)))
    assert final_a.keys() == final_b.keys()
    if exact:
        assert a == b  # bit for bit
        for k in final_a:
            assert torch.equal(final_a[k], final_b[k]), k
    else:
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
        for k in final_a:
            torch.testing.assert_close(final_a[k], final_b[k], rtol=1e-4, atol=1e-5)
    assert a[:2] != a[2:4]  # the run did train (a test that can fail)


def test_exact_resume_two_ranks_zigzag_ring(rank_pools, reference, tmp_path):
    ref_dir, ref = reference
    _resume_from(ref_dir, 4, tmp_path)
    got = _train(rank_pools, _cfg(tmp_path))
    assert got["history"]["loss"][:4] == ref["history"]["loss"][:4]  # restored history
    _assert_same_run(got, ref_dir, ref, tmp_path)


def test_exact_resume_hybrid_2_1(rank_pools, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    ref = _train(rank_pools, _cfg(full, hcp=(2, 1)))
    _resume_from(full, 2, part)
    got = _train(rank_pools, _cfg(part, hcp=(2, 1)))
    _assert_same_run(got, full, ref, part)


def test_reshard_4_3_2_1(rank_pools, tmp_path):
    # Each run resumes from a checkpoint written by the previous world size: 4 ranks'
    # step 2 -> 3 ranks, whose step 3 -> 2 ranks, whose step 5 -> 1 rank.
    full = tmp_path / "w4"
    ref = _train(rank_pools, _cfg(full, world=4))
    prev, chain = full, [(3, 2), (2, 3), (1, 5)]
    for world, step in chain:
        here = tmp_path / f"w{world}"
        _resume_from(prev, step, here)
        got = _train(rank_pools, _cfg(here, world=world, save_every=1))
        _assert_same_run(got, full, ref, here, exact=False)
        prev = here


def test_reshard_hybrid_2_2_to_ring_of_4(rank_pools, tmp_path):
    full, ring = tmp_path / "hcp", tmp_path / "ring"
    ref = _train(rank_pools, _cfg(full, world=4, hcp=(2, 2)))
    _resume_from(full, 2, ring)
    got = _train(rank_pools, _cfg(ring, world=4, layout="contiguous"))
    _assert_same_run(got, full, ref, ring, exact=False)


def test_kill_during_save_leaves_previous_checkpoint(rank_pools, reference, tmp_path):
    ref_dir, ref = reference
    with pytest.raises((RankError, RankTimeout)):  # rank 0 SIGKILLed inside the step-4 save
        _train(rank_pools, _cfg(tmp_path, die_in_save=4))
    names = sorted(os.listdir(tmp_path))
    assert names == [".tmp-step-00000004", "step-00000002"], names
    assert ckp.latest(str(tmp_path)).endswith("step-00000002")
    got = _train(rank_pools, _cfg(tmp_path))  # resumes from step 2; the leftover goes
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path))
    _assert_same_run(got, ref_dir, ref, tmp_path)


def test_fail_rank_after_checkpoint_resumes_there(rank_pools, reference, tmp_path):
    ref_dir, ref = reference
    with pytest.raises(RankError, match="injected failure on rank 1 at step 4"):
        _train(rank_pools, _cfg(tmp_path, save_every=3, fail_rank=1, fail_step=4))
    assert ckp.latest(str(tmp_path)).endswith("step-00000003")
    got = _train(rank_pools, _cfg(tmp_path, save_every=3))
    _assert_same_run(got, ref_dir, ref, tmp_path)


# ------------------------------------------------------------------------------ bad input


def test_resume_without_checkpoint_is_refused(tmp_path):
    cfg = _cfg(tmp_path / "none")
    assert ckp.check_resume(cfg) == 0  # automatic: a fresh run
    with pytest.raises(SystemExit, match=r"--resume: no checkpoint in .*none"):
        ckp.check_resume(dataclasses.replace(cfg, ckpt=dataclasses.replace(cfg.ckpt, resume=True)))
    assert not (tmp_path / "none").exists()


def test_contradicting_options_are_refused(reference, tmp_path):
    ref_dir, _ = reference
    _resume_from(ref_dir, 2, tmp_path)
    assert ckp.check_resume(_cfg(tmp_path)) == 2
    assert ckp.check_resume(_cfg(tmp_path, world=4, method="ulysses", layout="contiguous")) == 2
    with pytest.raises(SystemExit, match=r"--seq-len 384 \(checkpoint: 192\)"):
        ckp.check_resume(_cfg(tmp_path, seq_len=384))
    with pytest.raises(SystemExit, match=r"--hidden 64 \(checkpoint: 32\).*--lr"):
        ckp.check_resume(_cfg(tmp_path, hidden=64, lr=1e-3))
    assert sorted(os.listdir(tmp_path)) == ["step-00000002"]


def test_corrupt_checkpoints_are_refused(rank_pools, reference, tmp_path):
    ref_dir, _ = reference
    meta, data = tmp_path / "meta", tmp_path / "data"
    _resume_from(ref_dir, 2, meta)
    (meta / "step-00000002" / ".metadata").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"step-00000002 is missing or corrupt"):
        ckp.check_resume(_cfg(meta))
    _resume_from(ref_dir, 2, data)
    for f in (data / "step-00000002").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncated
    try:
        ckp.check_resume(_cfg(data))  # the run record may be in a truncated file ...
    except SystemExit as e:
        assert "missing or corrupt" in str(e)
    else:  # ... or not: then every rank's full read fails
        with pytest.raises(RankError, match="could not be read"):
            _train(rank_pools, _cfg(data))
    assert sorted(os.listdir(data)) == ["step-00000002"]


def test_checkpoint_of_another_model_is_refused_on_every_rank(rank_pools, reference, tmp_path):
    # The configuration check is skipped here (the rank-side guard must hold on its own).
    ref_dir, _ = reference
    _resume_from(ref_dir, 2, tmp_path)
    with pytest.raises(RankError) as e:
        _train(rank_pools, _cfg(tmp_path, hidden=64))
    assert sorted(e.value.failures) == [0, 1]
    assert "of shape (" in str(e.value) and "another model" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["step-00000002"]
