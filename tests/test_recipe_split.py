"""How a train step's batch is split over torchrun ranks."""

from __future__ import annotations

import pytest

from agentflow import ConfigError, Trajectory
from agentflow.algo import split_by_tokens


def _traj(prompt: list[int], n_out: int, group: str) -> Trajectory:
    return Trajectory(input_ids=prompt + [7] * n_out, loss_mask=[0] * len(prompt) + [1] * n_out,
                      logprobs=[0.0] * (len(prompt) + n_out), versions=[-1] * len(prompt) + [0] * n_out,
                      reward=0.0, group_id=group)


def test_groups_stay_whole_and_loads_balance():
    items = []
    for g, (plen, outs) in enumerate([(50, [3, 4, 5, 2]), (50, [9, 9, 9, 9]), (20, [1, 1, 1, 1]), (30, [2, 2, 2, 2])]):
        prompt = [100 + g] * plen
        items += [(_traj(prompt, n, f"g{g}"), [0.0] * (plen + n)) for n in outs]
    shards = split_by_tokens(items, 2)
    groups = [{t.group_id for t, _ in shard} for shard in shards]
    assert groups[0].isdisjoint(groups[1]) and len(groups[0] | groups[1]) == 4  # no group split
    assert sum(len(s) for s in shards) == len(items)
    # loads (prompt once + continuations): g0 64, g1 86, g2 24, g3 38 -> {86, 24} vs {64, 38}
    assert sorted(groups[0]) in (["g1", "g2"], ["g0", "g3"])


def test_fewer_groups_than_ranks_splits_sequences():
    items = [(_traj([5] * 10, 2, "g0"), [0.0] * 12) for _ in range(3)]
    assert [len(s) for s in split_by_tokens(items, 3)] == [1, 1, 1]
    with pytest.raises(ConfigError, match="cannot be split"):
        split_by_tokens(items[:1], 2)
