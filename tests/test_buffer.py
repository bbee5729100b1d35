"""ReplayBuffer: thread hand-off, back-pressure, consume-time staleness, state round trip."""

from __future__ import annotations

import asyncio
import threading
import time

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


# ---------------------------------------------------------------------------- bucketed order, cost, fairness
async def test_oldest_version_first_and_arrival_order_within_a_version():
    buf = ReplayBuffer(RolloutConfig(max_staleness=100, buffer_size=100))
    order = [(3, "a"), (1, "b"), (2, "c"), (1, "d"), (3, "e"), (0, "f"), (2, "g")]
    for v, gid in order:
        await buf.put(_group(gid, v))
    buf.set_version(3)
    got = [g.group_id for g in await buf.aget_groups(len(order))]
    assert got == ["f", "b", "d", "c", "g", "a", "e"]


async def test_groups_given_back_keep_their_place():
    buf = ReplayBuffer(RolloutConfig(max_staleness=100))
    for v, gid in [(2, "x"), (1, "y"), (1, "z")]:
        await buf.put(_group(gid, v))
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(buf.get_groups, 4, 0.05)  # takes all three, gives them back
    assert [g["group_id"] for g in buf.state_dict()["groups"]] == ["y", "z", "x"]
    assert [g.group_id for g in await buf.aget_groups(3)] == ["y", "z", "x"]


async def test_state_dict_lists_groups_in_consumption_order_and_restores_it():
    buf = ReplayBuffer(RolloutConfig(max_staleness=100))
    for v, gid in [(5, "a"), (4, "b"), (5, "c")]:
        await buf.put(_group(gid, v))
    state = buf.state_dict()
    assert [g["group_id"] for g in state["groups"]] == ["b", "a", "c"]
    other = ReplayBuffer(RolloutConfig(max_staleness=100))
    other.load_state_dict(state)
    assert [g.group_id for g in await other.aget_groups(3)] == ["b", "a", "c"]


def _filled(n: int, versions: int = 8) -> ReplayBuffer:
    buf = ReplayBuffer(RolloutConfig(max_staleness=10**6, buffer_size=n + 1024))
    traj = _traj(0)
    for i in range(n):
        g = Group(str(i), [traj])
        g.min_version = i % versions
        buf.put_nowait(g)
    return buf


