"""Checkpoint directories are atomic; the prompt stream resumes exactly."""

from __future__ import annotations

import json
import logging
import os
import struct

import pytest
import torch

from agentflow import CheckpointError, ConfigError
from agentflow._checkpoint import Checkpointer
from agentflow._data import PromptSource


def _trainer_state(step: int) -> dict:
    return {"step": step, "data": {"epoch": 0, "pos": step, "seed": 0, "size": 10}}


def _rollout_state(step: int) -> dict:
    traj = {
        "input_ids": [1, 2],
        "loss_mask": [0, 1],
        "logprobs": [0.0, -0.5],
        "versions": [-1, step],
        "reward": 1.0,
        "group_id": "g",
        "info": {},
    }
    group = {"group_id": "g", "data": {"q": step}, "requeues": 0, "trajectories": [traj]}
    return {"buffer": {"version": step, "groups": [group]}, "pending": [{"group_id": "h", "data": {"q": 1}}]}


def _save(ck: Checkpointer, step: int, fail: bool = False):
    def save_model(path):
        path.mkdir(parents=True)
        header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
        (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
        torch.save({"optimizer": {}}, path / "agentflow_train_state.pt")
        if fail:
            raise RuntimeError("killed mid-save")

    return ck.save(step, save_model=save_model, trainer_state=_trainer_state(step), rollout_state=_rollout_state(step))


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    assert ck.latest() is None
    for step in (2, 4, 6):
        _save(ck, step)
    assert ck.latest().name == "step-000006"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000004", "step-000006"]
    trainer_state, rollout_state = ck.load(ck.latest())
    assert trainer_state == _trainer_state(6) and rollout_state == _rollout_state(6)


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


# ---------------------------------------------------------------------------------------- wrong shapes
def _rewrite(path, name: str, change) -> None:
    """Rewrite a JSON file of a checkpoint and its manifest entry (so only the shape check sees it)."""
    data = json.loads((path / name).read_text())
    (path / name).write_text(json.dumps(change(data)))
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest[name] = (path / name).stat().st_size
    (path / "MANIFEST.json").write_text(json.dumps(manifest))


def _remove(path, rel: str) -> None:
    """Remove a file or directory of a checkpoint and its manifest entries (as if never written)."""
    import shutil

    target = path / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    manifest = json.loads((path / "MANIFEST.json").read_text())
    kept = {k: v for k, v in manifest.items() if k != rel and not k.startswith(rel + "/")}
    (path / "MANIFEST.json").write_text(json.dumps(kept))


def _drop_traj_fields(r):
    del r["buffer"]["groups"][0]["trajectories"][0]["loss_mask"]
    return r


def _bad_traj_lengths(r):
    r["buffer"]["groups"][0]["trajectories"][0]["versions"] = [-1]
    return r


def _not_a_torch_archive(path):
    import zipfile

    f = path / "model" / "agentflow_train_state.pt"
    _remove(path, "model/agentflow_train_state.pt")
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("notes.txt", "x" * 10)


WRONG_SHAPES = {
    "rollout buffer is a number": (
        lambda p: _rewrite(p, "rollout.json", lambda r: {**r, "buffer": 5}),
        r"rollout.json: buffer: expected a JSON object, got int 5",
    ),
    "trajectory without its fields": (
        lambda p: _rewrite(p, "rollout.json", _drop_traj_fields),
        r"trajectories\[0\]: missing loss_mask",
    ),
    "trajectory fields disagree": (
        lambda p: _rewrite(p, "rollout.json", _bad_traj_lengths),
        r"not a valid trajectory: Trajectory fields disagree",
    ),
    "step is a string": (
        lambda p: _rewrite(p, "trainer.json", lambda t: {**t, "step": "6"}),
        r"trainer.json: step: expected an integer >= 0, got str '6'",
    ),
    "trainer.json without data": (
        lambda p: _rewrite(p, "trainer.json", lambda t: {"step": t["step"]}),
        r"trainer.json: missing data",
    ),
    "model/ missing": (lambda p: _remove(p, "model"), r"model is missing or not a directory"),
    "train state missing": (
        lambda p: _remove(p, "model/agentflow_train_state.pt"),
        r"agentflow_train_state.pt is missing; expected the optimiser",
    ),
    "train state not a torch archive": (_not_a_torch_archive, r"not a torch.save archive"),
}


@pytest.mark.parametrize("case", sorted(WRONG_SHAPES))
def test_a_checkpoint_of_the_wrong_shape_falls_back_to_the_older_intact_one(tmp_path, caplog, case):
    damage, reason = WRONG_SHAPES[case]
    ck = Checkpointer(tmp_path, keep=3)
    _save(ck, 2)
    newest = _save(ck, 4)
    damage(newest)
    with pytest.raises(CheckpointError, match=reason):
        ck.verify(newest)
    with caplog.at_level(logging.WARNING, logger="agentflow.checkpoint"):
        assert ck.latest_intact().name == "step-000002"
    assert "skipping damaged checkpoint step-000004" in caplog.text and "expected" in caplog.text


def test_the_latest_pointer_is_not_trusted_over_a_newer_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, keep=3)
    _save(ck, 2)
    _save(ck, 4)
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step-000002")
    assert ck.latest().name == "step-000004" and ck.latest_intact().name == "step-000004"
    outside = _save(Checkpointer(tmp_path / "another-run"), 9)
    for pointer in (str(outside), os.path.relpath(outside, root)):
        (root / "latest").write_text(pointer)
        assert ck.latest() == ck.latest_intact() == root / "step-000004"


def test_pruning_keeps_the_highest_steps_not_the_last_names(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for step in (6, 999_999, 1_000_000):
        _save(ck, step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-1000000", "step-999999"]
    assert ck.latest().name == "step-1000000"


def test_a_checkpoints_file_or_step_file_is_named_as_the_problem(tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    assert "checkpoints is a file" in Checkpointer(tmp_path).problems()[0]
    other = tmp_path / "other"
    _save(Checkpointer(other), 2)
    (other / "checkpoints" / "step-000006").write_text("not a directory")
    problems = Checkpointer(other).problems()
    assert len(problems) == 1 and "step-000006 is not a directory" in problems[0]


def test_a_checkpoints_file_is_refused_at_start_with_the_reason(tmp_path):
    from agentflow.recipe import load_recipe_config
    from agentflow.recipe._startup import check_run_dir

    cfg = load_recipe_config(overrides=[f"logging.run_dir={tmp_path}"])
    (tmp_path / "checkpoints").write_text("x")
    for resume in (False, True):
        with pytest.raises(ConfigError, match=r"checkpoints is a file; expected the directory"):
            check_run_dir(cfg, resume)
    (tmp_path / "checkpoints").unlink()
    _save(Checkpointer(tmp_path), 2)
    (tmp_path / "checkpoints" / "step-000006").write_text("x")
    with pytest.raises(ConfigError, match=r"step-000006 is not a directory; expected only checkpoint directories"):
        check_run_dir(cfg, True)


def test_resuming_drops_the_metrics_of_steps_after_the_checkpoint(tmp_path):
    from agentflow.recipe import load_recipe_config
    from agentflow.recipe._startup import commit_run_dir

    lines = [json.dumps({"step": s, "loss": s}) for s in (1, 2, 3, 4, 5)] + ['{"step": 6, "lo']  # torn last line
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    commit_run_dir(load_recipe_config(overrides=[f"logging.run_dir={tmp_path}"]), resumed_step=3)
    kept = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2, 3]
