"""The time-to-accuracy benchmark's bookkeeping: settings -> overrides, metrics -> times and budgets.

Not here: running it (minutes per run; ``docs/benchmarks.md`` has the commands).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import time

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
    assert bench.setting_overrides("eta1-ds-min4")[2:] == [
        "algo.dynamic_sampling=true", "rollout.min_consumer_batch_size=4"
    ]
    assert bench.setting_overrides("eta1-ds-cap2")[2:] == [
        "algo.dynamic_sampling=true", "algo.ppo.behav_imp_weight_cap=2"
    ]
    assert bench.setting_overrides("eta1-beta50")[2:] == ["train.betas=[0.50,0.999]"]
    assert bench.setting_overrides("eta1-waitload")[2:] == ["trainer.overlap_weight_load=false"]
    for bad in ("eta2-fast", "eta1-ds-fast", "ds", "etax", "eta1-b0", "eta1-b4-b2", "eta1-bx", "eta1-min0",
                "eta1-min2-min3", "eta1-cap1", "eta1-cap2-cap3", "eta1-beta5", "eta1-beta500"):
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


def test_offline_evaluation_scores_the_kept_weights_and_appends_them(tmp_path, monkeypatch):
    import argparse
    import json
    import subprocess

    run_dir = tmp_path / "run"
    for v in (1, 2, 3):
        (run_dir / "weights" / f"v{v:06d}").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 3, "time": 9.0, "reward/mean": 0.5}) + "\n")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        model = cmd[cmd.index("--model") + 1] if "--model" in cmd else "base"
        score = {"base": 0.1, "v000002": 0.5, "v000003": 0.75}[pathlib.Path(model).name]
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"n": 8, "mean_reward": score}) + "\n")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = argparse.Namespace(steps=3, eval_every=2, eval_size=8, eval_samples=2, override=[], keep_checkpoints=False)
    bench.evaluate_offline("addition", 0, None, args, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["eval/version"], r["eval/reward"]) for r in records[1:]] == [(0, 0.1), (2, 0.5), (3, 0.75)]
    assert all("generation.n_samples=2" in c and "inference.local.seed=0" in c for c in calls)
    assert not (run_dir / "weights").exists()
    calls.clear()  # the evaluation sees the run's setting: an override may only be valid with it
    args.override = ["algo.dynamic_sampling_max_drop=4"]
    for v in (2, 3):
        (run_dir / "weights" / f"v{v:06d}").mkdir(parents=True)
    bench.evaluate_offline("addition", 0, None, args, run_dir, "eta1-ds")
    assert all("algo.dynamic_sampling=true" in c and "algo.dynamic_sampling_max_drop=4" in c for c in calls)

    (run_dir / "weights").mkdir()
    with pytest.raises(SystemExit, match="no weights for version 2"):
        bench.evaluate_offline("addition", 0, None, args, run_dir)


def test_offline_evaluation_reads_the_weights_dir_the_run_used_and_keeps_them_beside_it(tmp_path, monkeypatch):
    import argparse
    import json
    import subprocess

    run_dir, shm = tmp_path / "run", tmp_path / "shm" / "run"
    for v in (1, 2):
        (shm / f"v{v:06d}").mkdir(parents=True)
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"trainer": {"weights_dir": str(shm)}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "time": 9.0, "reward/mean": 0.5}) + "\n")
    models = []

    def fake_run(cmd, **kwargs):
        models.append(cmd[cmd.index("--model") + 1] if "--model" in cmd else "base")
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"n": 8, "mean_reward": 0.5}) + "\n")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = argparse.Namespace(steps=2, eval_every=2, eval_size=8, eval_samples=2, override=[], keep_checkpoints=True)
    bench.evaluate_offline("addition", 0, None, args, run_dir)
    assert models == ["base", str(shm / "v000002")]
    assert not shm.exists()  # moved out of memory, next to the run
    assert sorted(d.name for d in (run_dir / "weights").iterdir()) == ["v000001", "v000002"]


def test_the_remote_layout_publishes_through_dev_shm_under_the_run_path(tmp_path):
    out = bench._tmpfs_weights_dir(tmp_path / "runs" / "remote" / "eta0")
    if pathlib.Path("/dev/shm").is_dir():
        assert out == pathlib.Path("/dev/shm/agentflow-bench") / str(tmp_path).lstrip("/") / "runs" / "remote" / "eta0"
    else:
        assert out == tmp_path / "runs" / "remote" / "eta0" / "weights"


def test_the_keeper_links_each_evaluated_version_once_the_next_exists_and_copies_it_out_of_memory(tmp_path):
    src, dest = tmp_path / "shm", tmp_path / "run" / "weights"
    keeper = bench._Keeper(src, dest, [0, 2, 4])
    for v in (1, 2):
        (src / f"v{v:06d}").mkdir(parents=True)
        (src / f"v{v:06d}" / "model.safetensors").write_text(f"weights {v}")
    keeper._link(final=False)
    assert not keeper.held.exists()  # v2 may still be being written until v3 exists
    (src / "v000003").mkdir()
    keeper._link(final=False)
    held = keeper.held / "v000002" / "model.safetensors"
    assert held.stat().st_ino == (src / "v000002" / "model.safetensors").stat().st_ino  # a link, no copy
    assert keeper.todo == [4]
    shutil.rmtree(src / "v000002")  # the trainer prunes it: the linked files stay
    assert held.read_text() == "weights 2"
    (src / "v000004").mkdir()
    (src / "v000004" / "model.safetensors").write_text("weights 4")
    keeper.finish()  # the last version is complete once the run has ended
    assert sorted(d.name for d in dest.iterdir()) == ["v000002", "v000004"]
    assert (dest / "v000002" / "model.safetensors").read_text() == "weights 2"
    assert not keeper.held.exists()  # nothing left in memory


def test_the_keeper_copies_at_idle_priority_while_the_run_goes_on(tmp_path):
    src, dest = tmp_path / "shm", tmp_path / "run" / "weights"
    keeper = bench._Keeper(src, dest, [1])
    for v in (1, 2):
        (src / f"v{v:06d}").mkdir(parents=True)
        (src / f"v{v:06d}" / "model.safetensors").write_text(f"weights {v}")
    keeper.start()
    try:
        for _ in range(100):
            if (dest / "v000001").is_dir():
                break
            time.sleep(0.05)
        assert (dest / "v000001" / "model.safetensors").read_text() == "weights 1"
        if hasattr(os, "SCHED_IDLE"):
            assert os.sched_getscheduler(keeper._mover.native_id) == os.SCHED_IDLE
    finally:
        keeper.finish()


def test_the_keeper_fails_when_a_version_was_deleted_before_its_copy(tmp_path):
    src = tmp_path / "shm"
    (src / "v000003").mkdir(parents=True)  # v2 was pruned already
    keeper = bench._Keeper(src, tmp_path / "weights", [2])
    with pytest.raises(SystemExit, match=r"versions \[2\] were gone before they were kept"):
        keeper.finish()


def test_trainer_cores_parse_and_bad_ones_say_what_was_expected():
    import argparse

    assert bench._cores("1") == {1} and bench._cores("0,1") == {0, 1}
    for bad in ("x", "", "1,,2", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            bench._cores(bad)
