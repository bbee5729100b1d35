"""examples/custom_loop.py, run as a user runs it: a loop of one's own from the public API learns."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_custom_loop_example_trains_the_tiny_model():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_loop.py")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    steps = [r for r in lines if "step" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert all(r["max_staleness"] <= 1 for r in steps)  # the rollout's bound held
    assert any(r["max_staleness"] == 1 for r in steps)  # and rollout ran ahead of training
    assert lines[-2] == {"checkpoint": "step-000016"}
    summary = lines[-1]
    assert summary["reward_last"] > summary["reward_first"] + 0.3, summary
