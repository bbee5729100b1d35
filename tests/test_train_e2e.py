"""`agentflow train` end to end on the tiny model: async (eta = 2), staleness bounded, lossless resume."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from agentflow._data import PromptSource
from agentflow._metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")


def _agentflow(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "agentflow", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kw)


def _steps(run_dir: pathlib.Path) -> dict[int, dict]:
    """The last record of every train step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r for r in read_metrics(run_dir) if "reward/mean" in r}


def test_train_tiny_async_keeps_staleness_bounded(tmp_path):
    run = tmp_path / "run"
    out = _agentflow("train", TINY, f"logging.run_dir={run}", "trainer.total_steps=6", "logging.trace=true",
                     timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = _steps(run)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    eta = 2
    assert all(r["staleness/max"] <= eta for r in steps.values()), [r["staleness/max"] for r in steps.values()]
    # `agentflow trace` reads the run's timeline: the same steps, none trained on data staler than eta.
    assert json.loads((run / "trace.json").read_text())[-1]["name"] == "end"
    out = _agentflow("trace", str(run), "--json", timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    trace = json.loads(out.stdout)
    assert [s["step"] for s in trace["steps"]] == [1, 2, 3, 4, 5, 6]
    assert all(0 <= int(lag) <= eta for s in trace["steps"] for lag in s["lags"])
    assert trace["episodes"]["buffered"] >= 6 * 4
    assert [e["version"] for e in trace["evaluations"]] == [0, 3, 6]  # the held-out evaluations, timed
    evals = [r for r in read_metrics(run) if "eval/reward" in r]
    assert [e["eval/version"] for e in evals] == [0, 3, 6]
    assert (run / "checkpoints" / "latest").read_text() == "step-000006"
    # `agentflow plot` turns the run into a PNG.
    out = _agentflow("plot", str(run), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run / "curves.png").stat().st_size > 10_000
    # `agentflow eval` scores the final checkpoint on held-out prompts.
    out = _agentflow("eval", TINY, "--model", str(run / "checkpoints" / "step-000006"), "--n", "4", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 4 and 0.0 <= result["mean_reward"] <= 1.0


def _prompt_stream(n: int) -> list[str]:
    """The first n prompt ids the tiny config's PromptSource hands out (size 400, seed 0)."""
    src = PromptSource([{"i": i} for i in range(400)], seed=0)
    return [src.next()["prompt_id"] for _ in range(n)]


@pytest.mark.integration
def test_sigkill_then_resume_skips_and_repeats_no_prompt(tmp_path):
    run = tmp_path / "run"
    args = ["train", TINY, f"logging.run_dir={run}", "trainer.total_steps=8", "trainer.checkpoint_every=2",
            "trainer.eval_every=0", "logging.trace=true"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agentflow", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not (run / "checkpoints" / "step-000004" / "COMPLETE").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step 4 within 240 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
    out = _agentflow(*args, "--resume", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    steps = _steps(run)
    assert sorted(steps) == list(range(1, 9))
    consumed = [p for s in sorted(steps) for p in steps[s]["prompts"]]
    assert len(consumed) == len(set(consumed)), "a prompt was trained on twice"
    final = run / "checkpoints" / "step-000008"
    trainer_state = json.loads((final / "trainer.json").read_text())
    rollout = json.loads((final / "rollout.json").read_text())
    in_flight = [g["data"]["prompt_id"] for g in rollout["buffer"]["groups"]]
    in_flight += [p["data"]["prompt_id"] for p in rollout["pending"]]
    handed_out = _prompt_stream(trainer_state["data"]["pos"])
    # Every prompt handed out is trained on, buffered or in flight: none skipped, none twice.
    assert sorted(consumed + in_flight) == sorted(handed_out)
    # The killed run's timeline stays readable (no closing bracket); the resumed run wrote its own.
    from agentflow._trace import read_trace
    killed = [e for e in read_trace(run / "trace.json") if e["name"] == "take"]
    assert len(killed) >= 4 and not (run / "trace.json").read_text().rstrip().endswith("]")
    resumed = [e["args"]["step"] for e in json.loads((run / "trace-2.json").read_text()) if e["name"] == "take"]
    assert resumed == list(range(resumed[0], 9)) and resumed[0] - 1 in (4, 6)  # from the last checkpoint


@pytest.mark.integration
@pytest.mark.parametrize("written_behind", [False, True])
def test_torchrun_two_ranks_train_together(tmp_path, written_behind):
    """Rollout on rank 0, each step's batch split over 2 gloo ranks by token count. Written behind:
    every rank joins each version's gather, then rank 0 writes it while both train on."""
    run, published = tmp_path / "run", tmp_path / "published"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    behind = ["trainer.weight_update=disk", f"trainer.weights_dir={published}", "trainer.overlap_weight_load=true"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "agentflow", "train",
           TINY, f"logging.run_dir={run}", "trainer.total_steps=3", "trainer.eval_every=0",
           *(behind if written_behind else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = _steps(run)
    assert sorted(steps) == [1, 2, 3]
    # 4 prompts x 2 samples per step, counted over both ranks.
    assert all(r["train/n_seqs"] == 8 for r in steps.values())
    assert (run / "checkpoints" / "step-000002" / "COMPLETE").exists()
    if written_behind:
        assert sorted(d.name for d in published.iterdir()) == ["v000003"]
        assert (published / "v000003" / "model.safetensors").stat().st_size > 0


@pytest.mark.parametrize("eta", [0, 1])
def test_disk_versions_load_while_the_next_step_trains_and_staleness_stays_bounded(tmp_path, eta):
    """``trainer.overlap_weight_load=true``: the trainer goes on once a version is written;
    staleness is still counted against the trainer's version, every version is loaded in order
    and the run ends with the last one loaded and the older ones deleted."""
    run, published = tmp_path / "run", tmp_path / "published"
    out = _agentflow("train", TINY, f"logging.run_dir={run}", "trainer.total_steps=4", "trainer.eval_every=0",
                     "trainer.weight_update=disk", f"trainer.weights_dir={published}", f"rollout.max_staleness={eta}",
                     "trainer.overlap_weight_load=true", "logging.trace=true", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = _steps(run)
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(r["staleness/max"] <= eta for r in steps.values()), [r["staleness/max"] for r in steps.values()]
    trace = json.loads(_agentflow("trace", str(run), "--json", timeout=60).stdout)
    assert all(0 <= int(lag) <= eta for s in trace["steps"] for lag in s["lags"]), trace["steps"]
    assert sorted(d.name for d in published.iterdir()) == ["v000004"]


@pytest.mark.integration
@pytest.mark.parametrize("weight_update", ["disk", "nccl"])
def test_train_against_agentflow_serve_over_http(tmp_path, weight_update):
    """The remote path for real: `agentflow serve` on loopback, weights shipped through disk, or
    broadcast over a gloo group (the nccl path on CPU: the same group, routes and calls)."""
    import socket

    import httpx

    from agentflow.engines.serve._launch import wait_healthy
    from agentflow.testing import tiny_model_and_tokenizer

    model_dir = tmp_path / "tiny"
    model, tok = tiny_model_and_tokenizer(0)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "agentflow", "serve", "--model", str(model_dir),
                               "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_healthy(server, f"http://127.0.0.1:{port}/health", 120, "agentflow serve")
        run, published = tmp_path / "run", tmp_path / "published"  # disk versions outside the run directory
        args = ["train", TINY, f"model.path={model_dir}", "inference.backend=remote",
                f"inference.addresses=[127.0.0.1:{port}]", f"trainer.weight_update={weight_update}",
                f"trainer.weights_dir={published}", "trainer.eval_every=0", "trainer.total_steps=3",
                f"logging.run_dir={run}"]
        out = _agentflow(*args, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert sorted(_steps(run)) == [1, 2, 3]
        info = httpx.get(f"http://127.0.0.1:{port}/get_model_info", timeout=5).json()
        assert info["weight_version"] == "3"  # the server holds the trainer's latest weights
        assert not (run / "weights").exists()
        assert published.exists() == (weight_update == "disk")  # a broadcast writes nothing
        if weight_update == "disk":  # older versions deleted once loaded (trainer.keep_weight_versions=1)
            assert sorted(d.name for d in published.iterdir()) == ["v000003"]
        if weight_update == "nccl":  # a resumed run joins a new group and sends its weights before rolling out
            out = _agentflow(*args[:-2], "trainer.total_steps=4", args[-1], "--resume", timeout=300)
            assert out.returncode == 0, out.stderr[-3000:]
            assert sorted(_steps(run)) == [1, 2, 3, 4]
            assert httpx.get(f"http://127.0.0.1:{port}/get_model_info", timeout=5).json()["weight_version"] == "4"
    finally:
        server.terminate()
        server.wait(30)


def _launch_run(tmp_path: pathlib.Path, protocol: str, python: str, *extra: str) -> pathlib.Path:
    """`agentflow train` that starts its own server (inference.launch), 2 steps on the tiny model."""
    import httpx

    run = tmp_path / "run"
    out = _agentflow("train", TINY, "inference.backend=remote", f"inference.protocol={protocol}",
                     f"inference.launch={python}", "trainer.weight_update=disk", "trainer.eval_every=0",
                     "trainer.total_steps=2", "trainer.checkpoint_every=0", f"logging.run_dir={run}", *extra,
                     timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(_steps(run)) == [1, 2]
    [log] = (run / "servers").glob("*.log")
    port = int(log.stem.rsplit("-", 1)[1])
    with pytest.raises(httpx.ConnectError):  # stopped with the run
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    return log


@pytest.mark.integration
def test_train_starts_agentflow_serve_itself_and_stops_it(tmp_path):
    log = _launch_run(tmp_path, "sglang", sys.executable)
    assert log.name.startswith("agentflow-serve-")


@pytest.mark.slow  # the default run stays under 10 minutes; CI runs -m slow after it
@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_train_with_lora_starts_a_vllm_server_itself_and_stops_it(tmp_path):
    """The trainer's adapter directories load in vLLM (one served name per version)."""
    from _vllm_helpers import BUILD, vllm_python

    python = vllm_python()
    if python is None:
        pytest.skip(f"needs a vLLM venv: {BUILD}")
    # head size 64: vLLM's CPU attention does not take the tiny model's default 16
    log = _launch_run(tmp_path, "vllm", python, "model.tiny_hidden_size=256", "train.lora.rank=8")
    text = log.read_text()
    assert text.count('"POST /v1/load_lora_adapter HTTP/1.1" 200') == 2  # versions 1 and 2
    assert text.count('"POST /v1/unload_lora_adapter HTTP/1.1" 200') == 1  # version 1's name
