"""WeightPublisher's disk hand-off: each version a directory, the old ones deleted once loaded."""

from __future__ import annotations

import asyncio
import errno
import os
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agentflow._publish import WeightPublisher
from agentflow.errors import EngineError, ServerError


class DiskWriter:
    """The train engine's side: writes a (one-file) checkpoint where the meta says."""

    def upload_weights(self, meta: Any) -> Any:
        path = pathlib.Path(meta.path)
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"weights")
        return meta


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _names(run_dir: pathlib.Path) -> list[str]:
    return sorted(d.name for d in (run_dir / "weights").iterdir())


def _publisher(run_dir: pathlib.Path, keep: int | None, writer: Any = None) -> WeightPublisher:
    return WeightPublisher("disk", engine=None, train_engine=writer or DiskWriter(),  # type: ignore[arg-type]
                           weights_dir=run_dir / "weights", keep_disk_versions=keep)


def test_versions_past_the_newest_kept_are_deleted_once_loaded(tmp_path, loop):
    loaded: list[str] = []

    async def load(version: int, meta: Any) -> None:
        assert pathlib.Path(meta.path).is_dir()  # noqa: ASYNC240 (written before the servers are told)
        loaded.append(pathlib.Path(meta.path).name)

    (tmp_path / "weights" / "notes").mkdir(parents=True)  # not a version directory: never touched
    pub = _publisher(tmp_path, keep=2)
    for version in range(1, 6):
        pub.publish(loop, version, load)
    assert loaded == [f"v00000{v}" for v in range(1, 6)]
    assert _names(tmp_path) == ["notes", "v000004", "v000005"]


def test_keep_none_keeps_every_version(tmp_path, loop):
    async def load(version: int, meta: Any) -> None:
        pass

    pub = _publisher(tmp_path, keep=None)
    for version in range(1, 4):
        pub.publish(loop, version, load)
    assert _names(tmp_path) == ["v000001", "v000002", "v000003"]


def test_a_failed_update_deletes_nothing(tmp_path, loop):
    """The servers may still be on the older version: it must stay loadable."""

    async def load(version: int, meta: Any) -> None:
        if version == 2:
            raise ServerError("refused")

    pub = _publisher(tmp_path, keep=1)
    pub.publish(loop, 1, load)
    with pytest.raises(ServerError, match="refused"):
        pub.publish(loop, 2, load)
    assert _names(tmp_path) == ["v000001", "v000002"]


def test_a_relative_weights_dir_reaches_the_servers_as_an_absolute_path(tmp_path, loop, monkeypatch):
    """Servers run elsewhere (another working directory, another host on a shared filesystem)."""
    paths: list[str] = []

    async def load(version: int, meta: Any) -> None:
        paths.append(meta.path)

    monkeypatch.chdir(tmp_path)
    pub = WeightPublisher("disk", engine=None, train_engine=DiskWriter(),  # type: ignore[arg-type]
                          weights_dir=pathlib.Path("shm/run"))
    pub.publish(loop, 1, load)
    assert paths == [str(tmp_path / "shm" / "run" / "v000001")]
    assert os.path.isabs(paths[0])


