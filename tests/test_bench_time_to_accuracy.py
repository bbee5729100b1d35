"""The time-to-accuracy benchmark's bookkeeping: settings -> overrides, metrics -> times and budgets.

Not here: running it (minutes per run; ``docs/benchmarks.md`` has the commands).
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_time_to_accuracy.py"
_spec = importlib.util.spec_from_file_location("bench_time_to_accuracy", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_settings_map_to_rollout_overrides():
    assert bench.setting_overrides("eta0") == ["rollout.max_staleness=0", "rollout.staleness_ramp=false"]
    assert bench.setting_overrides("eta2-ramp") == ["rollout.max_staleness=2", "rollout.staleness_ramp=true"]
    assert bench.setting_overrides("eta1-ds") == [
        "rollout.max_staleness=1", "rollout.staleness_ramp=false", "algo.dynamic_sampling=true"
    ]
    assert bench.setting_overrides("eta2-ramp-ds")[1:] == ["rollout.staleness_ramp=true", "algo.dynamic_sampling=true"]
    assert bench.setting_overrides("eta1-ds-b4")[2:] == ["algo.dynamic_sampling=true", "rollout.consumer_batch_size=4"]
    for bad in ("eta2-fast", "eta1-ds-fast", "ds", "etax", "eta1-b0", "eta1-b4-b2", "eta1-bx"):
        with pytest.raises(SystemExit, match=bad):
            bench.setting_overrides(bad)


def test_a_version_is_timed_when_the_step_that_made_it_finished():
    records = [
        {"step": 0, "time": 30.0, "eval/version": 0, "eval/reward": 0.06},
        *(
            {"step": v, "time": 10.0 * v, "reward/mean": 0.1, "time/step_s": 10.0, "rollout/episodes": 64}
            for v in range(1, 5)
        ),
        {"step": 2, "time": 29.0, "eval/version": 2, "eval/reward": 0.55},  # logged after its eval ran
        {"step": 4, "time": 48.0, "eval/version": 4, "eval/reward": 0.75},
    ]
    out = bench.summarize(records, targets=[0.5, 0.7, 0.9], budgets=[15.0, 40.0])
    assert [(h["version"], h["time_s"]) for h in out["heldout"]] == [(0, 0.0), (2, 20.0), (4, 40.0)]
    assert out["time_to"] == {"0.5": 20.0, "0.7": 40.0, "0.9": None}
    assert out["heldout_at"] == {"15s": 0.06, "40s": 0.75}
    assert out["episodes_trained"] == 256 and out["median_step_s"] == 10.0 and out["steps"] == 4
