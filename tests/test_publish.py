"""WeightPublisher's disk hand-off: each version a directory, loaded while the trainer trains on,
the old ones deleted once loaded."""

from __future__ import annotations

import asyncio
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


def _publisher(run_dir: pathlib.Path, keep: int | None) -> WeightPublisher:
    return WeightPublisher("disk", engine=None, train_engine=DiskWriter(), run_dir=run_dir,  # type: ignore[arg-type]
                           keep_disk_versions=keep)


def test_versions_past_the_newest_kept_are_deleted_once_loaded(tmp_path, loop):
    loaded: list[str] = []

    async def load(version: int, meta: Any) -> None:
        assert pathlib.Path(meta.path).is_dir()  # noqa: ASYNC240 (written before the servers are told)
        loaded.append(pathlib.Path(meta.path).name)

    (tmp_path / "weights" / "notes").mkdir(parents=True)  # not a version directory: never touched
    pub = _publisher(tmp_path, keep=2)
    for version in range(1, 6):
        pub.publish(loop, version, load)
    pub.settle()
    assert loaded == [f"v00000{v}" for v in range(1, 6)]
    assert _names(tmp_path) == ["notes", "v000004", "v000005"]


def test_keep_none_keeps_every_version(tmp_path, loop):
    async def load(version: int, meta: Any) -> None:
        pass

    pub = _publisher(tmp_path, keep=None)
    for version in range(1, 4):
        pub.publish(loop, version, load)
    pub.settle()
    assert _names(tmp_path) == ["v000001", "v000002", "v000003"]


def test_a_failed_update_deletes_nothing(tmp_path, loop):
    """The servers may still be on the older version: it must stay loadable."""

    async def load(version: int, meta: Any) -> None:
        if version == 2:
            raise ServerError("refused")

    pub = _publisher(tmp_path, keep=1)
    pub.publish(loop, 1, load)
    pub.publish(loop, 2, load)  # written; the refusal comes from the load, reported at the next wait
    with pytest.raises(ServerError, match="refused"):
        pub.publish(loop, 3, load)
    assert _names(tmp_path) == ["v000001", "v000002"]


def test_publish_returns_once_written_and_the_next_waits_for_the_load(tmp_path, loop):
    """The servers load version v while the trainer trains v + 1; publishing v + 1 (or ``settle``)
    waits for that load first, so loads never overlap and run in version order."""
    started, release = threading.Event(), threading.Event()
    events: list[str] = []

    async def load(version: int, meta: Any) -> None:
        events.append(f"load {version}")
        if version == 1:
            started.set()
            await asyncio.to_thread(release.wait, 5)
        events.append(f"loaded {version}")

    pub = _publisher(tmp_path, keep=None)
    pub.publish(loop, 1, load)
    assert started.wait(5) and events == ["load 1"]  # publish returned while the load runs
    waiter = threading.Thread(target=pub.publish, args=(loop, 2, load))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not (tmp_path / "weights" / "v000002").exists()  # waits for version 1
    release.set()
    waiter.join(5)
    pub.settle()
    assert events == ["load 1", "loaded 1", "load 2", "loaded 2"]


def test_a_load_past_the_deadline_fails_loud(tmp_path, loop):
    async def load(version: int, meta: Any) -> None:
        await asyncio.sleep(5)

    pub = WeightPublisher("disk", engine=None, train_engine=DiskWriter(), run_dir=tmp_path,  # type: ignore[arg-type]
                          timeout_s=0.2)
    pub.publish(loop, 1, load)
    with pytest.raises(EngineError, match="version 1 took longer than trainer.update_timeout_s=0.2s"):
        pub.settle()
    pub.settle()  # reported once; nothing left to wait for


class _SlowLoadEngine:
    """FakeEngine whose disk loads take ``load_s`` and log when they start and end."""

    @staticmethod
    def make(events: list[str], load_s: float, rollout: Any) -> Any:
        from agentflow.testing import FakeEngine

        class Engine(FakeEngine):
            async def aupdate_weights(self, meta: Any) -> None:
                events.append(f"load {meta.version}")
                await asyncio.sleep(load_s)
                await super().aupdate_weights(meta)
                events.append(f"loaded {meta.version}")

        return Engine(rollout=rollout)


class _RecordingTrainEngine(DiskWriter):
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def set_version(self, version: int) -> None:
        self.events.append(f"train {version + 1}")

    def vocab_size(self) -> int | None:
        return None

    def save(self, meta: Any) -> None:  # the final checkpoint
        pathlib.Path(meta.path).mkdir(parents=True, exist_ok=True)


class _Workflow:
    async def arun_episode(self, engine: Any, data: Any) -> Any:
        from agentflow import GenerationConfig, ModelRequest, Trajectory

        out = await engine.agenerate(ModelRequest([1, 2, 3], GenerationConfig(max_new_tokens=2)))
        return Trajectory.from_response(out, reward=float(data["i"] % 2))


@pytest.mark.parametrize("eta", [0, 1])
async def test_the_trainer_trains_on_while_servers_load_and_staleness_holds(tmp_path, eta):
    """With disk updates the trainer takes and trains its next batch while the servers load the
    last version; every trained group stays within eta versions of the weights that train on it."""
    import json

    from agentflow import RolloutConfig
    from agentflow._data import PromptSource
    from agentflow._metrics import MetricsLogger
    from agentflow._trainer import Trainer, TrainerConfig

    events: list[str] = []
    cfg = RolloutConfig(max_staleness=eta, consumer_batch_size=2, max_concurrent=4)
    engine = _SlowLoadEngine.make(events, 0.3, cfg)
    metrics = MetricsLogger(tmp_path)
    trainer = Trainer(
        TrainerConfig(total_steps=4, batch_timeout_s=10.0, checkpoint_every=0, weight_update="disk",
                      keep_weight_versions=None),
        engine=engine, train_engine=_RecordingTrainEngine(events), train_step=lambda trajs: {},
        workflow=_Workflow(), prompts=PromptSource([{"i": i} for i in range(60)]), run_dir=tmp_path,
        metrics=metrics, progress=False,
    )
    try:
        await asyncio.wait_for(trainer.run(), 30)
    finally:
        metrics.close()
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["staleness/max"] <= eta for r in steps), [r["staleness/max"] for r in steps]
    assert [m.version for m in engine.weight_updates] == [1, 2, 3, 4] and engine.get_version() == 4
    loads = [e for e in events if not e.startswith("train")]
    assert loads == [f"{w} {v}" for v in range(1, 5) for w in ("load", "loaded")]  # in order, never two at once
    if eta:  # a step trained while the previous version was loading
        assert any(events.index(f"train {v + 1}") < events.index(f"loaded {v}") for v in range(1, 4)), events
