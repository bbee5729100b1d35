"""Lossless run checkpoints: weights, optimiser, scheduler, RNG, data position, version, buffered
trajectories and the prompts in flight; verified before use, in formats that cannot run code.

Layout under ``<run_dir>/checkpoints``::

    step-000010/
        model/            written by TrainEngine.save (HF safetensors weights + train state)
        trainer.json      version, step, data position, metrics counters
        rollout.json      the replay buffer's groups and the items queued or running (plain JSON)
        MANIFEST.json     the size in bytes of every file above
        COMPLETE          written last: a directory without it is ignored
    latest                name of the newest complete checkpoint (replaced atomically)

A checkpoint is written into a hidden temporary directory and renamed into place, so a
``kill -9`` at any moment leaves either the previous or the new checkpoint, never a torn one. A
save that fails (disk full, read-only directory) removes its temporary directory, keeps the
previous checkpoints and raises a :class:`CheckpointError` saying what ran out and where.

Loading never unpickles: ``rollout.pkl`` (older agentflow) is refused, and :meth:`Checkpointer.verify`
checks every file against the manifest, the JSON files' shape and each safetensors header before
a checkpoint is used. :meth:`Checkpointer.latest_intact` falls back to the newest checkpoint that
passes, with a warning naming what was wrong with each newer one.

Not here: what the model files hold (the train engine writes and reads them).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import shutil
import struct
import zipfile
from collections.abc import Callable
from typing import Any

from agentflow import _plainstate
from agentflow.errors import CheckpointError

__all__ = ["Checkpointer"]

log = logging.getLogger("agentflow.checkpoint")
_MANIFEST, _ROLLOUT, _TRAINER, _PICKLED = "MANIFEST.json", "rollout.json", "trainer.json", "rollout.pkl"
_TRAIN_STATE = "agentflow_train_state.pt"  # the train engine's optimiser and scheduler state, in model/


class Checkpointer:
    """Writes, verifies and finds checkpoints of one run. Only rank 0 writes the non-model files."""

    def __init__(self, run_dir: str | pathlib.Path, *, keep: int = 2, rank: int = 0) -> None:
        self.root = pathlib.Path(run_dir) / "checkpoints"
        self.keep = keep
        self.rank = rank

    def tmp_path(self, step: int) -> pathlib.Path:
        return self.root / f".tmp-step-{step:06d}"

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        *,
        save_model: Callable[[pathlib.Path], None],
        trainer_state: dict[str, Any],
        rollout_state: dict[str, Any],
        barrier: Callable[[], None] = lambda: None,
    ) -> pathlib.Path:
        """Write checkpoint ``step``. ``save_model(dir)`` is collective across ranks."""
        tmp, final = self.tmp_path(step), self.root / f"step-{step:06d}"
        lossy: list[str] = []
        rollout_raw = _plainstate.dumps(rollout_state, what="rollout state", lossy=lossy)  # refuse before writing
        if lossy:
            log.warning("checkpoint %d: trajectory info stored as repr strings: %s", step, ", ".join(lossy[:5]))
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            barrier()
            save_model(tmp / "model")
            barrier()
            if self.rank == 0:
                _write_atomic(tmp / _TRAINER, json.dumps(trainer_state, indent=1).encode())
                _write_atomic(tmp / _ROLLOUT, rollout_raw)
                _write_atomic(tmp / _MANIFEST, json.dumps(_sizes(tmp), indent=1).encode())
                _write_atomic(tmp / "COMPLETE", b"ok\n")
                _fsync_dir(tmp)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                _write_atomic(self.root / "latest", final.name.encode())
                _fsync_dir(self.root)
                self._prune()
        except Exception as e:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(self._save_failure(step, e)) from e
        barrier()
        return final

    def _save_failure(self, step: int, e: BaseException) -> str:
        """What ran out and where, and what is still there."""
        kept = self.latest()
        keeps = f"the previous checkpoint {kept} is kept" if kept else "there is no earlier checkpoint"
        return (f"could not write checkpoint step {step} under {self.root}: {_why_write_failed(self.root, e)}; "
                f"the partial directory was removed and {keeps}. Free space, make the directory writable or "
                "point logging.run_dir elsewhere, then run again with --resume.")

    # ------------------------------------------------------------------ find and verify
    def latest(self) -> pathlib.Path | None:
        """The newest complete checkpoint (COMPLETE marker present, not verified), or None."""
        for path in self._candidates():
            if (path / "COMPLETE").is_file():
                return path
        return None

    def latest_intact(self) -> pathlib.Path | None:
        """The newest checkpoint that passes :meth:`verify`; logs a warning naming what was wrong
        with each newer one. Raises :class:`CheckpointError` when checkpoints exist but none is
        intact (listing each one's problem); returns None when the run has no checkpoint."""
        problems: list[str] = []
        for path in self._candidates():
            if not (path / "COMPLETE").is_file():
                continue
            try:
                self.verify(path)
            except CheckpointError as e:
                problems.append(f"{path.name}: {e}")
                continue
            for p in problems:
                log.warning("skipping damaged checkpoint %s; using %s instead", p, path.name)
            return path
        if problems:
            raise CheckpointError("no intact checkpoint under " + str(self.root) + ":\n  "
                                  + "\n  ".join(problems)
                                  + "\nStart a new run (another logging.run_dir) or restore a checkpoint from a copy.")
        return None

    def verify(self, path: pathlib.Path) -> None:
        """Raise :class:`CheckpointError` naming the first problem of the checkpoint at ``path``."""
        if not (path / "COMPLETE").is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no COMPLETE marker); pick another one")
        if (path / _PICKLED).exists() and not (path / _ROLLOUT).exists():
            raise CheckpointError(
                f"{path / _PICKLED} is a pickle (written by an older agentflow); loading a pickle can run "
                "arbitrary code, so agentflow refuses it. Start a new run, or resume with the agentflow "
                "version that wrote it."
            )
        _check_manifest(path)
        self._read_states(path)
        _check_model_dir(path / "model")

    def load(self, path: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(trainer_state, rollout_state)`` of the checkpoint at ``path`` (verified first)."""
        self.verify(path)
        return self._read_states(path)

    def _read_states(self, path: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
        trainer = _plainstate.loads(_read(path / _TRAINER), what=str(path / _TRAINER))
        rollout = _plainstate.loads(_read(path / _ROLLOUT), what=str(path / _ROLLOUT))
        _check_trainer_state(trainer, str(path / _TRAINER))
        _check_rollout_state(rollout, str(path / _ROLLOUT))
        return trainer, rollout

    def _candidates(self) -> list[pathlib.Path]:
        """Checkpoint directories, newest step first (by step number, not name order). The
        ``latest`` pointer is written for people and tools but never trusted over the directories
        themselves: it may name an older checkpoint or a path outside the run directory."""
        return sorted(self._step_dirs(), key=_step_of, reverse=True)

    def _step_dirs(self) -> list[pathlib.Path]:
        return [p for p in self.root.glob("step-*") if _step_of(p) >= 0 and p.is_dir()]

    def problems(self) -> list[str]:
        """What makes this run's checkpoint directory unusable before anything is trained: the
        ``checkpoints`` path or a ``step-N`` entry that is not a directory."""
        if self.root.exists() and not self.root.is_dir():
            return [f"{self.root} is a file; expected the directory of this run's checkpoints. Move the file "
                    "away or point logging.run_dir elsewhere"]
        return [f"{p} is not a directory; expected only checkpoint directories named step-N there. Move it away"
                for p in sorted(self.root.glob("step-*")) if _step_of(p) >= 0 and not p.is_dir()]

    def _prune(self) -> None:
        done = sorted((p for p in self._step_dirs() if (p / "COMPLETE").is_file()), key=_step_of)
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _step_of(path: pathlib.Path) -> int:
    """The step number of ``step-N`` (any number of digits), -1 for other names."""
    digits = path.name.removeprefix("step-")
    return int(digits) if digits.isdigit() and path.name.startswith("step-") else -1


# ---------------------------------------------------------------------------------------- checks
def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e


def _expect_keys(state: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(state).__name__} {_short(state)}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)}; expected the keys {', '.join(keys)}")


def _expect(ok: bool, where: str, expected: str, got: Any) -> None:
    if not ok:
        raise CheckpointError(f"{where}: expected {expected}, got {type(got).__name__} {_short(got)}")


def _is_int(v: Any, lo: int | None = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_trainer_state(state: Any, where: str) -> None:
    """``{"step": int, "data": {"epoch", "pos", "seed", "size": int}, ...counters: int}``."""
    _expect_keys(state, ("step", "data"), where)
    _expect(_is_int(state["step"]), f"{where}: step", "an integer >= 0", state["step"])
    _expect_keys(state["data"], ("epoch", "pos", "seed", "size"), f"{where}: data")
    for key in ("epoch", "pos", "size"):
        _expect(_is_int(state["data"][key]), f"{where}: data.{key}", "an integer >= 0", state["data"][key])
    _expect(_is_int(state["data"]["seed"], None), f"{where}: data.seed", "an integer", state["data"]["seed"])
    for key in ("tokens_trained", "episodes_trained"):
        if key in state:
            _expect(_is_int(state[key]), f"{where}: {key}", "an integer >= 0", state[key])


def _check_rollout_state(state: Any, where: str) -> None:
    """``{"buffer": {"version": int, "groups": [group]}, "pending": [{"data", "group_id"}]}``; each
    group's trajectories must build (the same checks as a freshly made :class:`Trajectory`)."""
    _expect_keys(state, ("buffer", "pending"), where)
    _expect_keys(state["buffer"], ("version", "groups"), f"{where}: buffer")
    buf = state["buffer"]
    _expect(_is_int(buf["version"]), f"{where}: buffer.version", "an integer >= 0", buf["version"])
    _expect(isinstance(buf["groups"], list), f"{where}: buffer.groups", "a list", buf["groups"])
    for i, group in enumerate(buf["groups"]):
        _check_group(group, f"{where}: buffer.groups[{i}]")
    _expect(isinstance(state["pending"], list), f"{where}: pending", "a list", state["pending"])
    for i, item in enumerate(state["pending"]):
        _expect_keys(item, ("data", "group_id"), f"{where}: pending[{i}]")


def _check_group(group: Any, where: str) -> None:
    from agentflow._types import Trajectory

    _expect_keys(group, ("group_id", "data", "requeues", "trajectories"), where)
    _expect(_is_int(group["requeues"]), f"{where}.requeues", "an integer >= 0", group["requeues"])
    _expect(isinstance(group["trajectories"], list), f"{where}.trajectories", "a list", group["trajectories"])
    for j, traj in enumerate(group["trajectories"]):
        _expect_keys(traj, ("input_ids", "loss_mask", "logprobs", "versions"), f"{where}.trajectories[{j}]")
        try:
            Trajectory.from_dict(traj)
        except Exception as e:  # TypeError (unknown field), TrajectoryError (fields disagree), ...
            raise CheckpointError(f"{where}.trajectories[{j}] is not a valid trajectory: {e}") from e


def _sizes(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _check_manifest(path: pathlib.Path) -> None:
    manifest = path / _MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{manifest} is missing; expected every checkpoint to list its files' sizes")
    sizes = _plainstate.loads(_read(manifest), what=str(manifest))
    if not isinstance(sizes, dict):
        raise CheckpointError(f"{manifest}: expected a JSON object of file sizes")
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {_MANIFEST})")
        got = f.stat().st_size
        if got != size:
            raise CheckpointError(f"{f} has {got} bytes, {_MANIFEST} says {size}: the file is truncated or damaged")


def _check_safetensors(f: pathlib.Path) -> None:
    """The header parses and the tensors it lists end exactly at the end of the file."""
    size = f.stat().st_size
    try:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from e
    if 8 + n + end != size:
        raise CheckpointError(f"{f} has {size} bytes but its header lists {8 + n + end}: truncated or damaged")


def _check_model_dir(model: pathlib.Path) -> None:
    """``model/`` holds safetensors weights that parse and a train state (optimiser, scheduler)
    that is a torch archive, as :meth:`TrainEngine.save` with the optimiser writes them."""
    if not model.is_dir():
        raise CheckpointError(f"{model} is missing or not a directory; expected the model weights and train state "
                              "written by the train engine")
    weights = sorted(model.rglob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{model} holds no *.safetensors weights; expected the files the train engine wrote")
    for f in weights:
        _check_safetensors(f)
    if not (model / _TRAIN_STATE).is_file():
        raise CheckpointError(f"{model / _TRAIN_STATE} is missing; expected the optimiser and scheduler state "
                              "saved with every checkpoint")
    for f in sorted(model.rglob("*.pt")):
        _check_torch_zip(f)


def _check_torch_zip(f: pathlib.Path) -> None:
    """A ``torch.save`` file is a zip archive holding ``<name>/data.pkl``: its central directory
    must be readable and list it."""
    try:
        with zipfile.ZipFile(f) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{f} is not a readable torch.save archive ({e}): expected the zip archive torch.save "
                              "writes; the file is truncated or damaged") from e
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise CheckpointError(f"{f} is a zip archive but not a torch.save archive: expected a data.pkl entry, got "
                              f"{_short(names[:5])}; the file was damaged or replaced")


# ---------------------------------------------------------------------------------------- writing
def _why_write_failed(root: pathlib.Path, e: BaseException) -> str:
    """Name what ran out: space, inodes, write permission; else the error itself."""
    err = next((x for x in _chain(e) if isinstance(x, OSError) and x.errno), None)
    probe = root if root.exists() else root.parent
    if err is not None and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"the directory is not writable ({err.strerror})"
    try:
        st = os.statvfs(probe)
        free_mib = st.f_bavail * st.f_frsize / 2**20
    except OSError:
        return f"{type(e).__name__}: {e}"
    if (err is not None and err.errno in (errno.ENOSPC, errno.EDQUOT)) or free_mib < 64:
        return f"the file system is full ({free_mib:.0f} MiB free, {st.f_favail} inodes free)"
    if not os.access(probe, os.W_OK):
        return "the directory is not writable"
    return f"{type(e).__name__}: {e}"


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
