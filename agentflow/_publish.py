"""Publishing a train step's weights to the inference engine, the loop side of the weight hand-off.

After each train step the trainer thread asks :class:`WeightPublisher` to publish the new weights
as the next version and returns once rollout runs on them:

- ``mem`` / ``disk``: the train engine uploads (fills ``state_dict`` or writes an HF checkpoint
  under ``<weights_dir>/v<version>``), then the engine's update runs on the event loop (the
  caller's ``on_loop`` coroutine: pause rollout, load, bump the version, resume). Once every server
  has loaded a disk version, all but the newest ``keep_disk_versions`` directories are deleted (a
  server that rejoins later is sent the newest; each directory is a whole model). A disk version
  is a snapshot, so ``publish(..., wait=False)`` returns once the weights are copied
  (``TrainEngine.snapshot_weights``): the trainer trains its next step while a thread of the loop's
  executor writes the copy and the servers load it, and the next publish (or
  :meth:`WeightPublisher.settle`) first waits for that write and load and raises their error;
- ``nccl``: both sides at once. The servers sit in their receive route while train rank 0 joins
  the weight-update group (once per run, under a fresh group name, since a server may still hold
  the group of a killed run) and broadcasts every tensor from a daemon thread of its own, so that a
  server refusing the update fails the update at once.

Resuming publishes the checkpoint's weights the same way (:meth:`WeightPublisher.restore`).

Not here: the wire itself (``agentflow.engines``: the train engine's upload and broadcast, the
inference engine's update), evaluation, checkpoints.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pathlib
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from agentflow._engine_api import InferenceEngine, TrainEngine, WeightUpdateMeta
from agentflow.errors import ConfigError, EngineError

__all__ = ["WeightPublisher", "call_on_loop"]

log = logging.getLogger("agentflow.trainer")
_VERSION_DIR = re.compile(r"v(\d{6,})")

OnLoop = Callable[[int, WeightUpdateMeta], Coroutine[Any, Any, None]]
Write = Callable[[], None]


def call_on_loop(loop: asyncio.AbstractEventLoop, coro: Any, timeout: float) -> Any:
    """(A thread other than the loop's.) Run ``coro`` on ``loop`` and wait at most ``timeout`` s."""
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return fut.result(timeout)
    except TimeoutError as e:
        fut.cancel()
        raise EngineError(f"a call on the event loop took longer than {timeout}s; see the logs") from e


class WeightPublisher:
    """Publishes weights from ``train_engine`` to ``engine`` by ``kind`` (see the module docstring).

    Args:
        kind: ``trainer.weight_update``.
        weights_dir: ``disk`` versions go under it (``trainer.weights_dir``, else ``<run_dir>/weights``);
            the servers are sent absolute paths.
        nccl_address, nccl_port: where the servers reach train rank 0's rendezvous (port 0 = a free
            one, picked at the first ``nccl`` update).
        timeout_s: ``trainer.update_timeout_s``, the deadline of one whole update.
        keep_disk_versions: ``trainer.keep_weight_versions``: ``disk`` directories kept after an
            update (the newest); None keeps them all.
    """

    def __init__(self, kind: Literal["mem", "disk", "nccl"], *, engine: InferenceEngine, train_engine: TrainEngine,
                 weights_dir: pathlib.Path, nccl_address: str = "127.0.0.1", nccl_port: int = 0,
                 timeout_s: float = 600.0, keep_disk_versions: int | None = 1) -> None:
        self.kind = kind
        self.keep_disk_versions = keep_disk_versions
        self.engine = engine
        self.train_engine = train_engine
        self.weights_dir = pathlib.Path(weights_dir).absolute()
        self.nccl_address = nccl_address
        self.timeout_s = timeout_s
        self._port = nccl_port
        self._group = ""  # picked with the port at the first nccl update
        self._joined = False  # train rank 0 is in the weight-update group
        self._loading: tuple[concurrent.futures.Future[None], int, float] | None = None  # (load, version, deadline)

    def meta(self, version: int) -> WeightUpdateMeta:
        """What the train engine uploads for ``version``."""
        if self.kind != "nccl":
            path = str(self.weights_dir / f"v{version:06d}") if self.kind == "disk" else None
            return WeightUpdateMeta(type=self.kind, path=path, version=version)
        import torch

        if not self._group:
            self._port = self._port or _free_port(self.nccl_address)
            self._group = f"agentflow_weight_update_{uuid.uuid4().hex[:8]}"
        specs = {w.name: torch.empty(w.shape, dtype=getattr(torch, w.dtype), device="meta")
                 for w in self.train_engine.weight_specs()}
        return WeightUpdateMeta(type="nccl", state_dict=specs, version=version, master_address=self.nccl_address,
                                master_port=self._port, group_name=self._group, timeout_s=self.timeout_s)

    def publish(self, loop: asyncio.AbstractEventLoop, version: int, on_loop: OnLoop, *,
                wait: bool = True) -> WeightUpdateMeta:
        """(Trainer thread.) Publish the current weights as ``version``; ``on_loop(version, meta)``
        runs the inference side on the loop. Returns the meta that was published.

        ``wait=False`` (``disk`` only; ``mem`` and ``nccl`` hand over the live weights, so they
        always wait) returns once the weights are copied and leaves their write and load running
        beside the caller; call :meth:`settle` before anything that needs the version loaded.
        Versions load in order: a publish first settles the previous one.
        """
        self.settle()
        meta = self.meta(version)
        if meta.type != "nccl":
            if meta.type == "disk" and not wait:
                meta, write = self._snapshot(meta)
                coro = self._write_then_load(write, version, meta, on_loop)
            else:
                meta = self._upload(meta)
                coro = on_loop(version, meta)
            loading = asyncio.run_coroutine_threadsafe(coro, loop)
            self._loading = (loading, version, time.monotonic() + self.timeout_s)
            if wait or meta.type != "disk":
                self.settle()
            return meta
        world = call_on_loop(loop, self._world_size(), self.timeout_s)
        publishing = asyncio.run_coroutine_threadsafe(on_loop(version, meta), loop)
        broadcasting = self._start_broadcast(meta, world)
        both = [publishing, broadcasting]
        done, _ = concurrent.futures.wait(both, self.timeout_s, return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = [f for f in both if f in done and f.exception() is not None]
        if failed:
            publishing.cancel()
            raise failed[0].exception()  # type: ignore[misc]
        if len(done) < 2:
            publishing.cancel()
            raise EngineError(f"the nccl weight update to version {version} took longer than "
                              f"trainer.update_timeout_s={self.timeout_s}s; see the logs")
        return meta

    def settle(self) -> None:
        """(Trainer thread.) Return once the version a ``wait=False`` publish left loading is
        loaded (at once when none is), then delete the versions it supersedes. Raises the load's
        error, or :class:`EngineError` past ``timeout_s`` from its publish."""
        if self._loading is None:
            return
        loading, version, deadline = self._loading
        self._loading = None
        try:
            loading.result(max(deadline - time.monotonic(), 0.0))
        except TimeoutError as e:
            loading.cancel()
            raise EngineError(f"the weight update to version {version} took longer than "
                              f"trainer.update_timeout_s={self.timeout_s}s; see the logs") from e
        self._prune(version)

    def abandon(self) -> None:
        """Cancel a load still running (the run is failing); its version stays on disk."""
        if self._loading is not None:
            self._loading[0].cancel()
            self._loading = None

    async def restore(self, version: int) -> None:
        """(Event loop, on resume.) Load the train engine's weights into the engine as ``version``."""
        meta = self.meta(version)
        if meta.type != "nccl":
            meta = await asyncio.to_thread(self.train_engine.upload_weights, meta)
            await self.engine.aupdate_weights(meta)
            await asyncio.to_thread(self._prune, version)
            return
        sending = asyncio.wrap_future(self._start_broadcast(meta, self.engine.weight_update_world_size()))
        receiving = asyncio.get_running_loop().create_task(self.engine.aupdate_weights(meta))
        try:
            async with asyncio.timeout(self.timeout_s):
                await asyncio.wait([sending, receiving], return_when=asyncio.FIRST_EXCEPTION)
            await receiving
            await sending
        finally:
            receiving.cancel()

    def _prune(self, version: int) -> None:
        """Delete the ``disk`` version directories older than the newest ``keep_disk_versions``
        (counting ``version``, just loaded by every server); a failure is logged, not raised."""
        if self.kind != "disk" or self.keep_disk_versions is None:
            return
        root = self.weights_dir
        older = sorted((int(m.group(1)), d) for d in root.glob("v*")
                       if (m := _VERSION_DIR.fullmatch(d.name)) and d.is_dir() and int(m.group(1)) <= version)
        for _, d in older[:-self.keep_disk_versions]:
            try:
                shutil.rmtree(d)
            except OSError as e:
                log.warning("could not delete the old weights directory %s (%s); it stays on disk", d, e)

    def _upload(self, meta: WeightUpdateMeta) -> WeightUpdateMeta:
        """The train engine's ``mem``/``disk`` upload; a disk version that cannot be written says why."""
        try:
            return self.train_engine.upload_weights(meta)
        except OSError as e:
            raise self._write_failed(meta, e) from e

    def _snapshot(self, meta: WeightUpdateMeta) -> tuple[WeightUpdateMeta, Write]:
        """The train engine's copy of a ``disk`` version and what writes it later (an engine that
        is not a :class:`TrainEngine` and lacks ``snapshot_weights`` uploads at once)."""
        if not hasattr(self.train_engine, "snapshot_weights"):
            return self._upload(meta), lambda: None
        try:
            return self.train_engine.snapshot_weights(meta)
        except OSError as e:
            raise self._write_failed(meta, e) from e

    async def _write_then_load(self, write: Write, version: int, meta: WeightUpdateMeta, on_loop: OnLoop) -> None:
        """(Event loop.) Write a snapshot in the loop's executor, then run the load (``on_loop``)."""

        def written() -> None:
            try:
                write()
            except OSError as e:
                raise self._write_failed(meta, e) from e

        await asyncio.to_thread(written)
        await on_loop(version, meta)

    def _write_failed(self, meta: WeightUpdateMeta, e: OSError) -> EngineError:
        from agentflow._checkpoint import _why_write_failed

        why = _why_write_failed(self.weights_dir, e)  # before the partial version frees its space
        if meta.path is not None:
            shutil.rmtree(meta.path, ignore_errors=True)
        try:
            what = f"a whole model ({sum(w.nbytes for w in self.train_engine.weight_specs()) / 2**20:.0f} MiB)"
        except ConfigError:  # LoRA: no full-model specs
            what = "an adapter"
        return EngineError(
            f"could not write weights version {meta.version} to {meta.path}: {why}; the partial directory was"
            f" removed. Each version is {what} and the servers must be able to"
            " read it: set trainer.weights_dir to a directory with room for trainer.keep_weight_versions + 1 of"
            " them")

    def _start_broadcast(self, meta: WeightUpdateMeta, world: int) -> concurrent.futures.Future[None]:
        """:meth:`_broadcast` in a daemon thread of its own: a join or broadcast left blocked by a
        refused update ends at the group's deadline without holding up the process's exit."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                self._broadcast(meta, world)
                done.set_result(None)
            except BaseException as e:  # handed to whoever waits on `done`
                done.set_exception(e)

        threading.Thread(target=run, name="agentflow-nccl-broadcast", daemon=True).start()
        return done

    async def _world_size(self) -> int:
        return int(self.engine.weight_update_world_size())

    def _broadcast(self, meta: WeightUpdateMeta, world: int) -> None:
        """Train side of an ``nccl`` update: join the group once (rank 0), then broadcast every tensor."""
        if not self._joined:
            # Both ends of the group use one backend: the receiving engine's (gloo for CPU servers).
            self.train_engine.join_weight_update_group(meta, world, self.engine.weight_update_backend())
            self._joined = True
        self.train_engine.upload_weights(meta)


def _free_port(host: str) -> int:
    """A TCP port that was free on ``host`` a moment ago (the ``nccl`` group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
