"""A train engine that trains nothing, for Trainer tests whose ``train_step`` is a plain function."""

from __future__ import annotations

import pathlib


class NullTrainEngine:
    def set_version(self, version: int) -> None:
        pass

    def vocab_size(self) -> None:
        return None

    def upload_weights(self, meta):
        return meta

    def save(self, meta) -> None:  # the final checkpoint
        pathlib.Path(meta.path).mkdir(parents=True, exist_ok=True)
