"""ReplayBuffer: thread hand-off, back-pressure, consume-time staleness, state round trip."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agentflow import Group, ReplayBuffer, RolloutConfig, Trajectory


def _traj(version: int, n: int = 3) -> Trajectory:
    return Trajectory([1] + [2] * n, [0] + [1] * n, [0.0] + [-0.1] * n, [-1] + [version] * n, reward=1.0)


def _group(gid: str, version: int) -> Group:
    return Group(gid, [_traj(version)], data={"prompt": gid})


async def test_get_batch_from_a_thread_blocks_until_enough():
    buf = ReplayBuffer(RolloutConfig(max_staleness=5))
    got: list[list[Trajectory]] = []
    t = threading.Thread(target=lambda: got.append(buf.get_batch(3, timeout=5)))
    t.start()
    for i in range(3):
        await asyncio.sleep(0.005)
        await buf.put(_group(str(i), 0))
    await asyncio.to_thread(t.join, 5)
    assert [len(b) for b in got] == [3]


async def test_put_applies_back_pressure_until_a_consumer_takes():
    buf = ReplayBuffer(RolloutConfig(buffer_size=2, max_staleness=5))
    await buf.put(_group("a", 0))
    await buf.put(_group("b", 0))
    blocked = asyncio.create_task(buf.put(_group("c", 0)))
    await asyncio.sleep(0.02)
    assert not blocked.done() and len(buf) == 2
    await asyncio.to_thread(buf.get_batch, 1, 5)
    await asyncio.wait_for(blocked, 2)
    assert len(buf) == 2


async def test_timeout_puts_taken_groups_back():
    buf = ReplayBuffer(RolloutConfig(max_staleness=5))
    await buf.put(_group("a", 0))
    with pytest.raises(TimeoutError, match="1 group"):
        await asyncio.to_thread(buf.get_batch, 2, 0.05)
    assert len(buf) == 1


@pytest.mark.parametrize(("policy", "n_out", "counter"), [("drop", 1, "dropped"), ("keep", 2, "kept_stale")])
async def test_stale_policy_at_consume_time(policy, n_out, counter):
    buf = ReplayBuffer(RolloutConfig(max_staleness=1, stale_policy=policy))
    discarded = []
    buf.on_discard = lambda g, why: discarded.append((g.group_id, why))
    await buf.put(_group("old", 0))
    await buf.put(_group("new", 2))
    buf.set_version(2)
    out = await buf.aget_batch(n_out) if policy == "keep" else await buf.aget_batch(1)
    assert len(out) == n_out
    assert getattr(buf.stats, counter) == 1
    assert buf.stats.staleness == {2: 1, 0: 1}
    assert discarded == ([("old", "drop")] if policy == "drop" else [])


async def test_requeue_hands_the_group_back_with_its_data():
    buf = ReplayBuffer(RolloutConfig(max_staleness=0, stale_policy="requeue", max_requeues=1))
    seen = []
    buf.on_discard = lambda g, why: seen.append((g.data, why))
    await buf.put(_group("a", 0))
    buf.set_version(1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await buf.aget_batch(1)
    assert seen == [({"prompt": "a"}, "requeue")]


async def test_oldest_group_is_consumed_first():
    buf = ReplayBuffer(RolloutConfig(max_staleness=5))
    await buf.put(_group("young", 3))
    await buf.put(_group("old", 1))
    buf.set_version(3)
    (t,) = await buf.aget_batch(1)
    assert t.min_version == 1


async def test_state_dict_round_trip_keeps_every_trajectory():
    buf = ReplayBuffer(RolloutConfig(max_staleness=5))
    for i in range(3):
        await buf.put(_group(str(i), i))
    buf.set_version(2)
    state = buf.state_dict()
    other = ReplayBuffer(RolloutConfig(max_staleness=5))
    other.load_state_dict(state)
    assert len(other) == 3 and other.version == 2
    assert await other.aget_batch(3) == await buf.aget_batch(3)


async def test_cancelled_aget_batch_loses_nothing():
    buf = ReplayBuffer(RolloutConfig(max_staleness=5))
    await buf.put(_group("a", 0))
    task = asyncio.create_task(buf.aget_batch(2))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(buf) == 1
