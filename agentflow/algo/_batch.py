"""Turn a list of :class:`Trajectory` into the padded tensor batch the train engine takes.

The batch is a ``dict[str, Tensor]``: ``input_ids`` and ``attention_mask`` of shape ``[B, T]``
(right padding, ``attention_mask`` 1 on real tokens), per-token fields of shape ``[B, T]`` and
per-sequence fields of shape ``[B]``. Per-token fields are *token aligned*: entry ``t`` belongs to
token ``t`` (``logprobs[b, t]`` is the behaviour log-prob of ``input_ids[b, t]``, produced by the
model at position ``t - 1``). It does not move data to a device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from agentflow._types import Trajectory
from agentflow.errors import TrajectoryError

__all__ = ["pad_trajectories"]


def pad_trajectories(trajs: Sequence[Trajectory], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack trajectories into a right-padded batch.

    Returns ``input_ids``, ``attention_mask``, ``loss_mask``, ``logprobs`` (behaviour),
    ``versions`` (``[B, T]``) and ``rewards`` (``[B]``).

    Raises:
        TrajectoryError: on an empty list, an empty trajectory, or a loss token at position 0
            (nothing predicts the first token, so it cannot be trained on).
    """
    if not trajs:
        raise TrajectoryError("pad_trajectories needs at least one trajectory, got none")
    for i, t in enumerate(trajs):
        if len(t) == 0:
            raise TrajectoryError(f"trajectory {i} is empty; expected at least one token")
        if t.loss_mask[0]:
            raise TrajectoryError(
                f"trajectory {i} has loss_mask[0] = 1; the first token has no prediction, so it cannot "
                "be a policy token. Start every trajectory with its prompt (loss_mask 0)."
            )
    n, width = len(trajs), max(len(t) for t in trajs)
    out = {
        "input_ids": torch.full((n, width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(n, width, dtype=torch.long),
        "loss_mask": torch.zeros(n, width, dtype=torch.long),
        "logprobs": torch.zeros(n, width, dtype=torch.float32),
        "versions": torch.full((n, width), -1, dtype=torch.long),
    }
    for i, t in enumerate(trajs):
        k = len(t)
        out["input_ids"][i, :k] = torch.tensor(t.input_ids, dtype=torch.long)
        out["attention_mask"][i, :k] = 1
        out["loss_mask"][i, :k] = torch.tensor(t.loss_mask, dtype=torch.long)
        out["logprobs"][i, :k] = torch.tensor(t.logprobs, dtype=torch.float32)
        out["versions"][i, :k] = torch.tensor(t.versions, dtype=torch.long)
    out["rewards"] = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
    return out
