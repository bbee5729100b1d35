"""``agentflow launch``: placement, servers and trainer ranks on a simulated multi-node Ray cluster.

The cluster is ``ray.cluster_utils.Cluster`` with two nodes of 2 CPUs and 2 logical GPUs each (no
GPU is used: ranks train on CPU with gloo). The launcher runs as the CLI, connected through
``RAY_ADDRESS``; the test process joins the same cluster to kill actors and to hold resources.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from agentflow._metrics import read_metrics
from agentflow.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")
QUIET_SERVER = ("launch.server_command=agentflow serve --model {model} --host {host} --port {port} "
                "--api-key {api_key} --log-level warning")


# ------------------------------------------------------------------------------ without Ray
def _node(ip: str, gpus: float) -> dict:
    return {"Alive": True, "NodeManagerAddress": ip, "Resources": {"GPU": gpus, "CPU": 2.0}}


def test_a_placement_that_can_never_fit_names_what_was_asked_and_what_the_cluster_has():
    from agentflow.recipe._placement import check_fits, plan
    from agentflow.recipe.config import LaunchSpec

    nodes = [_node("10.0.0.1", 2), _node("10.0.0.2", 2)]
    check_fits(plan(LaunchSpec(servers=2, nodes=2), "GPU"), {"GPU": 4.0}, nodes)  # fits exactly
    with pytest.raises(ConfigError) as e:
        check_fits(plan(LaunchSpec(servers=2, gpus_per_server=2, nodes=1, ranks_per_node=2), "GPU"), {"GPU": 4.0},
                   nodes)
    msg = str(e.value)
    assert "2 servers bundle(s) x 2 GPU + 1 trainer bundle(s) x 2 GPU = 6 GPU" in msg
    assert "the cluster has 4 GPU on 2 node(s) (10.0.0.1: 2, 10.0.0.2: 2)" in msg and "more GPUs than" in msg
    with pytest.raises(ConfigError, match="a servers bundle needs 4 GPU on one node, and no node has that many"):
        check_fits(plan(LaunchSpec(servers=1, gpus_per_server=4, nodes=0 + 1, ranks_per_node=0 + 1), "GPU"),
                   {"GPU": 8.0}, [_node("a", 2)] * 4)
    with pytest.raises(ConfigError, match="3 trainer nodes with 1 GPU each, and only 2 node"):
        check_fits(plan(LaunchSpec(servers=1, nodes=3), "GPU"), {"GPU": 8.0}, [_node("a", 4), _node("b", 4)])


def test_a_restart_the_pool_saw_before_the_launcher_did_is_still_reported(caplog):
    """The ranks can finish (the trainer's pool rejoined a restarted server) before the server's
    actor confirms its start; the launcher waits briefly for that answer instead of dropping it."""
    import logging
    import types

    from agentflow.recipe.launch import _Job, _Server

    class FakeRay:
        exceptions = types.SimpleNamespace(RayError=RuntimeError)

        def wait(self, refs, timeout=None):
            return [r for r in refs if r != "slow"], [r for r in refs if r == "slow"]

        def get(self, ref):
            return {"fast": "10.0.0.1:31000"}[ref]

    job = object.__new__(_Job)
    job.ray, job.servers = FakeRay(), [_Server(0, address="10.0.0.1:31000"), _Server(1, address="10.0.0.2:31001")]
    waiting = {"fast": ("started", 0), "slow": ("started", 1), "watch": ("server", 0)}
    with caplog.at_level(logging.INFO, logger="agentflow"):
        job._confirm_restarts(waiting)
    assert "server-0 is back on 10.0.0.1:31000" in caplog.text
    assert "server-1 was still restarting when the run ended" in caplog.text
    assert "fast" not in waiting and "slow" in waiting  # what is left is settled at teardown


def test_the_server_command_fills_its_placeholders_and_runs_agentflow_with_this_python():
    from agentflow.recipe._actors import server_argv

    argv = server_argv("agentflow serve --model {model} --port {port} --api-key {api_key}", model="/m dir",
                       port=31000, host="h", gpus=1, api_key="k")
    assert argv == ([sys.executable, "-m", "agentflow", "serve", "--model", "/m dir", "--port", "31000",
                     "--api-key", "k"], {})
    sglang, _ = server_argv("python -m sglang.launch_server --model-path {model} --tp {gpus} --port {port}",
                            model="m", port=1, host="h", gpus=2, api_key="k")
    assert sglang[:3] == ["python", "-m", "sglang.launch_server"] and sglang[-3:] == ["2", "--port", "1"]
    vllm = server_argv("VLLM_SERVER_DEV_MODE=1 vllm serve {model} --host {host} --port {port} -tp {gpus}",
                       model="m", port=1, host="h", gpus=4, api_key="k")
    assert vllm == (["vllm", "serve", "m", "--host", "h", "--port", "1", "-tp", "4"], {"VLLM_SERVER_DEV_MODE": "1"})
    with pytest.raises(ConfigError, match=r"bad placeholder .*'modle'"):
        server_argv("agentflow serve --model {modle} --port {port}", model="m", port=1, host="h", gpus=1, api_key="")


def test_a_generated_server_key_never_reads_as_an_option(monkeypatch):
    """token_urlsafe can start with '-': ``--api-key -x...`` made ``agentflow serve`` exit with "expected
    one argument" (1 in 64 launches, seen in CI). The launcher's own key starts with a letter."""
    import secrets

    from agentflow.recipe._actors import server_argv
    from agentflow.recipe.launch import _Job, load_launch_config
    from engines.serve.server import _parse_args

    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: "-leading-dash")
    cfg = load_launch_config([TINY], ["launch.servers=1"])
    key = _Job(None, cfg, "CPU").key
    argv, _ = server_argv(cfg.launch.server_command, model="m", port=1, host="h", gpus=1, api_key=key)
    assert _parse_args(argv[4:]).api_key == key == "af--leading-dash"


