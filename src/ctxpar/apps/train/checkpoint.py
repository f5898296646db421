"""Checkpoints of ``ctxpar train`` with ``torch.distributed.checkpoint`` (DCP): save, publish
atomically, find the latest, check a resume against it, and restore.

On disk, ``--checkpoint-dir D`` holds one DCP checkpoint per saved step::

    D/step-00000006/   .metadata, __0_0.distcp, ...   (complete: published by a rename)
    D/.tmp-step-00000008/                              (a save in progress, or interrupted)

A checkpoint named ``step-K`` is the state after K optimizer steps. Every rank writes into
the temporary folder (``dcp.save``, collective; the coordinator writes ``.metadata`` once
every rank has written its part), then rank 0 renames it to ``step-K`` (atomic on POSIX) and
the ranks meet in a barrier. A reader only looks at ``step-*`` folders, so it sees complete
checkpoints or none; a save killed half-way leaves a ``.tmp-*`` folder that the next run
removes, and the previous ``step-*`` stays the latest. ``D`` must be one folder seen by
every rank (a shared file system across nodes).

What a checkpoint holds, and which rank it belongs to:

- ``model``, ``optim``: the model and AdamW state (``get_state_dict``/``set_state_dict``).
  CP replicates parameters and optimizer state on every rank (it shards the sequence, not
  the weights), so DCP writes one copy and any world size reads it back: resharding 4 -> 2
  -> 1, or a [2, 2] mesh -> a 1-D group of 4, needs nothing more.
- ``run``: the step (the data-stream position: a step's batch is generated from
  ``(seed, step)`` and its length is ``lengths[step]``), the length schedule, the history
  of the finished steps, the configuration (JSON; a resume that contradicts it is refused)
  and the torch RNG states (CPU; CUDA with ``--device cuda``). The learning rate is a
  function of (step, steps, lr), so the step restores the schedule. All of it is
  replicated: the data and model init use their own seeded generators, never a per-rank
  stream, and no Python/numpy generator is used, so nothing is per rank.

Resume is automatic: a run whose ``--checkpoint-dir`` holds a checkpoint continues from
the latest one (what ``torchrun --max-restarts`` needs: it restarts the same command).
``--resume`` additionally requires one to exist.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal

__all__ = ["CheckpointConfig", "add_arguments", "checkpoint_config", "latest", "check_resume",
           "prepare", "save", "restore", "read_state", "COMPARED_EXCEPT"]

_NAME = re.compile(r"^step-(\d{8})$")
_TMP = ".tmp-"

#: TrainConfig fields a resume may change: how the run is laid out on ranks, not what it
#: computes. Every other field (the model shape, the data, the optimizer, the schedule,
#: fields added later) must equal the checkpoint's.
COMPARED_EXCEPT = frozenset({"nproc", "method", "layout", "hcp", "device", "eval_batches",
                             "equivalence", "progress", "fail_rank", "fail_step", "save_dir",
                             "timeout", "ckpt"})


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often ``ctxpar train`` saves, and the test-only failure switches."""

    dir: str
    save_every: int = 0  # 0: only at the end of the run
    resume: bool = False  # True: a checkpoint must exist (else: resume if one exists)
    keep: int = 2  # published checkpoints kept (older ones are removed)
    kill_rank: int = -1  # test-only: this rank SIGKILLs itself at kill_step ...
    kill_step: int = -1  # ... on the first attempt (TORCHELASTIC_RESTART_COUNT unset or 0)
    die_in_save: int = -1  # test-only: rank 0 SIGKILLs itself inside the save of this step

    def __post_init__(self) -> None:
        if self.save_every < 0 or self.keep < 1:
            raise ValueError(f"--save-every must be >= 0 and --keep-checkpoints >= 1; got "
                             f"{self.save_every} and {self.keep}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint flags of ``ctxpar train``."""
    p.add_argument("--checkpoint-dir", default=None,
                   help="save DCP checkpoints here; a run whose folder holds one resumes from "
                        "the latest (the folder must be shared by every rank)")
    p.add_argument("--save-every", type=int, default=0,
                   help="save every K steps (and always after the last step)")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint in --checkpoint-dir and continue from it")
    p.add_argument("--keep-checkpoints", type=int, default=2, dest="keep_checkpoints",
                   help="published checkpoints to keep")
    # Test-only: one rank SIGKILLs itself at a step (first torchrun attempt only), or rank 0
    # inside a save.
    p.add_argument("--kill-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--kill-step", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--die-in-save", type=int, default=-1, help=argparse.SUPPRESS)


def checkpoint_config(args: argparse.Namespace) -> CheckpointConfig | None:
    """The :class:`CheckpointConfig` of the flags (None without ``--checkpoint-dir``); exits
    with one line on a bad value."""
    if not getattr(args, "checkpoint_dir", None):
        if args.resume or args.save_every:
            raise SystemExit("ctxpar train: --resume and --save-every need --checkpoint-dir")
        return None
    try:
        return CheckpointConfig(os.path.abspath(args.checkpoint_dir), args.save_every,
                                args.resume, args.keep_checkpoints, args.kill_rank,
                                args.kill_step, args.die_in_save)
    except ValueError as e:
        raise SystemExit(f"ctxpar train: {e}") from None


# ----------------------------------------------------------------------- finding, checking


def latest(directory: str) -> str | None:
    """The published checkpoint of the highest step in ``directory`` (a path), or None."""
    if not os.path.isdir(directory):
        return None
    steps = [int(m.group(1)) for n in os.listdir(directory) if (m := _NAME.match(n))]
    return os.path.join(directory, f"step-{max(steps):08d}") if steps else None


def _step_of(path: str) -> int:
    return int(_NAME.match(os.path.basename(path)).group(1))


def _read_run(path: str) -> dict:
    """The ``run`` record of checkpoint ``path`` (no process group needed); ValueError
    naming the path when it is not a readable DCP checkpoint."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    run = {"step": 0, "config": "", "lengths": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
            dcp.load({"run": run}, checkpoint_id=path, no_dist=True)
        run["config"], run["lengths"] = json.loads(run["config"]), json.loads(run["lengths"])
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - unreadable is "corrupt"
        raise ValueError(f"checkpoint {path} is missing or corrupt, not a readable ctxpar "
                         f"train checkpoint ({_why(e)})") from None
    return run


def _why(e: BaseException) -> str:
    """The cause in one line: DCP wraps the rank's error; its last line says what failed."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {(lines[-1] if lines else '')[:200]}"


def check_resume(cfg) -> int:
    """Launcher side, before any rank starts: the step ``cfg`` resumes from (0: a fresh
    run). Exits with one line naming the checkpoint and the values when ``--resume`` finds
    none, the latest is unreadable, or ``cfg`` contradicts the configuration it was
    written with. Nothing is written."""
    ck = cfg.ckpt
    path = latest(ck.dir)
    if path is None:
        if ck.resume:
            raise SystemExit(f"ctxpar train: --resume: no checkpoint in {ck.dir} (expected "
                             f"{ck.dir}/step-NNNNNNNN folders, written by --checkpoint-dir)")
        return 0
    try:
        run = _read_run(path)
    except ValueError as e:
        raise SystemExit(f"ctxpar train: {e}") from None
    saved, now = run["config"], dataclasses.asdict(cfg)
    diff = [k for k in sorted(set(saved) | set(now)) if k not in COMPARED_EXCEPT
            and _plain(saved.get(k)) != _plain(now.get(k))]
    if diff:
        raise SystemExit(
            "ctxpar train: the options contradict checkpoint " + path + ": "
            + ", ".join(f"--{k.replace('_', '-')} {now.get(k)!r} (checkpoint: {saved.get(k)!r})"
                        for k in diff)
            + "; resume with the checkpoint's values or use another --checkpoint-dir")
    return run["step"]


def _plain(x):
    """JSON round trip: tuples and lists compare equal, as they do after saving."""
    return json.loads(json.dumps(x))


# ----------------------------------------------------------------------------- rank side


def _state(r, opt, step: int, hist: dict) -> dict:
    """The state dict that DCP saves and loads (see the module docstring)."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(r.model, opt)
    run = {"step": step, "lengths": json.dumps(r.lengths), "history": json.dumps(hist),
           "config": json.dumps(dataclasses.asdict(r.cfg)), "rng_cpu": torch.get_rng_state()}
    if r.device.type == "cuda":
        run["rng_cuda"] = torch.cuda.get_rng_state(r.device)
    return {"model": model_sd, "optim": optim_sd, "run": run}


def prepare(ck: CheckpointConfig, rank: int) -> None:
    """Before the first save (collective): rank 0 creates the folder and removes the
    leftovers of interrupted saves; the others wait for it."""
    import torch.distributed as dist

    if rank == 0:
        os.makedirs(ck.dir, exist_ok=True)
        for name in os.listdir(ck.dir):
            if name.startswith(_TMP):
                shutil.rmtree(os.path.join(ck.dir, name), ignore_errors=True)
    dist.barrier()


def save(r, opt, step: int, hist: dict) -> str:
    """Collective: save the state after ``step`` steps and publish it as ``step-K``; returns
    its path. Rank 0 then removes all but the newest ``keep`` checkpoints."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    ck = r.cfg.ckpt
    name = f"step-{step:08d}"
    tmp, final = os.path.join(ck.dir, _TMP + name), os.path.join(ck.dir, name)
    dcp.save(_state(r, opt, step, hist), checkpoint_id=tmp)  # returns once .metadata is written
    if step == ck.die_in_save and r.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # test-only: written but never published
    if r.rank == 0:
        os.rename(tmp, final)  # the publication: atomic
        _fsync_dir(ck.dir)
        _prune(ck)
    dist.barrier()  # nobody goes on (or reports success) before the checkpoint is published
    return final


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(ck: CheckpointConfig) -> None:
    """Remove all but the newest ``keep`` checkpoints; each is first renamed out of the
    ``step-*`` namespace (atomic), so a kill while deleting never leaves a partial one."""
    names = sorted(n for n in os.listdir(ck.dir) if _NAME.match(n))
    for name in names[:-ck.keep]:
        doomed = os.path.join(ck.dir, _TMP + "old-" + name)
        os.rename(os.path.join(ck.dir, name), doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _check_shapes(path: str, state: dict) -> dict:
    """ValueError naming the first tensor whose shape in the checkpoint differs from this
    run's (a checkpoint of another model), before anything is loaded; returns the
    checkpoint's metadata by key."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        meta = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - unreadable metadata is a corrupt checkpoint
        raise ValueError(f"checkpoint {path} could not be read, it is corrupt ({_why(e)})"
                         ) from None
    for key, tensor in _flat("model", state["model"]):
        md = meta.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"checkpoint {path} has no tensor {key!r}: it was written by "
                             f"another model")
        if tuple(md.size) != tuple(tensor.shape):
            raise ValueError(f"checkpoint {path} holds {key} of shape {tuple(md.size)}, this "
                             f"model's is {tuple(tensor.shape)}: it was written by another model")
    return meta


def _flat(prefix: str, d: dict):
    for k, v in d.items():
        yield f"{prefix}.{k}", v


def restore(r, opt, path: str) -> tuple[int, dict]:
    """Load checkpoint ``path`` into this rank's model, optimizer and RNG (collective);
    returns (step, history). Sets ``r.lengths`` to the checkpoint's schedule."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(r, opt, 0, {})
    if "run.rng_cuda" not in _check_shapes(path, state):
        state["run"].pop("rng_cuda", None)  # saved on CPU, resumed on CUDA: its seed stays
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - unreadable is corrupt
        raise ValueError(f"checkpoint {path} could not be read, it is corrupt ({_why(e)})"
                         ) from None
    set_state_dict(r.model, opt, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    run = state["run"]
    torch.set_rng_state(run["rng_cpu"])
    if "rng_cuda" in run:
        torch.cuda.set_rng_state(run["rng_cuda"], r.device)
    lengths = json.loads(run["lengths"])
    _check_lengths(r, lengths, path)
    r.lengths = lengths
    return int(run["step"]), json.loads(run["history"])


def _check_lengths(r, lengths: list[int], path: str) -> None:
    """The checkpoint's length schedule is the data stream; this topology must split it."""
    from ctxpar.apps.train.config import length_multiple

    m = length_multiple(r.cfg.layout, r.cfg.hcp, r.world)
    bad = sorted({n for n in lengths if n % m})
    if bad or (r.cfg.ttt and lengths != r.lengths):
        raise ValueError(f"checkpoint {path} trains at lengths {sorted(set(lengths))}, which "
                         f"layout={r.cfg.layout!r} on {r.world} ranks cannot split (multiple "
                         f"of {m}{' and the same schedule with --ttt' if r.cfg.ttt else ''})")


def read_state(path: str) -> dict[str, object]:
    """Every tensor of checkpoint ``path`` by its flat key (``model.<name>``,
    ``optim.state.<name>.<field>``, ...), read in this one process (for tests and
    inspection)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(path).read_metadata().state_dict_metadata
    flat = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
            for k, md in meta.items() if isinstance(md, TensorStorageMetadata)}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(flat, checkpoint_id=path, no_dist=True)
    return flat
