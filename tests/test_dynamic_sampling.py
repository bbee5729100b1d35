"""Dynamic sampling (DAPO) with FakeEngine: the group filter drops zero-variance groups where the
trainer consumes them, each dropped group gives its staleness slot back (without that, eta = 0
would deadlock), trained groups stay within the staleness bound, and the Trainer logs the counts."""

from __future__ import annotations

import asyncio
import json
import pathlib

import pytest

from agentflow import GenerationConfig, Group, ModelRequest, ReplayBuffer, Rollout, RolloutConfig, Trajectory
from agentflow.algo import AlgoConfig, group_filter
from agentflow.testing import FakeEngine, random_latency

G = GenerationConfig(max_new_tokens=4)
KEEP = group_filter(AlgoConfig(dynamic_sampling=True))


class TwoSampleWorkflow:
    """A group of two samples; only every third item's rewards differ (carries signal)."""

    async def arun_episode(self, engine, data):
        outs = await asyncio.gather(*[engine.agenerate(ModelRequest([1, 2, data % 200 + 3], G)) for _ in range(2)])
        signal = data % 3 == 0
        return [Trajectory.from_response(o, reward=float(signal and i == 0), info={"data": data})
                for i, o in enumerate(outs)]


def _traj(reward: float) -> Trajectory:
    return Trajectory([1, 2], [0, 1], [0.0, -1.0], [-1, 0], reward=reward)


def test_buffer_drops_rejected_groups_and_reports_them():
    buf = ReplayBuffer(RolloutConfig(max_staleness=5))
    seen: list[tuple[str, str]] = []
    buf.on_discard = lambda g, why: seen.append((g.group_id, why))
    for gid, rewards in (("flat", (1.0, 1.0)), ("ok", (1.0, 0.0)), ("single", (1.0,)), ("ok2", (0.0, 0.5))):
        buf.put_nowait(Group(gid, [_traj(r) for r in rewards]))
    got = buf.get_groups(2, timeout=1.0, group_filter=KEEP)
    assert [g.group_id for g in got] == ["ok", "ok2"]
    assert seen == [("flat", "filter"), ("single", "filter")]
    assert (buf.stats.filtered, buf.stats.filtered_episodes, buf.stats.consumed) == (2, 3, 2)


def test_timeout_names_the_filter_and_a_failing_filter_loses_nothing():
    buf = ReplayBuffer(RolloutConfig())
    buf.put_nowait(Group("flat", [_traj(1.0), _traj(1.0)]))
    with pytest.raises(TimeoutError, match="dropped by the group filter"):
        buf.get_groups(1, timeout=0.05, group_filter=KEEP)
    buf.put_nowait(Group("ok", [_traj(1.0), _traj(0.0)]))

    def boom(group):
        raise ValueError("filter bug")

    with pytest.raises(ValueError, match="filter bug"):
        buf.get_groups(1, timeout=0.05, group_filter=boom)
    assert [g.group_id for g in buf.get_groups(1, timeout=0.05)] == ["ok"]


def _train(rollout: Rollout, loop, steps: int, batch: int, keep, timeout: float = 10.0) -> list[list[Group]]:
    """The trainer thread: take a filtered batch, then pause -> bump the version -> resume."""
    out = []
    for step in range(steps):
        out.append(rollout.get_groups(batch, timeout=timeout, group_filter=keep))
        asyncio.run_coroutine_threadsafe(rollout.update_weights(_Meta(), step + 1), loop).result(timeout)
    return out


class _Meta:
    version = None


