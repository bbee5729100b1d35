"""benchmarks/bench_trl.py's pieces that need neither TRL nor a model: the reward TRL trains on and
the summary. Not here: running either side (minutes; ``docs/benchmarks.md``, "Side by side with TRL")."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_trl", ROOT / "benchmarks" / "bench_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_reward_is_agentflows_exact_answer_and_a_cut_answer_earns_nothing():
    reward = _bench().exact_reward(eos_id=2, max_new_tokens=3)
    completions = [[{"role": "assistant", "content": " 11 "}], [{"role": "assistant", "content": "11"}],
                   [{"role": "assistant", "content": "12"}]]
    ids = [[5, 6, 2], [5, 6, 7], [5, 2]]  # ended, cut at the budget, ended
    assert reward(completions, answer=["11", "11", "11"], completion_ids=ids) == [1.0, 0.0, 0.0]


def test_summary_reports_the_training_clock_of_the_first_version_at_60_percent():
    run = {"setting": "trl", "command": "x", "peak_rss_gib": 1.234, "step_s": [3.0, 1.0, 2.0],
           "train_reward": [0.1, 0.2, 0.3, 0.9],
           "evals": [{"version": 0, "heldout": 0.1, "train_s": 0.0}, {"version": 1, "heldout": 0.65, "train_s": 4.0},
                     {"version": 2, "heldout": 0.7, "train_s": 6.0}]}
    summary = _bench().report(run, "1.0")[-1]
    assert summary["median_step_s"] == 2.0
    assert summary["time_to_60pct_s"] == 4.0
    assert summary["heldout"] == {"v0": 0.1, "v1": 0.65, "v2": 0.7}
    assert summary["train_reward_last3"] == round((0.2 + 0.3 + 0.9) / 3, 4)
