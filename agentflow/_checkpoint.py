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

import contextlib
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
        for f in sorted((path / "model").rglob("*.safetensors")):
            _check_safetensors(f)
        for f in sorted((path / "model").rglob("*.pt")):
            _check_torch_zip(f)

    def load(self, path: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(trainer_state, rollout_state)`` of the checkpoint at ``path`` (verified first)."""
        self.verify(path)
        return self._read_states(path)

    def _read_states(self, path: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
        trainer = _plainstate.loads(_read(path / _TRAINER), what=str(path / _TRAINER))
        rollout = _plainstate.loads(_read(path / _ROLLOUT), what=str(path / _ROLLOUT))
        _expect_keys(trainer, ("step",), path / _TRAINER)
        _expect_keys(rollout, (), path / _ROLLOUT)
        return trainer, rollout

    def _candidates(self) -> list[pathlib.Path]:
        pointer = self.root / "latest"
        out: list[pathlib.Path] = []
        with contextlib.suppress(OSError):
            if pointer.is_file():
                out.append(self.root / pointer.read_text().strip())
        out += [p for p in sorted(self.root.glob("step-*"), reverse=True) if p not in out]
        return out

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step-*") if (p / "COMPLETE").is_file())
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------- checks
def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e


def _expect_keys(state: Any, keys: tuple[str, ...], where: pathlib.Path) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)}; expected the keys {', '.join(keys)}")


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


def _check_torch_zip(f: pathlib.Path) -> None:
    """A ``torch.save`` file is a zip archive: its central directory must be readable."""
    try:
        with zipfile.ZipFile(f) as z:
            z.infolist()
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{f} is not a readable torch.save archive ({e}): truncated or damaged") from e


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
