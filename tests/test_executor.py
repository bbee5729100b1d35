"""WorkflowExecutor: admission under the staleness bound, failures, groups, shutdown."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from agentflow import GenerationConfig, ModelRequest, Rollout, RolloutConfig, Trajectory, WorkflowError
from agentflow.testing import FakeEngine, random_latency

G = GenerationConfig(max_new_tokens=6)


class EchoWorkflow:
    """One generation, reward 1. Optional hooks observe every episode start."""

    def __init__(self, on_start=None):
        self.on_start = on_start

    async def arun_episode(self, engine, data):
        if self.on_start is not None:
            self.on_start(engine, data)
        resp = await engine.agenerate(ModelRequest([1, 2, 3, data % 200 + 4], G))
        return Trajectory.from_response(resp, reward=1.0, info={"data": data})


async def _step(engine, version):
    """What the trainer does after a step: pause, bump the version, resume."""
    await engine.pause()
    engine.set_version(version)
    await engine.resume()


def _check_books(engine):
    """submitted == accepted + rejected + running + queued, at this moment (on the loop)."""
    s = Rollout.of(engine).executor.stats()
    assert s["submitted"] == s["accepted"] + s["rejected"] + s["running"] + s["queued"], s


def _run_trainer(engine, loop, n_steps, batch, on_batch=None, timeout=20.0):
    for step in range(n_steps):
        trajs = Rollout.of(engine).buffer.get_batch(batch, timeout=timeout)
        if on_batch is not None:
            on_batch(step, trajs)
        asyncio.run_coroutine_threadsafe(_step(engine, step + 1), loop).result(timeout)


@pytest.mark.parametrize("policy", ["drop", "requeue", "keep"])
async def test_staleness_invariant_under_random_latency(policy):
    eta, batch, steps = 1, 4, 25
    cfg = RolloutConfig(max_staleness=eta, consumer_batch_size=batch, max_concurrent=12, stale_policy=policy,
                        max_requeues=100, expiring_grace_s=0)  # stragglers go stale: the policies act
    violations_kept = 0
    consumed_ids: list[int] = []

    async with FakeEngine(latency=random_latency(0.004, seed=1), rollout=cfg) as engine:
        loop = asyncio.get_running_loop()
        wf = EchoWorkflow(on_start=lambda eng, d: _check_books(eng))
        for i in range(steps * batch + 60):
            engine.submit(i, wf)

        def on_batch(step, trajs):
            nonlocal violations_kept
            assert len({t.group_id for t in trajs}) == batch
            for t in trajs:
                lag = step - t.min_version
                consumed_ids.append(t.info["data"])
                if lag > eta:
                    assert policy == "keep", f"{policy}: consumed a trajectory {lag} versions old"
                    violations_kept += 1
            asyncio.run_coroutine_threadsafe(asyncio.to_thread(lambda: None), loop)  # keep the loop busy
            _check_books_threadsafe(engine, loop)

        await asyncio.to_thread(_run_trainer, engine, loop, steps, batch, on_batch)
        _check_books(engine)
        stats = Rollout.of(engine).executor.stats()
        bstats = Rollout.of(engine).buffer.stats

    assert len(consumed_ids) == steps * batch
    handled = {"drop": bstats.dropped, "requeue": bstats.requeued, "keep": bstats.kept_stale}[policy]
    assert handled > 0, "the latency mix must produce stale items, or this test checks nothing"
    assert bstats.kept_stale == violations_kept
    if policy == "requeue":
        assert stats["submitted"] == steps * batch + 60 + bstats.requeued
        assert len(set(consumed_ids)) == len(consumed_ids), "a requeued prompt was consumed twice"
    # Nothing lost: every consumed/dropped/requeued item was accepted once.
    assert stats["accepted"] == bstats.consumed + bstats.dropped + bstats.requeued + stats["buffered"]


async def test_stragglers_are_waited_for_instead_of_going_stale():
    """The same latency mix as above: with the consumer keeping slots for items about to expire, no
    generation is thrown away; without it, stragglers passed over for fresher groups go stale."""
    eta, batch, steps = 1, 4, 25

    async def run(grace):
        cfg = RolloutConfig(max_staleness=eta, consumer_batch_size=batch, max_concurrent=12, expiring_grace_s=grace)
        async with FakeEngine(latency=random_latency(0.004, seed=1), rollout=cfg) as engine:
            for i in range(steps * batch + 60):
                engine.submit(i, EchoWorkflow())
            lags: list[int] = []

            def on_batch(step, trajs):
                lags.extend(step - t.min_version for t in trajs)

            await asyncio.to_thread(_run_trainer, engine, asyncio.get_running_loop(), steps, batch, on_batch)
            return Rollout.of(engine).buffer.stats, Rollout.of(engine).executor.stats(), lags

    lost, _, _ = await run(0)
    kept, ex, lags = await run(30)
    assert lost.dropped > 0, "the latency mix must produce stragglers, or this test checks nothing"
    assert kept.dropped == 0 and kept.held > 0 and max(lags) <= eta
    assert ex["held_for_expiring"] == kept.held and ex["held_for_expiring_s"] == kept.held_s


def _check_books_threadsafe(engine, loop):
    async def check():
        _check_books(engine)

    asyncio.run_coroutine_threadsafe(check(), loop).result(5)


async def test_eta_zero_alternates_strictly():
    batch, steps = 4, 8
    cfg = RolloutConfig(max_staleness=0, consumer_batch_size=batch, max_concurrent=64)
    training = threading.Event()
    starts: list[int] = []

    def on_start(engine, data):
        assert not training.is_set(), "an episode started while the trainer was training"
        starts.append(engine.get_version())

    async with FakeEngine(latency=random_latency(0.003, seed=2), rollout=cfg) as engine:
        loop = asyncio.get_running_loop()
        for i in range(steps * batch + 20):
            engine.submit(i, EchoWorkflow(on_start))

        def trainer():
            for step in range(steps):
                trajs = Rollout.of(engine).buffer.get_batch(batch, timeout=20)
                training.set()
                assert Rollout.of(engine).executor.n_running == 0  # nothing generates while we train
                assert all(t.versions[-1] == step and t.min_version == step for t in trajs)
                training.clear()
                asyncio.run_coroutine_threadsafe(_step(engine, step + 1), loop).result(10)

        await asyncio.to_thread(trainer)
    # Rollout and training alternate: batch k was generated entirely at version k.
    assert starts[: steps * batch] == [v for v in range(steps) for _ in range(batch)]


class FlakyWorkflow:
    """10% raise, 5% hang forever, the rest succeed."""

    def __init__(self, seed=0):
        self.rng = random.Random(seed)

    async def arun_episode(self, engine, data):
        u = self.rng.random()
        if u < 0.10:
            raise RuntimeError("simulated workflow bug")
        if u < 0.15:
            await asyncio.Event().wait()  # hangs until the episode deadline
        resp = await engine.agenerate(ModelRequest([5, 6], G))
        return Trajectory.from_response(resp, reward=0.5)


async def test_raising_and_hanging_episodes_do_not_stop_the_run():
    batch, steps = 8, 10
    cfg = RolloutConfig(max_staleness=2, consumer_batch_size=batch, max_concurrent=32, episode_timeout_s=0.2)
    async with FakeEngine(latency=random_latency(0.002, seed=3), rollout=cfg) as engine:
        loop = asyncio.get_running_loop()
        wf = FlakyWorkflow()
        for i in range(400):
            engine.submit(i, wf)
        await asyncio.to_thread(_run_trainer, engine, loop, steps, batch)
        await asyncio.sleep(0.3)  # let the hanging episodes reach their deadline
        stats = Rollout.of(engine).executor.stats()
        _check_books(engine)
    reasons = stats["rejected_by_reason"]
    assert reasons.get("RuntimeError", 0) > 0
    assert reasons.get("timeout", 0) > 0
    assert stats["consumed"] == steps * batch


class OddWorkflow:
    async def arun_episode(self, engine, data):
        if data == "none":
            return None
        if data == "bad":
            return {"not": "a trajectory"}
        resp = await engine.agenerate(ModelRequest([1], G))
        return [Trajectory.from_response(resp), Trajectory.from_response(resp)]


async def test_none_and_wrong_types_are_counted_rejections():
    async with FakeEngine(rollout=RolloutConfig(max_staleness=10)) as engine:
        out = await engine.rollout(["none", "bad", "ok"], OddWorkflow())
        stats = Rollout.of(engine).executor.stats()
    assert len(out) == 2 and out[0].group_id == out[1].group_id
    assert stats["rejected_by_reason"] == {"none": 1, "WorkflowError": 1}


async def test_n_samples_share_a_group_id():
    cfg = RolloutConfig(episodes_per_item=4, consumer_batch_size=2, max_staleness=4)
    async with FakeEngine(rollout=cfg) as engine:
        gids = [engine.submit(i, EchoWorkflow()) for i in range(2)]
        trajs = await engine.wait(2, timeout=5)
    assert len(trajs) == 8
    assert sorted({t.group_id for t in trajs}) == sorted(gids)
    assert all(sum(t.group_id == g for t in trajs) == 4 for g in gids)


async def test_capacity_frees_the_moment_an_episode_ends():
    """With max_concurrent=1, episodes run strictly one after another, with no idle gap."""
    cfg = RolloutConfig(max_concurrent=1, max_staleness=100, consumer_batch_size=1)
    async with FakeEngine(latency=0.001, rollout=cfg) as engine:
        for i in range(20):
            engine.submit(i, EchoWorkflow())
        await engine.wait(20, timeout=5)
        lat = list(Rollout.of(engine).executor.admission_latencies)
    assert len(lat) == 19
    assert Rollout.of(engine).executor.staleness.stats.started == 20


async def test_pause_stops_admission_and_resume_restarts_it():
    cfg = RolloutConfig(max_staleness=100, consumer_batch_size=1)
    async with FakeEngine(latency=0.001, rollout=cfg) as engine:
        await engine.pause()
        for i in range(5):
            engine.submit(i, EchoWorkflow())
        await asyncio.sleep(0.02)
        assert Rollout.of(engine).executor.n_running == 0 and Rollout.of(engine).executor.n_queued == 5
        await engine.resume()
        assert len(await engine.wait(5, timeout=5)) == 5


async def test_interrupted_generation_carries_two_versions():
    cfg = RolloutConfig(max_staleness=5)
    async with FakeEngine(latency=0.2, rollout=cfg) as engine:
        engine.submit(0, EchoWorkflow())
        await asyncio.sleep(0.05)
        await _step(engine, 1)
        (traj,) = await engine.wait(1, timeout=5)
    gen = [v for v in traj.versions if v >= 0]
    assert gen[0] == 0 and gen[-1] == 1, gen
    assert engine.n_interrupted == 1


async def test_shutdown_cancels_running_episodes_and_leaves_no_task():
    cfg = RolloutConfig(max_staleness=100, episode_timeout_s=None)
    async with FakeEngine(latency=60.0, rollout=cfg) as engine:
        for i in range(10):
            engine.submit(i, EchoWorkflow())
        await asyncio.sleep(0.01)
        assert Rollout.of(engine).executor.n_running == 10
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert Rollout.of(engine).executor.n_running == 0
    assert Rollout.of(engine).executor.stats()["rejected_by_reason"] == {"cancelled": 10}


async def test_shutdown_books_episodes_that_never_got_to_run():
    """Items started in the same loop turn as the exit: their tasks are cancelled before their first
    step, so no episode code runs, yet they must leave the books like any cancelled episode (no
    running count left behind, and no buffer slot kept for them by a later consumer)."""
    cfg = RolloutConfig(max_staleness=100, episode_timeout_s=None)
    async with FakeEngine(rollout=cfg) as engine:
        for i in range(6):
            engine.submit(i, EchoWorkflow())  # started at once, but no await follows: none has run
        executor = Rollout.of(engine).executor
        assert executor.n_running == 6
    assert executor.n_running == 0
    assert executor.stats()["rejected_by_reason"] == {"cancelled": 6}
    assert not executor.buffer._running_at  # nothing left for the straggler wait to hold slots for
    _check_books(engine)


async def test_cancelling_the_owner_cancels_everything():
    cfg = RolloutConfig(max_staleness=100, episode_timeout_s=None)

    async def owner():
        async with FakeEngine(latency=60.0, rollout=cfg) as engine:
            for i in range(5):
                engine.submit(i, EchoWorkflow())
            await asyncio.Event().wait()

    task = asyncio.create_task(owner())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_wait_times_out_without_losing_data():
    async with FakeEngine(rollout=RolloutConfig(max_staleness=10)) as engine:
        engine.submit(0, EchoWorkflow())
        with pytest.raises(TimeoutError):
            await engine.wait(2, timeout=0.05)
        assert len(await engine.wait(1, timeout=1)) == 1


async def test_requeue_resubmits_the_same_prompt():
    cfg = RolloutConfig(max_staleness=0, consumer_batch_size=1, stale_policy="requeue")
    async with FakeEngine(rollout=cfg) as engine:
        engine.submit(7, EchoWorkflow())
        await asyncio.sleep(0.01)
        assert len(Rollout.of(engine).buffer) == 1
        engine.set_version(3)  # three steps passed: the buffered item is too stale
        (traj,) = await engine.wait(1, timeout=5)
    assert traj.info["data"] == 7 and traj.min_version == 3  # the prompt ran again, at version 3
    assert Rollout.of(engine).buffer.stats.requeued == 1


def test_submit_rejects_objects_without_arun_episode():
    engine = FakeEngine()
    with pytest.raises(WorkflowError, match="arun_episode"):
        engine.submit(0, object())


# ---------------------------------------------------------------------------- consecutive rejections
class BoomWorkflow:
    """Raises for every item whose ``fails(data)`` is true (every item by default), else echoes."""

    def __init__(self, fails=lambda data: True):
        self.fails = fails

    async def arun_episode(self, engine, data):
        if self.fails(data):
            raise RuntimeError(f"boom {data % 2 if isinstance(data, int) else data}")
        return await EchoWorkflow().arun_episode(engine, data)


async def test_consecutive_rejections_fail_waiting_consumers_fast():
    cfg = RolloutConfig(max_staleness=10, consumer_batch_size=4)  # default limit: 64
    assert cfg.max_consecutive_rejections == 64
    async with FakeEngine(latency=0.001, rollout=cfg) as engine:
        thread_consumer = asyncio.create_task(asyncio.to_thread(Rollout.of(engine).buffer.get_batch, 4, 20))
        loop_consumer = asyncio.create_task(engine.wait(4, timeout=20))
        await asyncio.sleep(0.05)  # both consumers are asleep before the first episode runs
        t0 = time.perf_counter()
        for i in range(300):
            engine.submit(i, BoomWorkflow())
        errors = []
        for consumer in (thread_consumer, loop_consumer):
            with pytest.raises(WorkflowError) as info:
                await asyncio.wait_for(consumer, 5)
            errors.append(info.value)
        elapsed = time.perf_counter() - t0
        assert Rollout.of(engine).executor.failure is errors[0] is errors[1]
        assert Rollout.of(engine).executor.n_queued > 0  # admission stopped; the rest stay pending
        with pytest.raises(WorkflowError):  # a consumer arriving later fails at once too
            await asyncio.to_thread(Rollout.of(engine).buffer.get_batch, 1, 20)
    assert elapsed < 2.0, f"consumers waited {elapsed:.2f}s for a failed rollout (their timeout: 20 s)"
    msg = str(errors[0])
    assert "64 consecutive episodes were rejected" in msg
    assert "RuntimeError: boom 0" in msg and "RuntimeError: boom 1" in msg
    assert "max_seq_len" in msg and "rollout.max_consecutive_rejections" in msg


class GroupBoomWorkflow:
    """Fails inside a TaskGroup (as workflows with parallel sub-calls do): an ExceptionGroup."""

    async def arun_episode(self, engine, data):
        async def call():
            raise ValueError("context length exceeded: 320 > 256")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(call())


async def test_rejection_reason_names_the_error_inside_an_exception_group():
    cfg = RolloutConfig(max_staleness=10, max_consecutive_rejections=3)
    async with FakeEngine(rollout=cfg) as engine:
        for i in range(10):
            engine.submit(i, GroupBoomWorkflow())
        with pytest.raises(WorkflowError, match=r"ValueError: context length exceeded: 320 > 256"):
            await engine.wait(1, timeout=5)


async def test_consecutive_rejections_keep_buffered_groups_and_pending_items():
    cfg = RolloutConfig(max_staleness=10, max_concurrent=1, max_consecutive_rejections=5)
    async with FakeEngine(rollout=cfg) as engine:
        for i in range(100):
            engine.submit(i, BoomWorkflow(fails=lambda d: d >= 3))
        with pytest.raises(WorkflowError, match="5 consecutive"):
            await engine.wait(4, timeout=5)
        stats = Rollout.of(engine).executor.stats()
        assert stats["accepted"] == 3 and stats["rejected"] == 5 and stats["queued"] == 92
        r = Rollout.of(engine)
        assert len(r.buffer.state_dict()["groups"]) == 3 and len(r.executor.pending()) == 92
        # What is already buffered is still handed out; only waiting for more raises.
        assert sorted(t.info["data"] for t in await engine.wait(3, timeout=1)) == [0, 1, 2]
        with pytest.raises(WorkflowError):
            await engine.rollout([1000], EchoWorkflow())


@pytest.mark.parametrize(("limit", "trips"), [(3, False), (2, True)])
async def test_an_accepted_episode_resets_the_rejection_count(limit, trips):
    """One accepted item, then two rejected, repeated (max_concurrent=1 keeps that order)."""
    cfg = RolloutConfig(max_staleness=100, max_concurrent=1, max_consecutive_rejections=limit)
    async with FakeEngine(rollout=cfg) as engine:
        wf = BoomWorkflow(fails=lambda d: d % 3 != 0)
        if trips:
            with pytest.raises(WorkflowError, match="2 consecutive"):
                await engine.rollout(list(range(60)), wf)
        else:
            assert len(await engine.rollout(list(range(60)), wf)) == 20
            assert Rollout.of(engine).executor.failure is None


class CoinFlipWorkflow:
    def __init__(self, seed):
        self.rng = random.Random(seed)

    async def arun_episode(self, engine, data):
        if self.rng.random() < 0.5:
            raise RuntimeError("tails")
        return await EchoWorkflow().arun_episode(engine, data)


async def test_half_random_failures_never_trip_the_default_limit():
    cfg = RolloutConfig(max_staleness=2000, consumer_batch_size=1, max_concurrent=16)
    async with FakeEngine(latency=random_latency(0.001, seed=4), rollout=cfg) as engine:
        out = await engine.rollout(list(range(1000)), CoinFlipWorkflow(seed=5))
        stats = Rollout.of(engine).executor.stats()
    assert Rollout.of(engine).executor.failure is None
    assert 400 < len(out) < 600 and stats["rejected"] == 1000 - len(out)


async def test_max_consecutive_rejections_none_disables_the_limit():
    cfg = RolloutConfig(max_staleness=10, max_consecutive_rejections=None)
    async with FakeEngine(rollout=cfg) as engine:
        assert await engine.rollout(list(range(300)), BoomWorkflow()) == []
        with pytest.raises(TimeoutError):
            await engine.wait(1, timeout=0.05)
        stats = Rollout.of(engine).executor.stats()
    assert Rollout.of(engine).executor.failure is None and stats["rejected"] == 300


class _NoTrainEngine:
    """A train engine for a run that must stop before its first train step."""

    def vocab_size(self) -> int | None:
        return None

    def upload_weights(self, meta):
        raise AssertionError("no train step should have run")


async def test_trainer_raises_the_rejection_error_instead_of_waiting_for_a_batch(tmp_path):
    from agentflow._data import PromptSource
    from agentflow._metrics import MetricsLogger
    from agentflow._trainer import Trainer, TrainerConfig

    cfg = RolloutConfig(consumer_batch_size=2, max_consecutive_rejections=8)
    metrics = MetricsLogger(tmp_path)
    trainer = Trainer(
        TrainerConfig(total_steps=2, batch_timeout_s=20.0), engine=FakeEngine(rollout=cfg),
        train_engine=_NoTrainEngine(), train_step=lambda trajs: {}, workflow=BoomWorkflow(),
        prompts=PromptSource([{"i": i} for i in range(50)]), run_dir=tmp_path, metrics=metrics, progress=False,
    )
    t0 = time.perf_counter()
    try:
        with pytest.raises(WorkflowError, match="8 consecutive episodes were rejected") as info:
            await asyncio.wait_for(trainer.run(), 10)
    finally:
        metrics.close()
    assert time.perf_counter() - t0 < 2.0
    assert "RuntimeError: boom {'i': " in str(info.value)
