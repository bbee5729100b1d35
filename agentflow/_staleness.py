"""Admission control that bounds how off-policy a trajectory may be.

Let B be the items (prompts) the trainer consumes per step, eta the maximum staleness, v the
current policy version (train steps done). An item that starts at version v must be trained on by
version v + eta at the latest, so at most ``(eta + v + 1) * B`` items may have been admitted in
total (AReaL, arXiv:2505.24298, section 5). This module is that formula and its counters; the
executor decides when to call it. It holds no locks: it lives on the event loop's thread.

Not here: running episodes (the executor), consume-time checks of token versions (the buffer).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["StalenessManager", "StalenessStats", "staleness_capacity"]


def staleness_capacity(
    *, version: int, accepted: int, running: int, max_staleness: int, max_concurrent: int, batch_size: int
) -> int:
    """How many more items may start now.

    ``capacity = min(max_concurrent - running, (max_staleness + version + 1) * batch_size - (accepted + running))``,
    floored at 0. ``accepted`` counts items accepted into the replay buffer and not given back
    (an item dropped or requeued at consume time gives its slot back).
    """
    by_concurrency = max_concurrent - running
    by_staleness = (max_staleness + version + 1) * batch_size - (accepted + running)
    return max(0, min(by_concurrency, by_staleness))


@dataclass(slots=True)
class StalenessStats:
    """Cumulative counters; a snapshot is what metrics log."""

    submitted: int = 0
    started: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    given_back: int = 0

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


class StalenessManager:
    """The capacity formula plus the counters it needs.

    ``accepted`` in the formula is ``stats.accepted - stats.given_back + offset``, where the offset
    is set by :meth:`recover` so that after resuming at version v exactly ``v * B`` items count as
    accepted (their data was trained on before the checkpoint).
    """

    def __init__(self, *, max_staleness: int, max_concurrent: int, batch_size: int) -> None:
        self.max_staleness = max_staleness
        self.max_concurrent = max_concurrent
        self.batch_size = batch_size
        self.version = 0
        self.running = 0
        self.stats = StalenessStats()
        self._offset = 0

    @property
    def accepted(self) -> int:
        return self.stats.accepted - self.stats.given_back + self._offset

    def capacity(self) -> int:
        return staleness_capacity(
            version=self.version,
            accepted=self.accepted,
            running=self.running,
            max_staleness=self.max_staleness,
            max_concurrent=self.max_concurrent,
            batch_size=self.batch_size,
        )

    def on_submit(self) -> None:
        self.stats.submitted += 1

    def on_start(self) -> None:
        self.stats.started += 1
        self.running += 1

    def on_accept(self) -> None:
        self.running -= 1
        self.stats.accepted += 1

    def on_reject(self, reason: str) -> None:
        self.running -= 1
        self.stats.rejected[reason] += 1

    def on_give_back(self) -> None:
        """An accepted item was dropped or requeued at consume time: its slot is free again."""
        self.stats.given_back += 1

    def set_version(self, version: int) -> None:
        self.version = version

    def recover(self, version: int, buffered: int = 0) -> None:
        """Resume at ``version``: count ``version * B + buffered`` items as accepted (``buffered``
        = groups restored into the replay buffer from the checkpoint)."""
        self.version = version
        self._offset = version * self.batch_size + buffered - (self.stats.accepted - self.stats.given_back)