def test_the_launch_config_uses_the_launched_servers_and_checks_its_section():
    from agentflow.recipe.launch import load_launch_config

    cfg = load_launch_config([TINY], ["launch.servers=2"])
    assert cfg.inference.backend == "remote" and cfg.trainer.weight_update == "disk" and cfg.launch.servers == 2
    assert load_launch_config([TINY], ["trainer.weight_update=nccl"]).trainer.weight_update == "nccl"
    with pytest.raises(ConfigError) as e:
        load_launch_config([TINY], ["launch.servers=0", "launch.placement_timeout_s=-1",
                                    "launch.server_command=agentflow serve"])
    assert len(e.value.problems) == 3 and "launch.servers must be >= 1, got 0" in str(e.value)


class _Ref:
    def __init__(self, name: str, ready_after: int) -> None:
        self.name, self.ready_after = name, ready_after

    def hex(self) -> str:
        return self.name


class _FakeRay:
    """Ray's ``wait``/``get`` over refs that become ready after a number of ``wait`` calls."""

    class exceptions:  # mirrors ray.exceptions
        class GetTimeoutError(TimeoutError):
            pass

    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, refs, num_returns, timeout):
        self.waits.append(timeout)
        ready = [r for r in refs if r.ready_after <= len(self.waits)]
        return ready, [r for r in refs if r not in ready]

    def get(self, refs):
        return [r.name for r in refs]


def test_waits_on_ray_come_in_one_second_slices_so_ctrl_c_gets_through():
    from agentflow.recipe._placement import get_within

    ray = _FakeRay()
    assert get_within(ray, [_Ref("a", 1), _Ref("b", 3)], 30.0) == ["a", "b"]
    assert ray.waits == [1.0, 1.0, 1.0]  # never one long wait that would hold off SIGINT
    with pytest.raises(_FakeRay.exceptions.GetTimeoutError):
        get_within(_FakeRay(), [_Ref("never", 10**9)], 0.05)


