"""Hardening: each test reproduces one finding of the reliability review (docs/reliability.md) and
checks the fixed behaviour. Fast in-process tests here; the ones that start `agentflow train` are
marked integration and kept short (the tiny model, a few steps)."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys

import pytest

from agentflow import CheckpointError
from agentflow._checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")


def _agentflow(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "agentflow", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout, **kw)


# ------------------------------------------------------------------------------------ checkpoints (7, 8)
def _safetensors(path: pathlib.Path, n_floats: int = 4) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * (4 * n_floats))


def _save(ck: Checkpointer, step: int, rollout_state=None) -> pathlib.Path:
    def save_model(path):
        path.mkdir(parents=True)
        _safetensors(path / "model.safetensors")

    return ck.save(step, save_model=save_model, trainer_state={"step": step, "data": {"pos": step}},
                   rollout_state=rollout_state or {"buffer": {"groups": [], "version": step}, "pending": []})


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickled_rollout_state_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = Checkpointer(tmp_path)
    path = _save(ck, 2)
    (path / "rollout.json").unlink()
    (path / "rollout.pkl").write_bytes(pickle.dumps({"buffer": _Evil(), "pending": []}))
    with pytest.raises(CheckpointError, match="pickle"):
        ck.load(path)
    assert not (tmp_path / "PWNED").exists()


def test_rollout_state_is_plain_json_and_round_trips(tmp_path):
    ck = Checkpointer(tmp_path)
    state = {"buffer": {"groups": [{"data": {"pair": (1, 2), 3: b"\x00"}, "trajectories": []}], "version": 2},
             "pending": [{"data": {"__tuple__": "looks like a tag"}}]}
    path = _save(ck, 2, state)
    assert not (path / "rollout.pkl").exists()
    _, loaded = ck.load(path)
    assert loaded == state


def test_objects_in_rollout_data_are_refused_with_their_path(tmp_path):
    ck = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"pending.*\[0\].*_Evil.*plain data"):
        _save(ck, 2, {"buffer": {"groups": [], "version": 2}, "pending": [_Evil()]})
    assert ck.latest() is None and not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["empty trainer.json", "truncated safetensors", "empty rollout.json",
                                    "truncated train state"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog, damage):
    ck = Checkpointer(tmp_path, keep=3)
    _save(ck, 2)
    latest = _save(ck, 4)
    if damage == "empty trainer.json":
        (latest / "trainer.json").write_text("")
    elif damage == "empty rollout.json":
        (latest / "rollout.json").write_text("")
    elif damage == "truncated safetensors":
        f = latest / "model" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-3])
    else:  # a train state written after the manifest, cut short: only the archive check sees it
        import torch

        f = latest / "model" / "agentflow_train_state.pt"
        torch.save({"x": torch.zeros(64)}, f)
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        ck.verify(latest)
    with caplog.at_level("WARNING", logger="agentflow.checkpoint"):
        assert ck.latest_intact().name == "step-000002"
    assert "step-000004" in caplog.text


def test_no_intact_checkpoint_lists_each_problem(tmp_path):
    ck = Checkpointer(tmp_path)
    path = _save(ck, 2)
    (path / "trainer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"step-000002.*(missing|bytes)"):
        ck.latest_intact()


# ------------------------------------------------------------------------------------ stopping (1)
_SLOW_WORKFLOW = '''
import asyncio
from agentflow.workflows.rlvr import RLVRConfig, RLVRWorkflow


class Slow(RLVRWorkflow):
    def __init__(self, tokenizer, reward_fn, gconfig):
        super().__init__(tokenizer, reward_fn, RLVRConfig(gconfig=gconfig))

    async def arun_episode(self, engine, data):
        await asyncio.sleep(2)
        return await super().arun_episode(engine, data)


class NoEpisode:
    pass
'''


def _wait_for(path: pathlib.Path, proc: subprocess.Popen, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.05)


@pytest.mark.integration
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_run_waiting_for_rollouts_within_10s(tmp_path, sig):
    import signal
    import time

    (tmp_path / "wf.py").write_text(_SLOW_WORKFLOW)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agentflow", "train", TINY, f"workflow.name={tmp_path}/wf.py:Slow",
                             f"logging.run_dir={run}", "trainer.total_steps=50", "trainer.checkpoint_every=3",
                             "trainer.batch_timeout_s=60"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "checkpoints" / "step-000003" / "COMPLETE", proc, 240)
        time.sleep(1.0)  # the trainer thread is waiting for the next batch (episodes take 2 s)
        t0 = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert took < 10, took
    assert proc.returncode == 128 + getattr(signal, sig), err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert f"interrupted by {sig}" in lines[0] and "--resume" in lines[0], lines
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert Checkpointer(run).latest().name == f"step-{step:06d}"  # a final checkpoint where a step finished


def test_a_stop_that_does_not_finish_is_forced_within_the_grace(tmp_path):
    """The watchdog: a run stuck in a train step exits at the grace with one line naming where it stands."""
    import time

    script = tmp_path / "stuck.py"
    script.write_text(
        "import asyncio, time\n"
        "from agentflow._stop import GracefulStop\n"
        "async def main():\n"
        "    where = lambda: 'at step 3; last checkpoint step-000002'\n"
        "    async with GracefulStop(lambda why: None, where, grace_s=1.5):\n"
        "        print('ready', flush=True)\n"
        "        await asyncio.to_thread(time.sleep, 60)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    proc.send_signal(2)
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - t0 < 5
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["agentflow: stopped (no clean stop within 2s): at step 3; last checkpoint "
                                        "step-000002"]


def test_a_workflow_without_arun_episode_fails_at_once(tmp_path):
    (tmp_path / "wf.py").write_text(_SLOW_WORKFLOW)
    out = _agentflow("train", TINY, f"workflow.name={tmp_path}/wf.py:NoEpisode", f"logging.run_dir={tmp_path}/run",
                     "trainer.batch_timeout_s=60", timeout=120)
    assert out.returncode == 2
    assert "NoEpisode, which has no arun_episode" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()  # nothing was written for a run that could not start
