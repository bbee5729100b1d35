"""The run's timeline (``logging.trace`` / ``Trainer(trace=True)``): a Trace Event Format file with
every episode group from start to end, the trainer's phases, what each step took, what the buffer
discarded and the version bumps, on one clock; readable also when the run was cut off."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter

import pytest
from _trainer_helpers import NullTrainEngine

from agentflow import GenerationConfig, ModelRequest, Rollout, RolloutConfig, Trajectory
from agentflow._trace import Timeline, read_trace
from agentflow.algo import AlgoConfig, group_filter
from agentflow.testing import FakeEngine, random_latency

G = GenerationConfig(max_new_tokens=4)


class _Workflow:
    """Two samples a group; every third prompt's samples differ in reward (the rest are flat)."""

    async def arun_episode(self, engine, data):
        i = data["i"] if isinstance(data, dict) else data
        outs = await asyncio.gather(*[engine.agenerate(ModelRequest([1, 2, i % 200 + 3], G)) for _ in range(2)])
        return [Trajectory.from_response(o, reward=float(i % 3 == 0 and k == 0)) for k, o in enumerate(outs)]


def test_a_closed_timeline_is_json_and_a_cut_off_one_still_reads(tmp_path):
    tl = Timeline(tmp_path / "trace.json")
    tl.episode_start("g0", 0)
    tl.episode_end("g0", 0, 1, "buffered", samples=2)
    tl.discard("g1", "drop", 0)
    tl.flush()
    cut = read_trace(tmp_path / "trace.json")  # no closing bracket yet: what a killed run leaves
    assert [e["name"] for e in cut if e["ph"] != "M"] == ["v0", "v0", "discard"]
    assert cut[-1]["args"] == {"group": "g1", "why": "stale", "min_version": 0}
    tl.close()
    tl.close()  # idempotent
    events = json.loads((tmp_path / "trace.json").read_text())  # closed: plain JSON
    assert events[-1]["name"] == "end"
    begin, end = (e for e in events if e.get("cat") == "episode")
    assert (begin["ph"], end["ph"], begin["id"], end["id"]) == ("b", "e", "g0", "g0")
    assert end["args"] == {"outcome": "buffered", "end_version": 1, "samples": 2} and end["ts"] >= begin["ts"]

    text = (tmp_path / "trace.json").read_text()
    (tmp_path / "torn.json").write_text(text[: text.index('"discard"') + 12])  # cut mid-event
    assert [e["name"] for e in read_trace(tmp_path / "torn.json") if e["ph"] != "M"] == ["v0", "v0"]


def test_a_resumed_run_does_not_overwrite_the_earlier_timeline(tmp_path):
    first = Timeline.in_run_dir(tmp_path)
    first.close()
    second = Timeline.in_run_dir(tmp_path)
    second.close()
    assert (first.path.name, second.path.name) == ("trace.json", "trace-2.json")
    assert json.loads(first.path.read_text())[-1]["name"] == "end"


async def test_the_trainer_traces_every_group_phase_and_version(tmp_path):
    from agentflow._data import PromptSource
    from agentflow._metrics import MetricsLogger
    from agentflow._trainer import Trainer, TrainerConfig

    steps, batch, eta = 4, 2, 1
    cfg = RolloutConfig(max_staleness=eta, consumer_batch_size=batch, max_concurrent=4)
    metrics = MetricsLogger(tmp_path)
    trainer = Trainer(
        TrainerConfig(total_steps=steps, batch_timeout_s=10.0, checkpoint_every=0, weight_update="mem"),
        engine=FakeEngine(latency=random_latency(0.003, seed=0), rollout=cfg),
        train_engine=NullTrainEngine(), train_step=lambda trajs: {"n": float(len(trajs))}, workflow=_Workflow(),
        prompts=PromptSource([{"i": i} for i in range(200)], shuffle=False), run_dir=tmp_path, metrics=metrics,
        progress=False, group_filter=group_filter(AlgoConfig(dynamic_sampling=True)), trace=True,
    )
    try:
        await asyncio.wait_for(trainer.run(), 30)
    finally:
        metrics.close()
    events = json.loads((tmp_path / "trace.json").read_text())  # closed when the run ended
    assert trainer.timeline is None and trainer.rollout.executor.timeline is None

    # the trainer thread: wait -> train -> publish per step, one after the other, then the version
    phases = [e for e in events if e.get("cat") == "trainer"]
    assert [(e["name"], e["args"].get("step", e["args"].get("version"))) for e in phases] == [
        (name, s) for s in range(1, steps + 1) for name in ("wait", "train", "publish")]
    for a, b in itertools.pairwise(phases):
        assert a["ts"] + a["dur"] <= b["ts"]
    assert all(e["args"]["held_s"] >= 0 for e in phases if e["name"] == "wait")
    bumps = [e for e in events if e["name"].startswith("version ")]
    assert [e["args"]["version"] for e in bumps] == list(range(1, steps + 1))

    # every group that started ended, once, after it started
    begins = {e["id"]: e for e in events if e.get("cat") == "episode" and e["ph"] == "b"}
    ends = [e for e in events if e.get("cat") == "episode" and e["ph"] == "e"]
    assert sorted(e["id"] for e in ends) == sorted(begins)
    for e in ends:
        assert e["ts"] >= begins[e["id"]]["ts"] and e["name"] == begins[e["id"]]["name"]
    outcomes = Counter(e["args"]["outcome"] for e in ends)
    assert outcomes["buffered"] >= steps * batch

    # what each step took: groups that ended buffered, before the take, within the staleness bound
    takes = [e for e in events if e["name"] == "take"]
    assert [t["args"]["step"] for t in takes] == list(range(1, steps + 1))
    end_of = {e["id"]: e for e in ends}
    for t in takes:
        assert len(t["args"]["groups"]) == batch and all(0 <= lag <= eta for lag in t["args"]["lags"])
        for gid in t["args"]["groups"]:
            assert end_of[gid]["args"]["outcome"] == "buffered" and end_of[gid]["ts"] <= t["ts"]

    # flat groups: screened on arrival (outcome "filter") or dropped where taken (a discard); all counted
    filtered = outcomes["filter"] + sum(e["name"] == "discard" and e["args"]["why"] == "filter" for e in events)
    assert filtered == trainer.rollout.buffer.stats.filtered > 0