@pytest.mark.parametrize("eta", [0, 1])
async def test_dropped_groups_give_their_staleness_slot_back(eta):
    batch, steps = 2, 6
    cfg = RolloutConfig(max_staleness=eta, consumer_batch_size=batch, max_concurrent=4, episode_timeout_s=10.0)
    async with FakeEngine(latency=random_latency(0.002, seed=eta), rollout=cfg) as engine:
        rollout = Rollout.of(engine)
        for i in range(400):
            rollout.submit(i, TwoSampleWorkflow())
        loop = asyncio.get_running_loop()
        batches = await asyncio.to_thread(_train, rollout, loop, steps, batch, KEEP)
        stats, st = rollout.stats(), rollout.staleness.stats
    for step, groups in enumerate(batches):
        assert len(groups) == batch
        for g in groups:
            assert g.data % 3 == 0  # only groups with signal are trained on
            assert step - g.min_version <= eta  # and never staler than the bound
    assert stats["filtered"] > 0 and stats["filtered_episodes"] == 2 * stats["filtered"]
    assert st.given_back == stats["filtered"] + stats["dropped_stale"] + stats["requeued_stale"]
    # the budget counts trained and buffered groups only: (eta + v + 1) * B bounds accepted - given back
    assert rollout.staleness.accepted <= (eta + steps + 1) * batch


async def test_without_the_give_back_eta_zero_deadlocks():
    """The control: the same run with the buffer's discard callback cut starves at version 0."""
    cfg = RolloutConfig(max_staleness=0, consumer_batch_size=2, max_concurrent=4)
    async with FakeEngine(rollout=cfg) as engine:
        rollout = Rollout.of(engine)
        rollout.buffer.on_discard = None
        for i in range(1, 50):  # items 1 and 2 start first; both are flat, so they are dropped
            rollout.submit(i, TwoSampleWorkflow())
        with pytest.raises(TimeoutError, match="dropped by the group filter"):
            await asyncio.to_thread(rollout.get_groups, 2, 0.5, group_filter=KEEP)
        assert rollout.staleness.stats.started == 2  # nothing else could start


class _FakeTrainEngine:
    def __init__(self) -> None:
        self.versions: list[int] = []

    def set_version(self, version: int) -> None:
        self.versions.append(version)

    def vocab_size(self) -> int | None:
        return None

    def upload_weights(self, meta):
        return meta

    def save(self, meta) -> None:
        pathlib.Path(meta.path).mkdir(parents=True, exist_ok=True)


async def _train_with_filter(tmp_path, cfg: RolloutConfig, workflow, train_step, *, steps: int, prompts: int,
                             deadline_s: float, train_engine=None) -> list[dict]:
    """A Trainer on FakeEngine with dynamic sampling over prompts ``{"i": 0..prompts-1}``: its
    metrics records."""
    from agentflow._data import PromptSource
    from agentflow._metrics import MetricsLogger
    from agentflow._trainer import Trainer, TrainerConfig

    metrics = MetricsLogger(tmp_path)
    trainer = Trainer(
        TrainerConfig(total_steps=steps, batch_timeout_s=10.0, checkpoint_every=0), engine=FakeEngine(rollout=cfg),
        train_engine=train_engine or _FakeTrainEngine(), train_step=train_step, workflow=workflow,
        prompts=PromptSource([{"i": i} for i in range(prompts)], shuffle=False), run_dir=tmp_path, metrics=metrics,
        progress=False, group_filter=KEEP,
    )
    try:
        await asyncio.wait_for(trainer.run(), deadline_s)
    finally:
        metrics.close()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


async def test_trainer_logs_filtered_groups_and_extra_episodes(tmp_path):
    class Workflow(TwoSampleWorkflow):
        async def arun_episode(self, engine, data):
            return await super().arun_episode(engine, data["i"])

    cfg = RolloutConfig(max_staleness=1, consumer_batch_size=2, max_concurrent=4)
    train_engine = _FakeTrainEngine()
    records = await _train_with_filter(tmp_path, cfg, Workflow(), lambda trajs: {"n": float(len(trajs))}, steps=3,
                                       prompts=60, deadline_s=20, train_engine=train_engine)
    steps = [r for r in records if "rollout/filtered_groups" in r]
    assert len(steps) == 3 and train_engine.versions == [0, 1, 2]
    total = sum(r["rollout/filtered_groups"] for r in steps)
    assert total >= 3  # two of every three prompts are flat
    assert steps[-1]["rollout/extra_episodes_total"] == 2 * total
    assert all(r["time/publish_s"] >= 0 for r in steps)
    for r in steps:
        n = r["rollout/filtered_groups"]
        assert r["rollout/filtered_frac"] == pytest.approx(n / (n + 2))
        assert r["train/n"] == 4.0


