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
        import torch

        path.mkdir(parents=True)
        _safetensors(path / "model.safetensors")
        torch.save({"optimizer": {}}, path / "agentflow_train_state.pt")

    data = {"epoch": 0, "pos": step, "seed": 0, "size": 10}
    return ck.save(step, save_model=save_model, trainer_state={"step": step, "data": data},
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
    group = {"group_id": "g", "requeues": 0, "data": {"pair": (1, 2), 3: b"\x00"}, "trajectories": []}
    state = {"buffer": {"groups": [group], "version": 2},
             "pending": [{"group_id": "h", "data": {"__tuple__": "looks like a tag"}}]}
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
# SIGTERM takes the same path as SIGINT, so it runs with -m slow (CI runs it after the default run)
@pytest.mark.parametrize("sig", ["SIGINT", pytest.param("SIGTERM", marks=pytest.mark.slow)])
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


# ------------------------------------------------------------------------------------ CLI messages (13)
@pytest.fixture
def cli(capsys):
    """Run ``agentflow.cli.main`` in-process; returns (exit code, stderr). Restores SIGTERM's handler."""
    import signal

    from agentflow.cli import main

    def run(*argv: str) -> tuple[int, str]:
        before = signal.getsignal(signal.SIGTERM)
        try:
            code = main(list(argv))
        finally:
            signal.signal(signal.SIGTERM, before)
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize(("content", "expected"), [
    ("model: [1\n", "cannot parse .* as YAML: while parsing a flow sequence"),
    ("- 1\n- 2\n", "holds a YAML list at the top level; expected a mapping"),
])
def test_bad_yaml_files_get_a_message(tmp_path, cli, content, expected):
    import re

    (tmp_path / "c.yaml").write_text(content)
    code, err = cli("train", str(tmp_path / "c.yaml"), f"logging.run_dir={tmp_path}/run")
    assert code == 2 and re.search(expected, err), err
    assert "Traceback" not in err


@pytest.mark.parametrize(("override", "expected"), [
    ("threads=-2", "threads must be >= 0"),
    ("model.tiny_hidden_size=-8", "model.tiny_hidden_size must be a positive multiple of 8"),
    ("trainer.batch_timeout_s=.inf", "trainer.batch_timeout_s must be a finite number"),
    ("workflow.options.bogus=1", "workflow.options.bogus: unknown option of workflow 'rlvr'; accepted: "),
    ("inference.backend=remote", "trainer.weight_update=mem needs the in-process engine"),
])
def test_bad_values_get_a_message_before_anything_runs(tmp_path, cli, override, expected):
    extra = ["inference.addresses=[127.0.0.1:9]"] if "remote" in override else []
    code, err = cli("train", TINY, f"logging.run_dir={tmp_path}/run", override, *extra)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_a_workflow_file_with_a_syntax_error_gets_a_message(tmp_path, cli):
    (tmp_path / "wf.py").write_text("class X(:\n")
    code, err = cli("train", TINY, f"logging.run_dir={tmp_path}/run", f"workflow.name={tmp_path}/wf.py:X")
    assert code == 2 and "has a syntax error at line 1" in err, err


def test_a_run_dir_that_is_a_file_gets_a_message(tmp_path, cli):
    (tmp_path / "file").write_text("")
    code, err = cli("train", TINY, f"logging.run_dir={tmp_path}/file")
    assert code == 2 and "is a file; expected a directory" in err, err


def test_serve_with_a_bad_model_path_gets_a_message(tmp_path, cli):
    code, err = cli("serve", "--model", str(tmp_path / "missing"))
    assert code == 2 and "agentflow serve: error:" in err and "Traceback" not in err, err


def test_bent_options_are_warned_at_start(caplog):
    from agentflow.recipe import load_recipe_config
    from agentflow.recipe._startup import warn_bent_options

    cfg = load_recipe_config([TINY], ["rollout.consumer_batch_size=16", "generation.max_new_tokens=200"])
    with caplog.at_level("WARNING"):
        warnings = warn_bent_options(cfg, n_train=10)
    assert len(warnings) == 2
    assert "larger than the 10 training prompts" in caplog.text and "outputs are cut at max_seq_len" in caplog.text
    sync = load_recipe_config([TINY], ["rollout.max_staleness=0", "rollout.min_consumer_batch_size=2"])
    assert any("min_consumer_batch_size=2 with rollout.max_staleness=0" in w for w in warn_bent_options(sync, 100))
    lagged = load_recipe_config([TINY], ["rollout.max_staleness=1", "rollout.min_consumer_batch_size=2"])
    assert warn_bent_options(lagged, 100) == []


# ------------------------------------------------------------------------------------ the run directory (9)
def test_a_run_dir_without_a_checkpoint_starts_fresh(tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")  # what a run that failed before its first checkpoint left
    code, err = cli("train", TINY, f"logging.run_dir={run}", "--resume")
    assert code == 2 and "nothing to resume" in err and "without --resume" in err, err
    assert (run / "config.json").read_text() == "{}"  # untouched by the failed start
    code, err = cli("train", TINY, f"logging.run_dir={run}", "trainer.total_steps=2", "trainer.eval_every=0")
    assert code == 0, err
    assert Checkpointer(run).latest().name == "step-000002"
    assert list(run.glob("metrics.stale-*.jsonl"))


def test_an_uncreatable_run_dir_gets_a_message(cli):
    code, err = cli("train", TINY, "logging.run_dir=/proc/agentflow-run", "trainer.total_steps=1")
    assert code == 2 and "cannot create logging.run_dir=/proc/agentflow-run" in err, err


@pytest.mark.integration
def test_resume_with_another_model_size_names_the_change_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    out = _agentflow("train", TINY, f"logging.run_dir={run}", "trainer.total_steps=2", "trainer.eval_every=0")
    assert out.returncode == 0, out.stderr[-2000:]
    config = (run / "config.json").read_text()
    out = _agentflow("train", TINY, f"logging.run_dir={run}", "trainer.total_steps=4", "model.tiny_hidden_size=32",
                     "--resume")
    assert out.returncode == 2 and "cannot resume from" in out.stderr, out.stderr[-2000:]
    assert "model.tiny_hidden_size: 64 in the checkpoint's run, 32 now" in out.stderr
    assert (run / "config.json").read_text() == config


# ------------------------------------------------------------------------------------ bad episodes (2, 4, 5)
@pytest.mark.parametrize(("fields", "expected"), [
    ({"reward": 1e300}, "within ±1e\\+09"),
    ({"reward": float("nan")}, "finite"),
    ({"logprobs": [0.0, float("nan")]}, "token 1: log-prob nan"),
    ({"logprobs": [0.0, float("-inf")]}, "token 1: log-prob -inf"),
    ({"loss_mask": [1, 1], "versions": [0, 0]}, r"loss_mask\[0\] = 1"),
])
def test_trajectories_that_would_skip_or_crash_training_are_refused_when_built(fields, expected):
    from agentflow import Trajectory, TrajectoryError

    args = {"input_ids": [1, 2], "loss_mask": [0, 1], "logprobs": [0.0, -0.5], "versions": [-1, 0], "reward": 1.0}
    with pytest.raises(TrajectoryError, match=expected):
        Trajectory(**{**args, **fields})


class _Episodes:
    """Each item's ``kind`` says what its episode does."""

    async def arun_episode(self, engine, data):
        import time

        from agentflow import Trajectory

        if data["kind"] == "exit":
            raise SystemExit(3)
        if data["kind"] == "block":
            time.sleep(0.3)  # noqa: ASYNC251  (the blocking call the guard must name)
        reward = 1e300 if data["kind"] == "huge" else 1.0
        return Trajectory([1, 2], [0, 1], [0.0, -0.5], [-1, 0], reward=reward)


async def test_bad_episodes_are_rejected_with_a_reason_and_the_loop_block_is_named(caplog):
    from agentflow import Rollout, RolloutConfig
    from agentflow._guard import guard_workflow
    from agentflow.testing import FakeEngine

    wf = guard_workflow(_Episodes(), block_warn_s=0.2)
    kinds = ["exit", "huge", "block", "ok"]
    async with FakeEngine(rollout=RolloutConfig(max_staleness=10, consumer_batch_size=1)) as engine:
        rollout = Rollout.of(engine)
        with caplog.at_level("WARNING", logger="agentflow.executor"):
            trajs = await rollout.rollout([{"kind": k} for k in kinds], wf)
    assert len(trajs) == 2  # "block" (slow but fine) and "ok"
    reasons = rollout.stats()["rejected_by_reason"]
    assert reasons == {"WorkflowError": 1, "TrajectoryError": 1}, reasons
    assert "SystemExit(3)" in caplog.text
    assert "workflow _Episodes blocked the event loop for 0.3s" in caplog.text


def _fake_trainer(**state):
    from types import SimpleNamespace

    from agentflow._trainer import Trainer, TrainerConfig, _RunState

    t = SimpleNamespace(cfg=TrainerConfig(max_skipped_steps=3), state=_RunState(**state), _vocab_size=10,
                        group_filter=None)
    t._in_vocab = lambda traj, gid: Trainer._in_vocab(t, traj, gid)
    return t, Trainer


def test_consecutive_skipped_steps_fail_the_run_with_the_reason():
    from agentflow import EngineError

    t, trainer = _fake_trainer()
    skipped = {"train/skipped": 1.0, "train/grad_norm": float("nan"), "reward/mean": 0.5}
    trainer._check_skipped(t, skipped)
    trainer._check_skipped(t, {"train/skipped": 0.0})  # a step that trained resets the count
    trainer._check_skipped(t, skipped)
    trainer._check_skipped(t, skipped)
    with pytest.raises(EngineError, match=r"3 steps in a row skipped.*grad_norm=nan.*max_skipped_steps"):
        trainer._check_skipped(t, skipped)


def test_token_ids_outside_the_vocabulary_reject_the_trajectory_not_the_run(caplog):
    from types import SimpleNamespace

    from agentflow import Trajectory
    from agentflow._buffer import Group

    t, trainer = _fake_trainer()
    good = Trajectory([1, 2], [0, 1], [0.0, -0.5], [-1, 0])
    bad = Trajectory([1, 99], [0, 1], [0.0, -0.5], [-1, 0])
    batches = [[Group("a", [bad]), Group("b", [good, bad])], [Group("c", [good])]]
    t.rollout = SimpleNamespace(config=SimpleNamespace(consumer_batch_size=2, min_consumer_batch_size=None),
                                get_groups=lambda n, timeout, **_: batches.pop(0)[:n])
    with caplog.at_level("WARNING", logger="agentflow.trainer"):
        groups = trainer._valid_groups(t, 10.0)
    assert [g.group_id for g in groups] == ["b", "c"] and groups[0].trajectories == [good]
    assert t.state.rejected_invalid == 2 and "token ids span [1, 99], expected ids in [0, 10)" in caplog.text


# ------------------------------------------------------------------------------------ agentflow serve (11)
async def _serve_client(limits=None, latency: float = 0.0):
    import httpx

    from agentflow.engines.serve._guard import ServeLimits
    from agentflow.engines.serve.server import ServerConfig, build_app
    from agentflow.testing import FakeEngine, byte_tokenizer

    engine = FakeEngine(latency=latency)
    await engine.__aenter__()
    limits = limits or ServeLimits(vocab_size=259)
    app = build_app(engine, model_path="fake", tokenizer=byte_tokenizer(), config=ServerConfig(chunk_tokens=2),
                    manage_engine=False, limits=limits)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return engine, app, client


async def test_serve_api_key_has_sglang_semantics():
    from agentflow.engines.serve._guard import ServeLimits

    engine, _, c = await _serve_client(ServeLimits(api_key="k1", admin_api_key="admin"))
    try:
        gen = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}
        r = await c.post("/generate", json=gen)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        assert (await c.post("/generate", json=gen, headers={"Authorization": "bearer k1"})).status_code == 200
        assert (await c.post("/generate", json=gen, headers={"x-api-key": "k1"})).status_code == 200
        assert (await c.get("/health")).status_code == 200  # probes need no key
        upd = {"model_path": "/elsewhere", "weight_version": "999"}
        for headers in ({}, {"Authorization": "Bearer k1"}):  # the control routes need the admin key
            r = await c.post("/update_weights_from_disk", json=upd, headers=headers)
            assert r.status_code == 401
        r = await c.post("/pause_generation", json={}, headers={"Authorization": "Bearer admin"})
        assert r.status_code == 200
    finally:
        await c.aclose()
        await engine.__aexit__(None, None, None)


def test_serve_refuses_a_public_bind_without_a_key():
    from agentflow import ConfigError
    from agentflow.engines.serve._guard import ServeLimits, check_bind

    with pytest.raises(ConfigError, match=r"non-loopback host '0\.0\.0\.0' without --api-key"):
        check_bind("0.0.0.0", ServeLimits())
    check_bind("0.0.0.0", ServeLimits(api_key="secret"))
    check_bind("127.0.0.1", ServeLimits())


@pytest.mark.parametrize(("body", "status", "expected"), [
    ({"input_ids": [1], "sampling_params": {"n": 3000}}, 400, "sampling_params.n=3000 is larger than"),
    ({"input_ids": [[1]] * 300}, 400, "would start 300 sequences"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 10**6}}, 400, "max_new_tokens=1000000 is larger"),
    ({"input_ids": [1, 100000]}, 400, "token id 100000; expected ids in [0, 259)"),
    ({"input_ids": [1], "pad": "x" * (5 << 20)}, 413, "larger than the server's limit"),
])
async def test_serve_caps_requests_with_4xx(body, status, expected):
    from agentflow.engines.serve._guard import ServeLimits

    engine, app, c = await _serve_client(ServeLimits(vocab_size=259, max_new_tokens=4096))
    try:
        r = await c.post("/generate", json=body)
        assert r.status_code == status, r.text
        assert expected in json.dumps(r.json()), r.text
        assert not app.state.server.running
    finally:
        await c.aclose()
        await engine.__aexit__(None, None, None)


