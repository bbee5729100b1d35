"""No silent waits: rollout()/wait() finish or raise within a second, naming the bound; every item
that ends without trajectories has a recorded reason."""

from __future__ import annotations

import asyncio
import time

import pytest

from agentflow import EngineError, GenerationConfig, ModelRequest, Rollout, RolloutConfig, Trajectory, WeightUpdateMeta
from agentflow._executor import BUFFER_FULL, CANCELLED
from agentflow.testing import FakeEngine

G = GenerationConfig(max_new_tokens=4)


class Echo:
    async def arun_episode(self, engine, data):
        resp = await engine.agenerate(ModelRequest([1, 2, data % 200 + 3], G))
        return Trajectory.from_response(resp, reward=1.0, info={"data": data})


def _books(engine) -> dict:
    s = Rollout.of(engine).executor.stats()
    assert s["submitted"] == s["accepted"] + s["returned"] + s["rejected"] + s["running"] + s["queued"], s
    return s


@pytest.mark.parametrize("cfg", [
    RolloutConfig(max_staleness=1, consumer_batch_size=8),  # capacity 16 at version 0
    RolloutConfig(max_staleness=1, consumer_batch_size=8, buffer_size=4),  # and a 4-group buffer
    RolloutConfig(max_staleness=0, consumer_batch_size=1, buffer_size=1, max_concurrent=3),
], ids=["past-staleness-capacity", "past-buffer-size", "eta0-buffer1"])
async def test_rollout_past_the_bounds_returns_within_a_second(cfg):
    async with FakeEngine(latency=0.001, rollout=cfg) as engine:
        t0 = time.perf_counter()
        out = await asyncio.wait_for(engine.rollout(list(range(40)), Echo()), 1.0)
        elapsed = time.perf_counter() - t0
        s = _books(engine)
    assert [t.info["data"] for t in out] == list(range(40))  # every item, in order
    assert s["returned"] == 40 and s["accepted"] == 0 and s["buffered"] == 0
    assert elapsed < 1.0


async def test_wait_past_the_staleness_capacity_raises_at_once_naming_the_bound():
    cfg = RolloutConfig(max_staleness=1, consumer_batch_size=8)
    async with FakeEngine(latency=0.001, rollout=cfg) as engine:
        for i in range(40):
            engine.submit(i, Echo())
        t0 = time.perf_counter()
        with pytest.raises(EngineError) as info:
            await engine.wait(40, timeout=30)
        assert time.perf_counter() - t0 < 1.0
        msg = str(info.value)
        assert "wait(40)" in msg and "(1 + 0 + 1) * 8 = 16" in msg
        assert "rollout.max_staleness" in msg and "engine.rollout(" in msg
        assert len(await engine.wait(16, timeout=5)) == 16  # nothing was lost; the capacity is there


async def test_a_second_wait_in_the_same_version_raises_once_the_budget_is_spent():
    cfg = RolloutConfig(max_staleness=0, consumer_batch_size=4)
    async with FakeEngine(latency=0.001, rollout=cfg) as engine:
        for i in range(12):
            engine.submit(i, Echo())
        assert len(await engine.wait(4, timeout=5)) == 4
        with pytest.raises(EngineError, match=r"at most 0 more can arrive"):
            await asyncio.wait_for(engine.wait(4, timeout=30), 1.0)
        engine.set_version(1)  # what a trainer does after training on the batch
        assert len(await engine.wait(4, timeout=5)) == 4


async def test_wait_and_rollout_on_a_paused_engine_raise_naming_resume():
    async with FakeEngine(rollout=RolloutConfig(max_staleness=4)) as engine:
        engine.submit(0, Echo())
        await engine.pause()
        with pytest.raises(EngineError, match=r"engine is paused.*engine\.resume\(\)"):
            await asyncio.wait_for(engine.wait(1, timeout=30), 1.0)
        with pytest.raises(EngineError, match="engine is paused"):
            await asyncio.wait_for(engine.rollout([1], Echo()), 1.0)
        await engine.resume()
        assert len(await engine.wait(1, timeout=5)) == 1


