"""benchmarks/gpu_check.py: a clean exit without CUDA, and every step runs on CPU (--cpu-smoke)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def _steps(out: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["step"]: r for r in lines}


def test_without_cuda_it_says_why_and_exits_zero():
    done = _run(timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device is visible" in done.stderr and "--cpu-smoke" in done.stderr
    assert "Traceback" not in done.stderr
    assert _steps(done.stdout) == {"gpu_check": {"step": "gpu_check", "ok": True, "skipped": "no CUDA device"}}


def test_cpu_smoke_runs_every_step():
    done = _run("--cpu-smoke", "--world", "1", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = _steps(done.stdout)
    for name in ("env", "generate", "local_engine", "fsdp_world1", "packed_vs_reference", "weight_handoff"):
        assert steps[name]["ok"], steps[name]
    assert steps["fsdp_world2"].get("skipped")
    assert steps["packed_vs_reference"]["max_abs_diff"] < 1e-3
    assert steps["summary"] == {**steps["summary"], "ok": True, "failed": []}


@pytest.mark.slow
def test_cpu_smoke_with_two_processes_matches_one():
    done = _run("--cpu-smoke", "--world", "2", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    w2 = _steps(done.stdout)["fsdp_world2"]
    assert w2["ok"] and w2["loss_diff_vs_world1"] < 1e-4
