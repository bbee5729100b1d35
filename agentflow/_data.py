"""A resumable prompt stream: epoch-wise shuffled, deterministic by seed, with a saved position.

Each item handed to a workflow is a shallow copy of the dataset row with one extra key,
``prompt_id`` (``"<epoch>:<index>"``), so a run can prove that no prompt was skipped or repeated.

Not here: loading or generating datasets (``agentflow.envs.tasks``), tokenisation, batching.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from agentflow.errors import ConfigError

__all__ = ["PromptSource"]


class PromptSource:
    """Iterate ``dataset`` forever, reshuffling each epoch; ``state_dict`` records the position."""

    def __init__(self, dataset: Sequence[Mapping[str, Any]], *, seed: int = 0, shuffle: bool = True) -> None:
        if len(dataset) == 0:
            raise ConfigError("the training dataset is empty; expected at least one prompt")
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.pos = 0
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> dict[str, Any]:
        if self.pos >= len(self._order):
            self.epoch += 1
            self.pos = 0
            self._order = self._order_for(self.epoch)
        idx = self._order[self.pos]
        self.pos += 1
        row = self.dataset[idx]
        if not isinstance(row, Mapping):
            raise ConfigError(f"dataset row {idx} is a {type(row).__name__}; expected a mapping (dict)")
        return {**row, "prompt_id": f"{self.epoch}:{idx}"}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "size": len(self.dataset)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["size"] != len(self.dataset) or state["seed"] != self.seed:
            raise ConfigError(
                f"checkpoint's data position is for a dataset of {state['size']} rows with seed {state['seed']}, "
                f"got {len(self.dataset)} rows with seed {self.seed}; resume with the same data configuration"
            )
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._order_for(self.epoch)