async def test_a_wait_during_a_weight_update_keeps_waiting():
    async with FakeEngine(latency=0.05, rollout=RolloutConfig(max_staleness=4, consumer_batch_size=2)) as engine:
        rollout = Rollout.of(engine)
        for i in range(2):
            engine.submit(i, Echo())
        waiter = asyncio.create_task(engine.wait(2, timeout=5))
        await asyncio.sleep(0.01)
        await rollout.update_weights(WeightUpdateMeta(type="mem", version=1))
        assert len(await waiter) == 2


async def test_rollout_and_wait_on_an_engine_not_entered_raise():
    engine = FakeEngine()
    with pytest.raises(EngineError, match="async with engine"):
        await asyncio.wait_for(engine.rollout([1], Echo()), 1.0)
    with pytest.raises(EngineError, match="async with engine"):
        await asyncio.wait_for(engine.wait(1), 1.0)


async def test_wait_timeout_says_what_it_was_waiting_for():
    async with FakeEngine(rollout=RolloutConfig(max_staleness=4)) as engine:
        with pytest.raises(TimeoutError, match=r"wait\(1\) timed out after 0.05 s; 0 group\(s\) buffered"):
            await engine.wait(1, timeout=0.05)


class Slow:
    async def arun_episode(self, engine, data):
        await asyncio.sleep(60)


async def test_a_cancelled_rollout_records_cancelled_not_none_recorded():
    cfg = RolloutConfig(max_concurrent=8, max_consecutive_rejections=4)
    async with FakeEngine(rollout=cfg) as engine:
        call = asyncio.create_task(engine.rollout(list(range(100)), Slow()))
        await asyncio.sleep(0.02)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0)  # the cancelled episodes finish
        s = _books(engine)
        assert s["rejected_by_reason"] == {CANCELLED: 100} and s["running"] == s["queued"] == 0
        assert Rollout.of(engine).failure is None  # cancellations are not the workflow failing
        assert len(await engine.rollout([1, 2], Echo())) == 2


async def test_episodes_cancelled_at_exit_while_waiting_for_buffer_space_record_cancelled():
    cfg = RolloutConfig(buffer_size=1, max_staleness=100, max_consecutive_rejections=2)
    async with FakeEngine(rollout=cfg) as engine:
        for i in range(5):
            engine.submit(i, Echo())
        await asyncio.sleep(0.05)
        assert Rollout.of(engine).executor.n_running == 4  # four episodes done, waiting for space
    s = Rollout.of(engine).executor.stats()
    assert s["rejected_by_reason"] == {CANCELLED: 4} and s["buffered"] == 1
    assert Rollout.of(engine).failure is None


async def test_an_episode_that_waits_too_long_for_buffer_space_records_why():
    cfg = RolloutConfig(buffer_size=2, max_staleness=100, episode_timeout_s=0.1, max_consecutive_rejections=None)
    async with FakeEngine(rollout=cfg) as engine:
        for i in range(5):
            engine.submit(i, Echo())
        await asyncio.sleep(0.3)
        s = _books(engine)
        assert s["rejected_by_reason"] == {BUFFER_FULL: 3} and s["buffered"] == 2
        assert len(await engine.wait(2, timeout=1)) == 2


async def test_the_buffer_full_reason_reaches_the_consecutive_rejections_error():
    cfg = RolloutConfig(buffer_size=1, max_staleness=100, episode_timeout_s=0.05, max_consecutive_rejections=3)
    async with FakeEngine(rollout=cfg) as engine:
        for i in range(10):
            engine.submit(i, Echo())
        await asyncio.sleep(0.3)
        err = Rollout.of(engine).failure
    assert err is not None and BUFFER_FULL in str(err) and "rollout.buffer_size=1" in str(err)
    assert "none recorded" not in str(err)