@pytest.mark.parametrize("screen", [True, False])
async def test_arrival_screening_refills_the_budget_before_the_trainer_takes(screen):
    """With the filter screening arrivals, flat groups give their slot back as they finish, so the
    (eta + 1) * B groups waiting for the trainer all carry signal; filtered only at consume time,
    flat groups sit in the budget until the trainer takes them (the control arm)."""
    eta, batch = 1, 2
    cfg = RolloutConfig(max_staleness=eta, consumer_batch_size=batch, max_concurrent=4)
    async with FakeEngine(rollout=cfg) as engine:
        rollout = Rollout.of(engine)
        if screen:
            rollout.buffer.arrival_filter = KEEP
        for i in range(1, 100):
            rollout.submit(i, TwoSampleWorkflow())
        for _ in range(200):  # until the staleness budget is full and nothing runs
            await asyncio.sleep(0.005)
            if rollout.staleness.capacity() == 0 and rollout.executor.n_running == 0:
                break
        buffered = list(rollout.buffer._groups)
        stats, st = rollout.stats(), rollout.staleness.stats
    assert len(buffered) == (eta + 1) * batch
    with_signal = sum(KEEP(g) for g in buffered)
    if screen:
        assert with_signal == len(buffered)
        assert stats["filtered"] > 0 and st.given_back == stats["filtered"]
        assert st.accepted == len(buffered) + stats["filtered"]
    else:
        assert with_signal < len(buffered)  # items 1, 2, 4, 5 are flat and hold their slots
        assert stats["filtered"] == 0


def test_screen_counts_rejections_and_keeps_a_group_its_filter_fails_on():
    buf = ReplayBuffer(RolloutConfig())
    assert buf.screen(Group("flat", [_traj(1.0), _traj(1.0)]))  # no arrival filter: everything enters
    buf.arrival_filter = KEEP
    assert not buf.screen(Group("flat", [_traj(1.0), _traj(1.0)]))
    assert buf.screen(Group("ok", [_traj(1.0), _traj(0.0)]))
    assert (buf.stats.filtered, buf.stats.filtered_episodes) == (1, 2)

    def boom(group):
        raise ValueError("filter bug")

    buf.arrival_filter = boom  # kept here; the consumer's own filter raises at consume time
    assert buf.screen(Group("ok", [_traj(1.0), _traj(0.0)]))
    assert buf.stats.filtered == 1


@pytest.mark.parametrize("cap", [0, 3])
async def test_the_drop_cap_lets_a_step_fill_when_every_group_is_flat(tmp_path, cap):
    """A policy that gets every prompt right (or wrong) leaves dynamic sampling nothing to keep: without
    a cap the step waits out its timeout; with ``max_filtered_per_step`` it drops that many groups,
    then trains on flat ones."""
    from agentflow._data import PromptSource
    from agentflow._metrics import MetricsLogger
    from agentflow._trainer import Trainer, TrainerConfig

    class Flat(TwoSampleWorkflow):
        async def arun_episode(self, engine, data):
            return await super().arun_episode(engine, 3 * data["i"] + 1)  # never a multiple of 3: flat

    cfg = RolloutConfig(max_staleness=1, consumer_batch_size=2, max_concurrent=4)
    metrics = MetricsLogger(tmp_path)
    trainer = Trainer(
        TrainerConfig(total_steps=3, batch_timeout_s=3.0, checkpoint_every=0), engine=FakeEngine(rollout=cfg),
        train_engine=_FakeTrainEngine(), train_step=lambda trajs: {"n": float(len(trajs))}, workflow=Flat(),
        prompts=PromptSource([{"i": i} for i in range(200)], shuffle=False), run_dir=tmp_path, metrics=metrics,
        progress=False, group_filter=KEEP, max_filtered_per_step=cap,
    )
    try:
        if not cap:
            with pytest.raises(TimeoutError, match="dropped by the group filter"):
                await asyncio.wait_for(trainer.run(), 20)
            return
        await asyncio.wait_for(trainer.run(), 20)
    finally:
        metrics.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rollout/filtered_groups" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["rollout/filter_capped"] == 1 and r["train/n"] == 4.0
        # arrivals are screened one at a time; the trainer's own take may add one past the cap
        assert cap <= r["rollout/filtered_groups"] <= cap + 1