# ------------------------------------------------------------------------------ on a Ray cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(RAY_ADDRESS, tiny model dir): 2 simulated nodes x (2 CPUs, 2 logical GPUs); this process joined."""
    ray = pytest.importorskip("ray", reason="agentflow launch needs Ray: pip install 'agentflow-rl[ray]'")
    from ray.cluster_utils import Cluster

    from agentflow.testing import tiny_model_and_tokenizer

    model_dir = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_model_and_tokenizer(0)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=c.address, namespace="agentflow", log_to_driver=False)
    try:
        yield c.address, str(model_dir)
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def launch_cli(cluster):
    """Start ``agentflow launch ARGS`` against the cluster; a launch still running at teardown is stopped."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        env = {**os.environ, "RAY_ADDRESS": cluster[0], "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "agentflow", "launch", *args], cwd=ROOT, env=env,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)  # the launcher stops its actors
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
        elif p.stdout is not None:
            p.stdout.close()


def _finish(proc: subprocess.Popen[str], timeout: float = 400) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"agentflow launch did not finish in {timeout} s:\n{out[-4000:]}") from None
    return out


def _steps(run_dir: pathlib.Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "reward/mean" in r}


def _until_step(run: pathlib.Path, step: int, proc: subprocess.Popen[str], deadline_s: float = 300) -> None:
    end = time.monotonic() + deadline_s
    while step not in _steps(run) if (run / "metrics.jsonl").exists() else True:
        assert proc.poll() is None, f"the launch ended before step {step}:\n{proc.communicate()[0][-4000:]}"
        assert time.monotonic() < end, f"no step {step} within {deadline_s} s"
        time.sleep(0.5)  # another process writes the metrics


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_asking_for_more_gpus_than_the_cluster_has_fails_within_60s_naming_the_numbers(cluster, launch_cli, tmp_path):
    _, model = cluster
    t0 = time.monotonic()
    proc = launch_cli(TINY, f"model.path={model}", "launch.servers=2", "launch.gpus_per_server=2",
                   "launch.ranks_per_node=2", f"logging.run_dir={tmp_path / 'run'}")
    out = _finish(proc, timeout=90)
    assert proc.returncode == 2 and time.monotonic() - t0 < 60, out[-3000:]
    assert "asks for 2 servers bundle(s) x 2 GPU + 1 trainer bundle(s) x 2 GPU = 6 GPU" in out
    assert "the cluster has 4 GPU on 2 node(s)" in out and not (tmp_path / "run").exists()


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_a_busy_cluster_fails_at_the_placement_timeout_naming_what_is_free(cluster, launch_cli, tmp_path):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    _, model = cluster
    held = placement_group([{"GPU": 2.0}], strategy="PACK")  # another job holds one node's GPUs
    ray.get(held.ready(), timeout=30)
    try:
        t0 = time.monotonic()
        proc = launch_cli(TINY, f"model.path={model}", "launch.servers=2", "launch.ranks_per_node=2",
                       "launch.placement_timeout_s=3", f"logging.run_dir={tmp_path / 'run'}")
        out = _finish(proc, timeout=90)
    finally:
        remove_placement_group(held)
    assert proc.returncode == 2 and time.monotonic() - t0 < 60, out[-3000:]
    # the trainer took the free node; nothing is left for the servers
    assert "could not place the servers within " in out and "s (launch.placement_timeout_s)" in out, out[-3000:]
    assert "asks for 2 servers bundle(s) x 1 GPU = 2 GPU (PACK); 0 GPU are free now (this launch holds 1 trainer " \
           "bundle(s) x 2 GPU = 2 GPU already) of 4" in out


@pytest.mark.slow  # the default run stays under 10 minutes; CI runs -m slow after it
@pytest.mark.integration
@pytest.mark.timeout(400)
def test_two_servers_and_two_gloo_ranks_train_with_weights_broadcast(cluster, launch_cli, tmp_path):
    """2 `agentflow serve` servers and 2 trainer ranks on distinct nodes; trainer.weight_update=nccl
    (a gloo group on CPU: the same routes and calls as NCCL on GPUs)."""
    _, model = cluster
    run = tmp_path / "run"
    proc = launch_cli(TINY, f"model.path={model}", "launch.servers=2", "launch.nodes=2", QUIET_SERVER,
                   "trainer.weight_update=nccl", "inference.dist_backend=gloo", "trainer.total_steps=3",
                   "trainer.eval_every=0", f"logging.run_dir={run}")
    out = _finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert sorted(_steps(run)) == [1, 2, 3] and all(r["train/n_seqs"] == 8 for r in _steps(run).values())
    assert "(server-0 pid=" in out and "(server-1 pid=" in out and "(rank-1 pid=" in out  # every actor's log
    assert "trained 3 steps" in out and "launched 2 trainer rank(s) and 2 server(s) (0 server restart(s))" in out
    assert "2 trainer bundle(s) x 1 GPU (STRICT_SPREAD)" in out


@pytest.mark.slow  # the default run stays under 10 minutes; CI runs -m slow after it
@pytest.mark.integration
@pytest.mark.timeout(400)
def test_killed_server_actors_are_restarted_rejoin_and_no_episode_is_lost(cluster, launch_cli, tmp_path):
    """Both servers are killed after step 2, so the run cannot finish unless the launcher restarts
    them and the trainer's pool rejoins them with the current weights (a run on the tiny model is
    faster than a server's start, so with one server left it would finish before the rejoin). The
    first server back can finish the run before the second is up: that one is reported as still
    restarting, never silently forgotten."""
    import ray

    _, model = cluster
    run = tmp_path / "run"
    proc = launch_cli(TINY, f"model.path={model}", "launch.servers=2", "launch.nodes=2", QUIET_SERVER,
                   "trainer.total_steps=6", "trainer.eval_every=0", f"logging.run_dir={run}", "-v")
    _until_step(run, 2, proc)
    for name in ("server-0", "server-1"):
        ray.kill(ray.get_actor(name, namespace="agentflow"))
    out = _finish(proc)
    assert proc.returncode == 0, out[-4000:]
    back = [i for i in (0, 1) if f"server-{i} is back on" in out]
    assert back, out[-4000:]
    for i in (0, 1):
        assert f"server-{i} on " in out, out[-4000:]
        assert (i in back) != (f"server-{i} was still restarting when the run ended" in out), out[-4000:]
    assert "died (The actor is dead because it was killed by `ray.kill`.); restarting it (1/3)" in out
    assert out.count("is healthy again; it rejoins") >= 1, out[-4000:]  # the pool re-applies the last weights
    assert "(2 server restart(s))" in out
    records = _steps(run)
    assert sorted(records) == list(range(1, 7))
    assert all(r["rollout/rejected"] == 0 for r in records.values())  # every episode handed out came back
    assert all(r["train/n_seqs"] == 8 for r in records.values())


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_a_dead_trainer_rank_stops_the_job_naming_the_rank_and_how_to_resume(cluster, launch_cli, tmp_path):
    import ray

    _, model = cluster
    run = tmp_path / "run"
    proc = launch_cli(TINY, f"model.path={model}", "launch.servers=1", "launch.ranks_per_node=2", QUIET_SERVER,
                   "trainer.total_steps=200", "trainer.checkpoint_every=1", "trainer.eval_every=0",
                   "trainer.stop_grace_s=5", f"logging.run_dir={run}")
    _until_step(run, 2, proc)
    ray.kill(ray.get_actor("rank-1", namespace="agentflow"))
    t0 = time.monotonic()
    out = _finish(proc, timeout=120)
    assert proc.returncode == 2, out[-4000:]
    assert "trainer rank 1 died" in out and "the job was stopped" in out and "--resume" in out, out[-3000:]
    assert time.monotonic() - t0 < 60
    with pytest.raises(ValueError):  # every actor is gone
        ray.get_actor("rank-0", namespace="agentflow")


@pytest.mark.slow  # the default run stays under 10 minutes; CI runs -m slow after it
@pytest.mark.integration
@pytest.mark.timeout(400)
def test_ctrl_c_stops_every_actor_and_resume_continues_through_the_launcher(cluster, launch_cli, tmp_path):
    import ray

    _, model = cluster
    run = tmp_path / "run"
    args = [TINY, f"model.path={model}", "launch.servers=1", QUIET_SERVER, "trainer.checkpoint_every=1",
            "trainer.eval_every=0", "trainer.stop_grace_s=10", f"logging.run_dir={run}"]
    proc = launch_cli(*args, "trainer.total_steps=200")
    _until_step(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    out = _finish(proc, timeout=120)
    assert proc.returncode == 130 and time.monotonic() - t0 < 40, out[-3000:]
    assert "agentflow launch: interrupted by SIGINT: stopped every rank and server" in out
    with pytest.raises(ValueError):
        ray.get_actor("server-0", namespace="agentflow")
    done = max(_steps(run))
    proc = launch_cli(*args, f"trainer.total_steps={done + 1}", "--resume")
    out = _finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert max(_steps(run)) == done + 1


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_ctrl_c_while_the_servers_start_stops_the_launch_at_once(cluster, launch_cli, tmp_path):
    import ray

    _, model = cluster
    never_healthy = f"launch.server_command={sys.executable} -c 'import time; time.sleep(600)' {{port}}"
    proc = launch_cli(TINY, f"model.path={model}", "launch.servers=1", never_healthy,
                      f"logging.run_dir={tmp_path / 'run'}")
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # the launcher's "placed:" line: it now waits for the server's /health
        seen.append(line)
        if "agentflow.launch: placed:" in line:
            break
    else:
        raise AssertionError("".join(seen[-40:]))
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    out = _finish(proc, timeout=90)
    assert proc.returncode == 130 and time.monotonic() - t0 < 30, out[-3000:]
    assert "interrupted by SIGINT: stopped every rank and server" in out
    with pytest.raises(ValueError):
        ray.get_actor("server-0", namespace="agentflow")


@pytest.mark.parametrize("protocol", ["sglang", "vllm"])
def test_servers_a_run_starts_sample_with_distinct_seeds(monkeypatch, tmp_path, protocol):
    """Server i of ``inference.launch`` gets seed ``inference.local.seed + i``: servers sharing a
    group with one seed would draw the same samples."""
    import contextlib

    import agentflow.engines.launch as launch_mod
    from agentflow.recipe.build import launched_servers
    from agentflow.recipe.config import load_recipe_config

    seen: list = []

    @contextlib.contextmanager
    def fake_launched(commands, log_dir):
        seen.extend(commands)
        yield []

    monkeypatch.setattr(launch_mod, "launched", fake_launched)
    cfg = load_recipe_config([TINY], ["inference.backend=remote", f"inference.protocol={protocol}",
                                      f"inference.launch={sys.executable}", "inference.local.seed=5",
                                      "trainer.weight_update=disk", "model.path=smollm2-135m"])
    monkeypatch.setattr("agentflow.recipe.build._served_model_dir", lambda *a: "model-dir")
    with launched_servers(cfg, "smollm2-135m", None, None, tmp_path, ["127.0.0.1:1", "127.0.0.1:2"]):
        pass
    flag = "--random-seed" if protocol == "sglang" else "--seed"
    assert [c.argv[c.argv.index(flag) + 1] for c in seen] == ["5", "6"]