class _Meta:
    version = None


async def test_stale_groups_show_as_discarded_with_their_version(tmp_path):
    cfg = RolloutConfig(max_staleness=0, consumer_batch_size=2, max_concurrent=2)
    async with FakeEngine(rollout=cfg) as engine:
        rollout = Rollout.of(engine)
        tl = rollout.executor.timeline = Timeline.in_run_dir(tmp_path)
        rollout.submit(3, _Workflow())
        rollout.submit(6, _Workflow())
        for _ in range(400):
            await asyncio.sleep(0.005)
            if len(rollout.buffer) == 2:
                break
        assert len(rollout.buffer) == 2
        await rollout.update_weights(_Meta(), 1)  # both buffered groups are now one version too old
        rollout.submit(9, _Workflow())
        rollout.submit(12, _Workflow())
        got = await asyncio.to_thread(rollout.get_groups, 2, 5.0)
    tl.close()
    events = read_trace(tl.path)
    assert [g.data for g in got] == [9, 12]
    discards = [e["args"] for e in events if e["name"] == "discard"]
    assert [(d["why"], d["min_version"]) for d in discards] == [("stale", 0), ("stale", 0)]
    starts = [e["name"] for e in events if e.get("cat") == "episode" and e["ph"] == "b"]
    assert starts == ["v0", "v0", "v1", "v1"]


def test_logging_trace_is_a_recipe_setting():
    from agentflow.errors import ConfigError
    from agentflow.recipe.config import load_recipe_config

    assert load_recipe_config().logging.trace is False
    assert load_recipe_config(overrides=["logging.trace=true"]).logging.trace is True
    with pytest.raises(ConfigError, match=r"logging\.trace"):
        load_recipe_config(overrides=["logging.trace=sometimes"])


def _two_step_trace(tmp_path) -> Timeline:
    tl = Timeline.in_run_dir(tmp_path)
    for gid, version in (("a", 0), ("b", 0), ("c", 1), ("d", 1)):
        tl.episode_start(gid, version)
    for gid, version in (("a", 0), ("b", 0), ("c", 1)):
        tl.episode_end(gid, version, 1, "buffered", samples=2)
    t = time.perf_counter()
    tl.span("wait", t - 3.0, t - 2.0, step=1, held_s=0.25)
    tl.instant("take", 1, step=1, groups=["a", "b"], lags=[0, 0])
    tl.span("train", t - 2.0, t - 0.5, step=1, samples=4)
    tl.span("publish", t - 0.5, t, version=1)
    tl.span("wait", t, t, step=2, held_s=0.0)
    tl.instant("take", 1, step=2, groups=["a", "c"], lags=[1, 0])
    tl.discard("b", "drop", 0)
    tl.evaluation(1, t - 0.5, t, n=8, reward=0.25)
    tl.flush()  # not closed: "d" is still running, as in a run that was killed
    return tl


def test_the_summary_gives_each_steps_phases_lags_and_the_discards(tmp_path):
    from agentflow._trace import format_summary, summarize_trace

    tl = _two_step_trace(tmp_path)
    summary = summarize_trace(read_trace(tl.path))
    assert summary["steps"] == [
        {"step": 1, "wait_s": 1.0, "held_s": 0.25, "lags": {"0": 2}, "train_s": 1.5, "publish_s": 0.5},
        {"step": 2, "wait_s": 0.0, "held_s": 0.0, "lags": {"0": 1, "1": 1}},
    ]
    assert summary["episodes"] == {"buffered": 3} and summary["unfinished"] == 1
    assert summary["discarded"] == {"stale": 1}
    assert [(k, v["n"]) for k, v in summary["by_start"].items()] == [("v0", 2), ("v1", 1)]
    assert summary["evaluations"] == [{"version": 1, "s": 0.5, "reward": 0.25}]
    text = format_summary(summary, "run")
    assert text.splitlines()[-1] == "evaluations: v1 0.5 s (reward 0.250)"
    assert "2 steps; 3 episode groups ended (buffered 3; 1 still running" in text and "discarded: stale 1" in text
    assert text.splitlines()[2].split() == ["1", "1.00", "0.25", "1.50", "0.50", "0:", "2"]
    tl.close()


def test_agentflow_trace_prints_the_newest_trace_of_a_run(tmp_path, capsys):
    from agentflow.cli import main

    Timeline.in_run_dir(tmp_path).close()  # an earlier run's, without steps
    _two_step_trace(tmp_path).close()  # trace-2.json: the newest
    assert main(["trace", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace"].endswith("trace-2.json") and len(out["steps"]) == 2
    assert main(["trace", str(tmp_path / "trace.json")]) == 0
    assert "0 steps" in capsys.readouterr().out

    assert main(["trace", str(tmp_path / "nope")]) == 2
    assert "expected a run directory or a trace file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["trace", str(empty)]) == 2
    assert "logging.trace=true" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"not": "a trace"}')
    assert main(["trace", str(tmp_path / "bad.json")]) == 2
    assert "not a trace agentflow wrote" in capsys.readouterr().err
