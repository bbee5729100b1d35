"""Admission control that bounds how off-policy a trajectory may be.

Let B be the items (prompts) the trainer consumes per step, eta the maximum staleness, v the
current policy version (train steps done). An item that starts at version v must be trained on by
version v + eta at the latest, so at most ``(eta + v + 1) * B`` items may have been admitted in
total (AReaL, arXiv:2505.24298, section 5). This module is that formula and its counters; the
executor decides when to call it. It holds no locks: it lives on the event loop's thread.

With ``ramp`` the bound grows with the versions done: ``min(eta, v)`` replaces ``eta``, so the
start of a run does not admit ``(eta + 1) * B`` items on the untrained policy (the first ``eta + 1``
steps would all train on version-0 data); version 0 admits ``B`` items, version 1 up to ``3 * B``,
and from version ``eta`` on the formula is AReaL's. No item is ever staler than without it.

Items run for ``rollout()`` (their trajectories go straight back to the caller, never through the
replay buffer) take concurrency slots but no staleness budget: they are counted apart
(``running_direct``, ``stats.returned``).

Not here: running episodes (``_executor.py``), the consume-time staleness check (``_buffer.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["StalenessManager", "StalenessStats", "staleness_capacity"]


def staleness_capacity(
    *,
    version: int,
    accepted: int,
    running: int,
    max_staleness: int,
    max_concurrent: int,
    batch_size: int,
    ramp: bool = False,
) -> int:
    """How many more items may start now.

    ``capacity = min(max_concurrent - running, (eta + version + 1) * batch_size - (accepted + running))``,
    floored at 0, with ``eta = max_staleness`` (``min(max_staleness, version)`` when ``ramp``).
    ``accepted`` counts items accepted into the replay buffer and not given back (an item dropped
    or requeued at consume time gives its slot back).
    """
    eta = min(max_staleness, version) if ramp else max_staleness
    by_concurrency = max_concurrent - running
    by_staleness = (eta + version + 1) * batch_size - (accepted + running)
    return max(0, min(by_concurrency, by_staleness))


@dataclass(slots=True)
class StalenessStats:
    """Cumulative counters; a snapshot is what metrics log."""

    submitted: int = 0
    started: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    given_back: int = 0
    returned: int = 0  # rollout() items whose trajectories went straight back to the caller

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


class StalenessManager:
    """The capacity formula plus the counters it needs.

    ``accepted`` in the formula is ``stats.accepted - stats.given_back + offset``, where the offset
    is set by :meth:`recover` so that after resuming at version v exactly ``v * B`` items count as
    accepted (their data was trained on before the checkpoint).
    """

    def __init__(self, *, max_staleness: int, max_concurrent: int, batch_size: int, ramp: bool = False) -> None:
        self.max_staleness = max_staleness
        self.ramp = ramp
        self.max_concurrent = max_concurrent
        self.batch_size = batch_size
        self.version = 0
        self.running = 0  # items inside the staleness budget
        self.running_direct = 0  # rollout() items: a concurrency slot each, no budget
        self.stats = StalenessStats()
        self._offset = 0

    @property
    def accepted(self) -> int:
        return self.stats.accepted - self.stats.given_back + self._offset

    @property
    def eta(self) -> int:
        """The staleness bound in force now: ``max_staleness``, or ``min(max_staleness, version)`` with ``ramp``."""
        return min(self.max_staleness, self.version) if self.ramp else self.max_staleness

    @property
    def limit(self) -> int:
        """``(eta + version + 1) * batch_size``: items that may be accepted by this version."""
        return (self.eta + self.version + 1) * self.batch_size

    def capacity(self) -> int:
        """How many more budgeted items may start now (concurrency slots and staleness budget)."""
        return staleness_capacity(
            version=self.version,
            accepted=self.accepted,
            running=self.running,
            max_staleness=self.max_staleness,
            max_concurrent=self.max_concurrent - self.running_direct,
            batch_size=self.batch_size,
            ramp=self.ramp,
        )

    def free_slots(self) -> int:
        """Concurrency slots free now (what a rollout() item needs)."""
        return max(0, self.max_concurrent - self.running - self.running_direct)

    def deliverable(self) -> int:
        """Budgeted items that can still be accepted before the version moves, however many are submitted.

        The running ones may all be accepted; beyond them the budget admits ``limit - accepted``.
        """
        return max(self.running, self.limit - self.accepted)

    def on_submit(self) -> None:
        self.stats.submitted += 1

    def on_start(self, *, direct: bool = False) -> None:
        self.stats.started += 1
        if direct:
            self.running_direct += 1
        else:
            self.running += 1

    def on_accept(self) -> None:
        self.running -= 1
        self.stats.accepted += 1

    def on_return(self) -> None:
        """A rollout() item finished with trajectories, handed to its caller (no budget used)."""
        self.running_direct -= 1
        self.stats.returned += 1

    def on_reject(self, reason: str, *, direct: bool = False) -> None:
        """A started item ended without trajectories; ``reason`` is counted."""
        if direct:
            self.running_direct -= 1
        else:
            self.running -= 1
        self.stats.rejected[reason] += 1

    def on_drop_queued(self, reason: str) -> None:
        """A submitted item left the queue without starting (its rollout() call was cancelled)."""
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