async def test_rollout_items_share_the_concurrency_cap_with_submitted_ones():
    seen = []

    class Probe:
        async def arun_episode(self, engine, data):
            seen.append(Rollout.of(engine).executor.n_running)
            await asyncio.sleep(0.005)
            return await Echo().arun_episode(engine, data)

    cfg = RolloutConfig(max_concurrent=4, max_staleness=100)
    async with FakeEngine(rollout=cfg) as engine:
        for i in range(10):
            engine.submit(i, Probe())
        out = await engine.rollout(list(range(10)), Probe())
        await engine.wait(10, timeout=5)
        _books(engine)
    assert len(out) == 10 and max(seen) <= 4


class SlowUpdateEngine(FakeEngine):
    async def aupdate_weights(self, meta):
        await asyncio.sleep(0.05)
        await super().aupdate_weights(meta)


async def test_a_wait_begun_during_a_weight_update_counts_on_the_new_version():
    cfg = RolloutConfig(max_staleness=0, consumer_batch_size=2)
    async with SlowUpdateEngine(latency=0.001, rollout=cfg) as engine:
        for i in range(4):
            engine.submit(i, Echo())
        assert len(await engine.wait(2, timeout=5)) == 2  # version 0's budget is spent
        update = asyncio.create_task(Rollout.of(engine).update_weights(WeightUpdateMeta(type="mem", version=1)))
        await asyncio.sleep(0.01)  # inside the update: paused, still at version 0
        assert len(await engine.wait(2, timeout=5)) == 2
        await update


# ------------------------------------------------------------------------------------ caps per episode
def _traj(n: int) -> Trajectory:
    return Trajectory([1] * n, [0] * (n - 1) + [1], [0.0] * n, [-1] * (n - 1) + [0], reward=1.0)


class Returns:
    def __init__(self, *trajs: Trajectory) -> None:
        self.trajs = list(trajs)

    async def arun_episode(self, engine, data):
        return self.trajs


async def test_an_episode_returning_too_many_trajectories_is_rejected_with_the_reason(caplog):
    one = _traj(4)
    async with FakeEngine(rollout=RolloutConfig(max_consecutive_rejections=None)) as engine:
        t0 = time.perf_counter()
        with caplog.at_level("WARNING"):
            assert await engine.rollout([0], Returns(*[one] * 100_000)) == []
        assert time.perf_counter() - t0 < 1.0
        s = _books(engine)
    assert s["rejected_by_reason"] == {"too_many_trajectories": 1}
    assert "returned 100000 trajectories; expected at most rollout.max_trajectories_per_episode=1024" in caplog.text


async def test_a_trajectory_too_long_to_train_is_dropped_not_the_run(caplog):
    cfg = RolloutConfig(max_trajectory_tokens=1024, max_consecutive_rejections=None)
    async with FakeEngine(rollout=cfg) as engine:
        with caplog.at_level("WARNING"):
            kept = await engine.rollout([0], Returns(_traj(10**6), _traj(50)))
            alone = await engine.rollout([1], Returns(_traj(10**6)))
        s = Rollout.of(engine).executor.stats()  # a partial group's dropped sample is counted, not booked
    assert [len(t) for t in kept] == [50] and alone == []
    assert s["rejected_by_reason"] == {"sample:too_long": 1, "too_long": 1}
    assert "a trajectory of 1000000 tokens is longer than rollout.max_trajectory_tokens=1024" in caplog.text


def test_the_recipe_caps_trajectories_at_what_one_micro_batch_holds():
    from agentflow.recipe import load_recipe_config
    from agentflow.recipe._startup import with_trajectory_cap

    cfg = with_trajectory_cap(load_recipe_config(overrides=["trainer.max_tokens_per_mb=2048"]))
    assert cfg.rollout.max_trajectory_tokens == 2048
    cfg = with_trajectory_cap(load_recipe_config(overrides=["rollout.max_trajectory_tokens=512"]))
    assert cfg.rollout.max_trajectory_tokens == 512
