"""Lossless run checkpoints: weights, optimiser, scheduler, RNG, data position, version, buffered
trajectories and the prompts in flight.

Layout under ``<run_dir>/checkpoints``::

    step-000010/
        model/            written by TrainEngine.save (HF weights + optimiser/scheduler/RNG state)
        trainer.json      version, step, data position, metrics counters
        rollout.pkl       the replay buffer's groups and the items queued or running
        COMPLETE          written last: a directory without it is ignored
    latest                name of the newest complete checkpoint (replaced atomically)

A checkpoint is written into a hidden temporary directory and renamed into place, so a
``kill -9`` at any moment leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
from collections.abc import Callable
from typing import Any

from agentflow.errors import CheckpointError

__all__ = ["Checkpointer"]


class Checkpointer:
    """Writes and finds checkpoints of one run. Only rank 0 writes the non-model files."""

    def __init__(self, run_dir: str | pathlib.Path, *, keep: int = 2, rank: int = 0) -> None:
        self.root = pathlib.Path(run_dir) / "checkpoints"
        self.keep = keep
        self.rank = rank

    def tmp_path(self, step: int) -> pathlib.Path:
        return self.root / f".tmp-step-{step:06d}"

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
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        save_model(tmp / "model")
        barrier()
        if self.rank == 0:
            _write_atomic(tmp / "trainer.json", json.dumps(trainer_state, indent=1).encode())
            _write_atomic(tmp / "rollout.pkl", pickle.dumps(rollout_state, protocol=pickle.HIGHEST_PROTOCOL))
            _write_atomic(tmp / "COMPLETE", b"ok\n")
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(self.root / "latest", final.name.encode())
            _fsync_dir(self.root)
            self._prune()
        barrier()
        return final

    def latest(self) -> pathlib.Path | None:
        """The newest complete checkpoint, or None when the run has none."""
        pointer = self.root / "latest"
        candidates = []
        if pointer.is_file():
            candidates.append(self.root / pointer.read_text().strip())
        candidates += sorted(self.root.glob("step-*"), reverse=True)
        for path in candidates:
            if (path / "COMPLETE").is_file():
                return path
        return None

    def load(self, path: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(trainer_state, rollout_state)`` of the checkpoint at ``path``."""
        if not (path / "COMPLETE").is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no COMPLETE marker); pick another one")
        try:
            trainer_state = json.loads((path / "trainer.json").read_text())
            with (path / "rollout.pkl").open("rb") as f:
                rollout_state = pickle.load(f)
        except (OSError, ValueError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
        return trainer_state, rollout_state

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step-*") if (p / "COMPLETE").is_file())
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)


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