class FullDisk(DiskWriter):
    def upload_weights(self, meta: Any) -> Any:
        pathlib.Path(meta.path).mkdir(parents=True)
        (pathlib.Path(meta.path) / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device", meta.path)

    def weight_specs(self) -> list[Any]:
        from agentflow.engines._handoff import WeightSpec

        return [WeightSpec("w", "float32", (1024, 1024))]


def test_a_version_that_cannot_be_written_says_where_and_how_to_fix_it(tmp_path, loop):
    async def load(version: int, meta: Any) -> None:
        raise AssertionError("a version that was not written must not be loaded")

    with pytest.raises(EngineError) as e:
        _publisher(tmp_path, keep=1, writer=FullDisk()).publish(loop, 1, load)
    msg = str(e.value)
    assert "could not write weights version 1 to " + str(tmp_path / "weights" / "v000001") in msg
    assert "the file system is full" in msg and "a whole model (4 MiB)" in msg and "trainer.weights_dir" in msg
    assert "partial directory was removed" in msg and not (tmp_path / "weights" / "v000001").exists()


def test_a_disk_version_loads_while_the_trainer_goes_on_and_in_order(tmp_path, loop):
    """``wait=False``: publish returns once the version is written; the next publish first waits
    for the previous load, so versions load one after the other and only loaded ones are pruned."""
    release = threading.Event()
    events: list[str] = []

    async def load(version: int, meta: Any) -> None:
        events.append(f"start {version}")
        if version == 1:
            await asyncio.to_thread(release.wait, 10)
        events.append(f"loaded {version}")

    pub = _publisher(tmp_path, keep=1)
    pub.publish(loop, 1, load, wait=False)
    assert "loaded 1" not in events  # returned while version 1 still loads
    assert _names(tmp_path) == ["v000001"]
    threading.Timer(0.2, release.set).start()
    pub.publish(loop, 2, load, wait=False)  # waits for 1's load, prunes nothing newer than loaded
    assert events[:2] == ["start 1", "loaded 1"]
    pub.settle()
    assert events == ["start 1", "loaded 1", "start 2", "loaded 2"]
    assert _names(tmp_path) == ["v000002"]
    pub.settle()  # nothing left loading: returns at once


def test_a_failed_load_left_running_fails_the_next_publish(tmp_path, loop):
    async def load(version: int, meta: Any) -> None:
        if version == 2:
            raise ServerError("refused")

    pub = _publisher(tmp_path, keep=1)
    pub.publish(loop, 1, load, wait=False)
    pub.publish(loop, 2, load, wait=False)  # version 2 is written; its load fails on the loop
    with pytest.raises(ServerError, match="refused"):
        pub.publish(loop, 3, load, wait=False)
    assert _names(tmp_path) == ["v000001", "v000002"]  # the servers may still be on version 1


def test_a_load_past_the_deadline_is_cancelled_and_says_which_version(tmp_path, loop):
    cancelled = threading.Event()

    async def load(version: int, meta: Any) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    pub = WeightPublisher("disk", engine=None, train_engine=DiskWriter(),  # type: ignore[arg-type]
                          weights_dir=tmp_path / "weights", timeout_s=0.2)
    pub.publish(loop, 1, load, wait=False)
    with pytest.raises(EngineError, match=r"weight update to version 1 took longer than trainer.update_timeout_s=0.2s"):
        pub.settle()
    assert cancelled.wait(5)


class MemWriter:
    def upload_weights(self, meta: Any) -> Any:
        return meta


def test_mem_weights_always_wait_for_the_load(tmp_path, loop):
    """A ``mem`` state dict may share storage with the live parameters: the load must finish
    before the trainer's next optimiser step changes them."""
    loaded: list[int] = []

    async def load(version: int, meta: Any) -> None:
        await asyncio.sleep(0.05)
        loaded.append(version)

    pub = WeightPublisher("mem", engine=None, train_engine=MemWriter(),  # type: ignore[arg-type]
                          weights_dir=tmp_path / "weights")
    pub.publish(loop, 1, load, wait=False)
    assert loaded == [1]


class BehindWriter(DiskWriter):
    """A train engine that copies now and writes later (``snapshot_weights``): each write waits
    for ``release`` and records the thread it ran on."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.release = threading.Event()
        self.release.set()
        self.fail_at = fail_at
        self.threads: list[int] = []

    def snapshot_weights(self, meta: Any) -> tuple[Any, Any]:
        def write() -> None:
            self.threads.append(threading.get_ident())
            assert self.release.wait(10)
            pathlib.Path(meta.path).mkdir(parents=True)
            (pathlib.Path(meta.path) / "model.safetensors").write_bytes(b"half a model")
            if meta.version == self.fail_at:
                raise OSError(errno.ENOSPC, "No space left on device", meta.path)

        return meta, write

    def weight_specs(self) -> list[Any]:
        from agentflow.engines._handoff import WeightSpec

        return [WeightSpec("w", "float32", (1024, 1024))]


def test_an_overlapped_disk_version_is_written_behind_the_caller_then_loaded(tmp_path, loop):
    """``wait=False`` returns once the weights are copied: the write runs on a thread other than
    the trainer's (and the loop's), the load starts only once the version is on disk, and the next
    publish waits for both."""
    loaded: list[int] = []

    async def load(version: int, meta: Any) -> None:
        assert (pathlib.Path(meta.path) / "model.safetensors").exists()
        loaded.append(version)

    writer = BehindWriter()
    writer.release.clear()
    pub = _publisher(tmp_path, keep=1, writer=writer)
    pub.publish(loop, 1, load, wait=False)
    assert not (tmp_path / "weights" / "v000001").exists() and loaded == []  # returned before the write
    threading.Timer(0.2, writer.release.set).start()
    pub.publish(loop, 2, load, wait=False)  # waits for version 1's write and load
    assert loaded == [1]
    pub.settle()
    assert loaded == [1, 2] and _names(tmp_path) == ["v000002"]
    assert threading.get_ident() not in writer.threads and len(writer.threads) == 2


def test_a_write_behind_that_fails_fails_the_next_publish_and_is_never_loaded(tmp_path, loop):
    loaded: list[int] = []

    async def load(version: int, meta: Any) -> None:
        loaded.append(version)

    pub = _publisher(tmp_path, keep=1, writer=BehindWriter(fail_at=2))
    pub.publish(loop, 1, load, wait=False)
    pub.publish(loop, 2, load, wait=False)
    with pytest.raises(EngineError) as e:
        pub.publish(loop, 3, load, wait=False)
    msg = str(e.value)
    assert "could not write weights version 2 to " + str(tmp_path / "weights" / "v000002") in msg
    assert "the file system is full" in msg and "a whole model (4 MiB)" in msg and "trainer.weights_dir" in msg
    assert loaded == [1] and _names(tmp_path) == ["v000001"]  # the partial version removed, version 1 kept