def _take_time(buf: ReplayBuffer, k: int, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        groups = buf.get_groups(k, timeout=1)
        best = min(best, time.perf_counter() - t0)
        for g in groups:  # put them back so every rep takes from the same size
            buf.put_nowait(g)
    return best


def test_taking_costs_the_same_from_a_small_and_a_huge_buffer():
    """Ratio measured in one process: 512 groups from 100,000 vs from 1,000 buffered."""
    small, huge = _filled(1_000), _filled(100_000)
    t_small, t_huge = _take_time(small, 512), _take_time(huge, 512)
    assert t_huge < 3 * t_small + 1e-3, f"take 512: {t_huge * 1e3:.2f} ms from 1e5 vs {t_small * 1e3:.2f} ms from 1e3"


async def test_a_full_buffer_serves_waiting_producers_first_come_first_served():
    buf = ReplayBuffer(RolloutConfig(buffer_size=2, max_staleness=5))
    await buf.put(_group("a", 0))
    await buf.put(_group("b", 0))
    waiting = [asyncio.create_task(buf.put(_group(f"w{i}", 0))) for i in range(5)]
    await asyncio.sleep(0.01)
    await asyncio.to_thread(buf.get_groups, 2, 5)  # frees two slots
    await asyncio.sleep(0.01)
    assert [t.done() for t in waiting] == [True, True, False, False, False]
    for t in waiting[2:]:
        t.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert len(buf) == 2


async def test_put_deadline_raises_and_adds_nothing():
    buf = ReplayBuffer(RolloutConfig(buffer_size=1, max_staleness=5))
    await buf.put(_group("a", 0))
    with pytest.raises(TimeoutError, match=r"rollout.buffer_size=1"):
        await buf.put(_group("b", 0), timeout=0.02)
    assert len(buf) == 1 and buf.stats.put == 1


async def test_a_cancelled_producer_passes_its_slot_on():
    buf = ReplayBuffer(RolloutConfig(buffer_size=1, max_staleness=5))
    await buf.put(_group("a", 0))
    first = asyncio.create_task(buf.put(_group("b", 0)))
    second = asyncio.create_task(buf.put(_group("c", 0)))
    await asyncio.sleep(0.01)
    await buf.aget_groups(1)  # grants the slot to `first`...
    first.cancel()  # ...which is cancelled before it runs: `second` must get the slot
    await asyncio.wait_for(second, 1)
    assert [g.group_id for g in await buf.aget_groups(1)] == ["c"]


async def test_loop_producer_and_thread_consumer_lose_and_duplicate_nothing():
    buf = ReplayBuffer(RolloutConfig(buffer_size=64, max_staleness=10**6))
    n = 5_000
    got: list[str] = []

    def consume():
        while len(got) < n:
            got.extend(g.group_id for g in buf.get_groups(min(37, n - len(got)), timeout=10))

    consumer = asyncio.create_task(asyncio.to_thread(consume))
    for i in range(n):
        await buf.put(_group(str(i), i // 100))
    await asyncio.wait_for(consumer, 30)
    assert sorted(got, key=int) == [str(i) for i in range(n)] and len(buf) == 0


def _in_thread(fn, limit: float = 5.0):
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) if it does not return."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"the consumer did not return within {limit} s (deadlock?)"
    return out[0]


def test_a_consumer_that_waits_before_any_put_times_out_instead_of_deadlocking():
    buf = ReplayBuffer(RolloutConfig(max_staleness=1))  # no loop known yet: nothing was ever put
    assert isinstance(_in_thread(lambda: buf.get_groups(1, timeout=0.05)), TimeoutError)


def test_stale_groups_restored_from_a_checkpoint_are_discarded_without_deadlock():
    buf = ReplayBuffer(RolloutConfig(max_staleness=0))
    discarded: list[str] = []
    buf.on_discard = lambda g, why: discarded.append(why)
    buf.put_nowait(_group("old", 0))
    buf.put_nowait(_group("fresh", 3))
    buf.set_version(3)
    got = _in_thread(lambda: buf.get_groups(1, timeout=1))
    assert [g.group_id for g in got] == ["fresh"] and discarded == ["drop"]


async def test_a_thread_consumer_that_discards_wakes_the_loop_without_deadlock():
    buf = ReplayBuffer(RolloutConfig(max_staleness=0, buffer_size=1))
    buf.bind_loop(asyncio.get_running_loop())
    discarded: list[str] = []
    buf.on_discard = lambda g, why: discarded.append(why)
    await buf.put(_group("old", 0))
    buf.set_version(1)
    consumer = asyncio.create_task(asyncio.to_thread(buf.get_groups, 1, 5))
    await asyncio.sleep(0.05)  # the stale group is dropped: its slot frees and the next put fits
    await asyncio.wait_for(buf.put(_group("new", 1)), 2)
    got = await asyncio.wait_for(consumer, 5)
    assert [g.group_id for g in got] == ["new"] and discarded == ["drop"]


# ------------------------------------------------------------------ running items about to expire
async def test_a_slot_is_kept_for_a_running_item_that_would_be_too_stale_next_step():
    """At version 2 with eta 1, an item that started at version 1 must be taken now or dropped at
    the next step: the consumer waits for it rather than fill its last slot with a version-2 group."""
    buf = ReplayBuffer(RolloutConfig(max_staleness=1))
    buf.bind_loop(asyncio.get_running_loop())
    buf.set_version(2)
    await buf.put(_group("straggler-done", 1))
    await buf.put(_group("fresh", 2))
    buf.track_start(1)  # the straggler still running
    buf.track_start(2)  # an item of the next batch (never waited for)
    consumer = asyncio.create_task(asyncio.to_thread(buf.get_groups, 2, 5))
    await asyncio.sleep(0.2)
    assert not consumer.done() and len(buf) == 1  # "straggler-done" taken; "fresh" kept for the next step
    await buf.put(_group("straggler", 1))
    buf.track_end(1)
    got = await asyncio.wait_for(consumer, 5)
    assert [g.group_id for g in got] == ["straggler-done", "straggler"]
    assert [g.group_id for g in await asyncio.to_thread(buf.get_groups, 1, 5)] == ["fresh"]
    assert buf.stats.held == 1 and 0.15 < buf.stats.held_s < 5 and buf.stats.dropped == 0


async def test_the_kept_slot_goes_to_a_fresher_group_when_the_item_ends_without_a_group():
    buf = ReplayBuffer(RolloutConfig(max_staleness=1))
    buf.bind_loop(asyncio.get_running_loop())
    buf.set_version(2)
    await buf.put(_group("fresh", 2))
    buf.track_start(1)
    consumer = asyncio.create_task(asyncio.to_thread(buf.get_groups, 1, 5))
    await asyncio.sleep(0.1)
    assert not consumer.done()
    buf.track_end(1)  # rejected or filtered: nothing to wait for any more
    got = await asyncio.wait_for(consumer, 5)
    assert [g.group_id for g in got] == ["fresh"]


@pytest.mark.parametrize("loop_side", [False, True])
async def test_the_wait_for_an_expiring_item_ends_at_the_grace(loop_side):
    buf = ReplayBuffer(RolloutConfig(max_staleness=1, expiring_grace_s=0.3))
    buf.bind_loop(asyncio.get_running_loop())
    buf.set_version(2)
    await buf.put(_group("fresh", 2))
    buf.track_start(1)  # never ends
    t0 = time.monotonic()
    if loop_side:
        got = await asyncio.wait_for(buf.aget_groups(1), 5)
    else:
        got = await asyncio.to_thread(buf.get_groups, 1, 5)
    assert [g.group_id for g in got] == ["fresh"] and 0.25 < time.monotonic() - t0 < 3


@pytest.mark.parametrize("cfg", [
    {"max_staleness": 1, "expiring_grace_s": 0},  # turned off
    {"max_staleness": 1, "stale_policy": "keep"},  # nothing expires
    {"max_staleness": 0},  # synchronous: every buffered group is as old as the running ones
])
async def test_no_slot_is_kept_where_nothing_would_be_lost(cfg):
    buf = ReplayBuffer(RolloutConfig(**cfg))
    buf.bind_loop(asyncio.get_running_loop())
    buf.set_version(2)
    await buf.put(_group("ready", 2))
    buf.track_start(1)
    buf.track_start(2)
    got = await asyncio.wait_for(asyncio.to_thread(buf.get_groups, 1, 5), 1)
    assert [g.group_id for g in got] == ["ready"] and buf.stats.held == 0


async def test_only_as_many_slots_as_expiring_items_are_kept():
    buf = ReplayBuffer(RolloutConfig(max_staleness=1))
    buf.bind_loop(asyncio.get_running_loop())
    buf.set_version(2)
    for i in range(3):
        await buf.put(_group(f"fresh{i}", 2))
    buf.track_start(1)
    consumer = asyncio.create_task(asyncio.to_thread(buf.get_groups, 3, 5))
    await asyncio.sleep(0.1)
    assert not consumer.done() and len(buf) == 1  # two fresh groups taken, one slot kept
    await buf.put(_group("straggler", 1))
    buf.track_end(1)
    got = await asyncio.wait_for(consumer, 5)
    assert sorted(g.group_id for g in got) == ["fresh0", "fresh1", "straggler"]


async def test_no_slot_is_kept_when_the_buffer_already_covers_the_next_step_too():
    """Generation is ahead: a straggler lost later costs the trainer no wait, so it is not waited for."""
    buf = ReplayBuffer(RolloutConfig(max_staleness=1))
    buf.bind_loop(asyncio.get_running_loop())
    buf.set_version(2)
    for i in range(3):  # one for this step, two for the next
        await buf.put(_group(f"fresh{i}", 2))
    buf.track_start(1)
    got = await asyncio.wait_for(asyncio.to_thread(buf.get_groups, 1, 5), 1)
    assert [g.group_id for g in got] == ["fresh0"] and buf.stats.held == 0