@pytest.mark.integration
async def test_serve_aborts_generations_whose_client_went_away():
    import asyncio

    import httpx
    from _sglang_helpers import ServerThread

    from agentflow.engines.serve.server import ServerConfig, build_app
    from agentflow.testing import FakeEngine, byte_tokenizer

    engine = FakeEngine(latency=0.05)
    app = build_app(engine, model_path="fake", tokenizer=byte_tokenizer(), config=ServerConfig(chunk_tokens=2))
    srv = await asyncio.to_thread(ServerThread(app).start)
    try:
        body = {"input_ids": [1], "sampling_params": {"max_new_tokens": 2000, "n": 8}}
        async with httpx.AsyncClient(timeout=0.5) as c:
            with pytest.raises(httpx.TimeoutException):
                await c.post(f"http://{srv.address}/generate", json=body)
        for _ in range(100):
            if not app.state.server.running:
                break
            await asyncio.sleep(0.05)
        assert not app.state.server.running  # all 8 generations stopped with their client
    finally:
        await asyncio.to_thread(srv.stop)


# ------------------------------------------------------------------------------------ the proxy (4, 12)
@pytest.fixture
async def proxy_session():
    from agentflow.proxy import ProxyServer
    from agentflow.testing import FakeEngine, byte_tokenizer

    engine = FakeEngine()
    async with engine, ProxyServer(engine, byte_tokenizer()) as server:
        yield server.new_session()