def test_the_drop_cap_is_a_count():
    from agentflow.errors import ConfigError

    assert AlgoConfig(dynamic_sampling=True, dynamic_sampling_max_drop=16).dynamic_sampling_max_drop == 16
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="dynamic_sampling_max_drop must be an integer >= 0"):
            AlgoConfig(dynamic_sampling=True, dynamic_sampling_max_drop=bad)
    with pytest.raises(ConfigError, match="dynamic_sampling is off"):
        AlgoConfig(dynamic_sampling_max_drop=8)


def test_at_least_returns_what_is_ready_and_flat_groups_do_not_count():
    buf = ReplayBuffer(RolloutConfig(max_staleness=5))
    for gid, rewards in (("ok", (1.0, 0.0)), ("flat", (1.0, 1.0))):
        buf.put_nowait(Group(gid, [_traj(r) for r in rewards]))
    with pytest.raises(TimeoutError):  # one group with signal is ready, two are wanted at least
        buf.get_groups(4, timeout=0.05, group_filter=KEEP, at_least=2)
    buf.put_nowait(Group("ok2", [_traj(0.0), _traj(0.5)]))
    buf.put_nowait(Group("ok3", [_traj(0.0), _traj(0.5)]))
    got = buf.get_groups(4, timeout=0.05, group_filter=KEEP, at_least=2)  # all three ready, not four
    assert sorted(g.group_id for g in got) == ["ok", "ok2", "ok3"]
    with pytest.raises(ValueError, match="at_least must be between 1 and n=2, got 3"):
        buf.get_groups(2, timeout=0.05, at_least=3)


@pytest.mark.parametrize("least", [None, 1])
async def test_a_step_starts_with_the_groups_ready_when_a_minimum_is_set(tmp_path, least):
    """Groups with signal finish one at a time, the train step is instant: with
    ``min_consumer_batch_size=1`` the trainer trains on what is ready instead of waiting for B
    (and logs how many groups each step took); without it every step has B."""

    class Trickle(TwoSampleWorkflow):
        async def arun_episode(self, engine, data):
            await asyncio.sleep(0.02 * (data["i"] % 7))
            return await super().arun_episode(engine, data["i"])

    batch = 3
    cfg = RolloutConfig(max_staleness=1, consumer_batch_size=batch, max_concurrent=16, min_consumer_batch_size=least)
    taken: list[int] = []
    records = await _train_with_filter(tmp_path, cfg, Trickle(), lambda trajs: taken.append(len(trajs)) or {},
                                       steps=6, prompts=300, deadline_s=30)
    steps = [r for r in records if "rollout/groups" in r]
    assert [r["rollout/groups"] * 2 for r in steps] == taken and len(taken) == 6
    assert all(r["staleness/max"] <= 1 for r in steps)
    if least is None:
        assert taken == [2 * batch] * 6
    else:
        assert all(2 <= n <= 2 * batch for n in taken) and min(taken) < 2 * batch
