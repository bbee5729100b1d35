"""Value types: validation and trajectory builders."""

import pytest

from agentflow import ConfigError, GenerationConfig, ModelResponse, RolloutConfig, Trajectory, TrajectoryError


def _resp(versions=(0, 0, 1)):
    n = len(versions)
    return ModelResponse([1, 2], [10 + i for i in range(n)], [-0.5] * n, list(versions), "length")


def test_from_response_masks_the_prompt():
    t = Trajectory.from_response(_resp(), reward=1.0, group_id="g")
    assert t.input_ids == [1, 2, 10, 11, 12]
    assert t.loss_mask == [0, 0, 1, 1, 1]
    assert t.versions == [-1, -1, 0, 0, 1]
    assert t.logprobs == [0.0, 0.0, -0.5, -0.5, -0.5]
    assert t.min_version == 0 and t.n_policy_tokens == 3


def test_extend_appends_masked_tool_tokens_then_a_new_turn():
    t = Trajectory.from_response(_resp()).extend([7, 8], _resp(versions=(2,)))
    assert t.loss_mask == [0, 0, 1, 1, 1, 0, 0, 1]
    assert t.versions[-3:] == [-1, -1, 2]


def test_concat_joins_turns():
    a = Trajectory.from_response(_resp(), reward=0.0)
    b = Trajectory.from_response(_resp(), reward=1.0)
    c = Trajectory.concat([a, b])
    assert len(c) == len(a) + len(b) and c.reward == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(input_ids=[1, 2], loss_mask=[0], logprobs=[0.0, 0.0], versions=[-1, -1]),
        dict(input_ids=[1], loss_mask=[1], logprobs=[0.0], versions=[-1]),  # policy token without version
        dict(input_ids=[1], loss_mask=[0], logprobs=[0.0], versions=[3]),  # masked token with a version
        dict(input_ids=[1], loss_mask=[2], logprobs=[0.0], versions=[-1]),
        dict(input_ids=[1], loss_mask=[0], logprobs=[0.0], versions=[-1], reward=float("nan")),
    ],
)
def test_inconsistent_trajectories_are_rejected(kwargs):
    with pytest.raises(TrajectoryError):
        Trajectory(**kwargs)


def test_response_lengths_must_agree():
    with pytest.raises(TrajectoryError, match="output_logprobs"):
        ModelResponse([1], [1, 2], [0.0], [0, 0])


def test_generation_config_reports_every_problem():
    with pytest.raises(ConfigError) as e:
        GenerationConfig(n_samples=0, max_new_tokens=0, temperature=-1, top_p=0)
    assert len(e.value.problems) == 4


def test_rollout_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        RolloutConfig(max_staleness=-1, max_concurrent=0, stale_policy="yolo", episode_timeout_s=0,
                      max_consecutive_rejections=0)
    text = str(e.value)
    assert len(e.value.problems) == 5
    for name in ("max_staleness", "max_concurrent", "stale_policy", "episode_timeout_s", "max_consecutive_rejections"):
        assert name in text
    assert RolloutConfig(max_consecutive_rejections=None).max_consecutive_rejections is None
