"""benchmarks/bench_core_contention.py runs its three phases on a tiny model and reports both slow-downs
(and, with ``--profile``, the costliest ops of one train step)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="pins the trainer and the generator to two different cores")
def test_it_times_training_and_generation_alone_and_side_by_side():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_core_contention.py"), "--steps", "2",
                          "--reps", "1", "--profile", "3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    profile, *lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert profile["bench"] == "core_contention_profile" and len(profile["ops"]) == 3
    own = [op["self_s"] for op in profile["ops"]]
    assert own == sorted(own, reverse=True) and 0 < sum(own) <= profile["step_s"] * 1.05
    assert all(op["op"] and op["calls"] >= 1 for op in profile["ops"])
    assert [x["phase"] for x in lines[:-1]] == ["train_alone", "both", "gen_alone"]
    assert [len(x["train_step_s"]) for x in lines[:-1]] == [2, 2, 0]
    summary = lines[-1]
    assert summary["bench"] == "core_contention_summary"
    assert summary["cores"]["generation"] != summary["cores"]["train"]
    assert summary["gen_rounds"]["alone"] > 0 and summary["gen_rounds"]["both"] > 0
    # the step times are printed rounded to the millisecond, the ratio from the unrounded ones
    alone, both = summary["train_step_alone"], summary["train_step_both"]
    slack = 5e-4 + 5e-4 * (1 + both / alone) / alone
    assert summary["train_slowdown"] == pytest.approx(both / alone, abs=slack)
    assert summary["gen_slowdown"] > 0


def test_it_says_so_with_fewer_than_two_cores():
    if not hasattr(os, "sched_getaffinity") or shutil.which("taskset") is None:
        pytest.skip("needs CPU affinity and taskset")
    first = sorted(os.sched_getaffinity(0))[0]
    out = subprocess.run(["taskset", "-c", str(first), sys.executable,
                          str(ROOT / "benchmarks" / "bench_core_contention.py"), "--steps", "1", "--reps", "1"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0
    assert "pins to 2 cores; this process may use 1" in out.stderr