@pytest.mark.integration
@pytest.mark.parametrize(("body", "status", "field"), [
    ({"messages": [{"role": "user", "content": "hi"}], "tools": "abc"}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": 5}, 400, "stop_token_ids"),
    ({"messages": [{"role": "user", "content": "hi"}], "self": 1}, 400, "self"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, None),
])
async def test_proxy_answers_malformed_bodies_with_a_json_4xx_naming_the_field(proxy_session, body, status, field):
    import httpx

    s = proxy_session
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{s.base_url}/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {s.api_key}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if field:
        assert repr(field) in err["message"], err


@pytest.mark.integration
@pytest.mark.parametrize("reward", [1e300, 1e308, "NaN"])
async def test_proxy_answers_a_reward_that_would_break_training_with_422(proxy_session, reward):
    import httpx

    s = proxy_session
    headers = {"Authorization": f"Bearer {s.api_key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{s.base_url}/chat/completions", headers=headers,
                            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        r = await http.post(f"{s.base_url}/sessions/{s.id}/reward", headers=headers,
                            content=f'{{"reward": {reward}}}')
    assert r.status_code == 422, r.text
    assert "within ±1e+09" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------ disk full, read-only (6)
@pytest.mark.parametrize(("errno_name", "expected"), [("ENOSPC", "the file system is full"),
                                                      ("EROFS", "the directory is not writable")])
def test_a_failed_save_says_what_ran_out_and_keeps_the_previous_checkpoint(tmp_path, errno_name, expected):
    import errno

    ck = Checkpointer(tmp_path)
    _save(ck, 2)

    def save_model(path):  # what torch's writer raises, with the OS error as its cause
        path.mkdir(parents=True)
        (path / "partial.bin").write_bytes(b"x" * 100)
        try:
            raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos") from e

    with pytest.raises(CheckpointError, match=rf"{expected}.*step-000002 is kept.*--resume"):
        ck.save(4, save_model=save_model, trainer_state={"step": 4}, rollout_state={})
    assert not list((tmp_path / "checkpoints").glob(".tmp-step-*"))
    assert ck.latest_intact().name == "step-000002"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_really_full_disk_is_named(tmp_path):
    """A 1 MiB tmpfs in a private mount namespace: the save hits ENOSPC for real."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    script = (
        "import os, subprocess, sys, pathlib\n"
        f"root = pathlib.Path({str(tmp_path / 'full')!r}); root.mkdir()\n"
        "subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(root)], check=True)\n"
        "from agentflow._checkpoint import Checkpointer\n"
        "from agentflow.errors import CheckpointError\n"
        "ck = Checkpointer(root)\n"
        "try:\n"
        "    ck.save(1, save_model=lambda p: (p.mkdir(parents=True), (p / 'w').write_bytes(b'x' * (4 << 20))),\n"
        "            trainer_state={'step': 1}, rollout_state={})\n"
        "except CheckpointError as e:\n"
        "    print(e); print(sorted(x.name for x in (root / 'checkpoints').iterdir()))\n"
    )
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0 and "mount" in out.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr[-200:]}")
    assert "the file system is full" in out.stdout, out.stdout + out.stderr
    assert out.stdout.strip().endswith("[]"), out.stdout  # the partial directory is gone


def test_a_train_state_holding_objects_is_refused_not_executed(tmp_path, monkeypatch):
    import torch

    from agentflow.engines.fsdp.engine import _load_plain

    monkeypatch.chdir(tmp_path)
    torch.save({"optimizer": _Evil()}, tmp_path / "agentflow_train_state.pt")
    with pytest.raises(CheckpointError, match="will not unpickle"):
        _load_plain(str(tmp_path / "agentflow_train_state.pt"))
    assert not (tmp_path / "PWNED").exists()


def test_a_command_a_script_backgrounded_still_stops_on_sigint():
    """A job a non-interactive shell starts with ``&`` inherits SIGINT ignored, and Python then leaves
    it ignored: ``kill -INT`` would not stop ``agentflow launch`` (its Ctrl-C is a KeyboardInterrupt).
    The CLI restores SIGINT's default handler before it runs a command."""
    import subprocess

    probe = "import signal; {}print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    seen = []
    for setup in ("", "from agentflow.cli import _sigterm_as_interrupt; _sigterm_as_interrupt(); "):
        out = subprocess.run(["bash", "-c", '"$0" -c "$1" & wait', sys.executable, probe.format(setup)],
                             capture_output=True, text=True, timeout=60)
        seen.append(out.stdout.strip())
    assert seen == ["False", "True"]  # ignored as inherited; restored by the CLI
