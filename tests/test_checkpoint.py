"""Checkpoint directories are atomic; the prompt stream resumes exactly."""

from __future__ import annotations

import pytest

from agentflow import CheckpointError, ConfigError
from agentflow._checkpoint import Checkpointer
from agentflow._data import PromptSource


def _save(ck: Checkpointer, step: int, fail: bool = False):
    def save_model(path):
        path.mkdir(parents=True)
        (path / "weights.bin").write_bytes(b"w" * 10)
        if fail:
            raise RuntimeError("killed mid-save")

    return ck.save(step, save_model=save_model, trainer_state={"step": step}, rollout_state={"pending": [step]})


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    assert ck.latest() is None
    for step in (2, 4, 6):
        _save(ck, step)
    assert ck.latest().name == "step-000006"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000004", "step-000006"]
    trainer_state, rollout_state = ck.load(ck.latest())
    assert trainer_state == {"step": 6} and rollout_state == {"pending": [6]}


def test_a_torn_save_leaves_the_previous_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path)
    _save(ck, 2)
    with pytest.raises(CheckpointError, match=r"killed mid-save.*step-000002 is kept"):
        _save(ck, 4, fail=True)
    assert ck.latest().name == "step-000002"
    assert not (tmp_path / "checkpoints" / ".tmp-step-000004").exists()  # the partial directory is removed
    with pytest.raises(CheckpointError, match="COMPLETE"):
        ck.load(tmp_path / "checkpoints" / ".tmp-step-000004")


def test_prompt_source_resumes_where_it_stopped():
    data = [{"q": i} for i in range(5)]
    a = PromptSource(data, seed=3)
    first = [a.next()["prompt_id"] for _ in range(7)]  # crosses an epoch boundary
    state = a.state_dict()
    rest = [a.next()["prompt_id"] for _ in range(6)]
    b = PromptSource(data, seed=3)
    b.load_state_dict(state)
    assert [b.next()["prompt_id"] for _ in range(6)] == rest
    assert len(set(first[:5])) == 5 and first[5].startswith("1:")


def test_prompt_source_refuses_another_dataset():
    a = PromptSource([{"q": 1}, {"q": 2}], seed=0)
    with pytest.raises(ConfigError, match="same data configuration"):
        PromptSource([{"q": 1}], seed=0).load_state_dict(a.state_dict())
